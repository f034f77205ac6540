"""Stand-in of the original's experiments/py/eval_utils_counterfact.py: the contract of
test_batch_prediction (per prefix the mean NLL of ' ' + each target, and for the target named by
which_correct (0: new, 1: true) whether every token is the argmax), written plainly here."""

import torch
from util.spy import CALLS


def test_batch_prediction(model, tok, prefixes, which_correct, target_new, target_true):
    CALLS.append("test_batch_prediction")
    probs, correct = [], []
    for prefix, right in zip(prefixes, which_correct):
        row = {}
        for key, target in (("target_new", target_new), ("target_true", target_true)):
            ids = tok(prefix)["input_ids"]
            answer = tok(f" {target}")["input_ids"]
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([ids + answer])).logits[0]
            steps = logits[len(ids) - 1:len(ids) - 1 + len(answer)]
            row[key] = -steps.log_softmax(-1)[range(len(answer)), answer].mean().item()
            if (key == "target_new") == (right == 0):
                correct.append(bool((steps.argmax(-1) == torch.tensor(answer)).all()))
        probs.append(row)
    return probs, correct


def compute_rewrite_quality_counterfact(model, tok, record, snips=None, vec=None):
    rewrite = record["requested_rewrite"]
    groups = [[rewrite["prompt"].format(rewrite["subject"])], record["paraphrase_prompts"],
              record["neighborhood_prompts"]]
    which = [0] * (len(groups[0]) + len(groups[1])) + [1] * len(groups[2])
    probs, correct = test_batch_prediction(model, tok, [p for g in groups for p in g], which,
                                           rewrite["target_new"]["str"], rewrite["target_true"]["str"])
    out, start = {}, 0
    for key, group in zip(("rewrite_prompts", "paraphrase_prompts", "neighborhood_prompts"), groups):
        out[f"{key}_probs"] = probs[start:start + len(group)]
        out[f"{key}_correct"] = correct[start:start + len(group)]
        start += len(group)
    return out

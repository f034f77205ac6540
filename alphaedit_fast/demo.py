"""`alphaedit-fast demo`: edit the shipped fact-world model (or a tiny random one with
`--tiny FAMILY`) and show probabilities before and after.

The random-model demo edits at the prompt's last token (`fact_token="last"`): a random model
knows no facts. The fact-world model stores its facts at the subject, and is edited there.
"""

from __future__ import annotations

import time

import torch

from .arch import get_module, key_width
from .editor import apply_AlphaEdit_to_model
from .hparams import AlphaEditHyperParams
from .requests import normalize_requests, target_token_ids
from .tiny import tiny_model, tiny_tokenizer_for

DEMO_REQUESTS = [
    {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux", "target_new": {"str": "English"}},
    {"prompt": "{} plays the", "subject": "Toko Yasuda", "target_new": {"str": "piano"}},
    {"prompt": "{} works for", "subject": "Michel Denisot", "target_new": {"str": "Google"}},
    {"prompt": "{} is located in", "subject": "Autonomous University of Madrid", "target_new": {"str": "Sweden"}},
]


def target_probability(model, tok, request) -> float:
    """p(target tokens | filled prompt), the product over the target's tokens."""
    prompt_ids = tok(request["prompt"].format(request["subject"]))["input_ids"]
    target_ids = target_token_ids(tok, request["target_new"]["str"])
    device = model.get_input_embeddings().weight.device
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + target_ids[:-1]], device=device)).logits[0]
    log_probs = logits.float().log_softmax(-1)
    return float(sum(log_probs[len(prompt_ids) - 1 + j, t] for j, t in enumerate(target_ids)).exp())


def run_tiny_demo(family: str = "llama", seed: int = 0) -> list[tuple[str, float, float]]:
    """Edit a tiny `family` model; print and return (prompt -> target, p before, p after)."""
    model, tok = tiny_model(family, seed=seed), tiny_tokenizer_for(family)
    hparams = AlphaEditHyperParams.for_model(model, layers=[1, 2], fact_token="last", L2=0.1, v_lr=0.5)
    requests = normalize_requests(DEMO_REQUESTS)
    before = [target_probability(model, tok, r) for r in requests]
    d_k = key_width(get_module(model, hparams.rewrite_module_tmp.format(hparams.layers[0])))
    P = torch.eye(d_k).repeat(len(hparams.layers), 1, 1)  # no statistics yet: no null-space constraint
    start = time.perf_counter()
    apply_AlphaEdit_to_model(model, tok, requests, hparams, P=P, context_templates=[["{}"], ["The a. {}", "I b. {}"]])
    seconds = time.perf_counter() - start
    after = [target_probability(model, tok, r) for r in requests]
    rows = [(f"{r['prompt'].format(r['subject'])} ->{r['target_new']['str']}", b, a)
            for r, b, a in zip(requests, before, after)]
    width = max(len(text) for text, _, _ in rows)
    print(f"AlphaEdit on a tiny random {family} model: {len(requests)} edits in {seconds:.2f} s\n")
    print(f"{'edit':<{width}}  {'p before':>9}  {'p after':>9}")
    for text, b, a in rows:
        print(f"{text:<{width}}  {b:9.4f}  {a:9.4f}")
    return rows


def run_demo(n_edits: int = 10, seed: int = 0) -> list[dict]:
    """Edit the shipped fact-world model with `n_edits` counterfactuals in one batch, under a
    null-space projector computed from its own corpus; print a before/after table."""
    from .editor import AlphaEditor
    from .factworld import load_shipped
    from .factworld.editing import CONTEXT_TEMPLATES, corpus_projector, edit_hparams
    from .factworld.evaluate import next_token_scores, object_id

    start = time.perf_counter()
    print("loading the shipped fact-world model", flush=True)
    model, tok, world = load_shipped()
    hparams = edit_hparams(model)
    timings = {"load": time.perf_counter() - start}
    print(f"key statistics of layers {hparams.layers} over the model's training corpus, then the null space",
          flush=True)
    start = time.perf_counter()
    bases = corpus_projector(model, tok, world, hparams, seed=seed, progress=True)
    timings["statistics + projector"] = time.perf_counter() - start
    records = world.counterfact_requests(n_edits, seed)
    rows = []
    for rec in records:
        rw = rec["requested_rewrite"]
        rows.append({"prompt": rw["prompt"].format(rw["subject"]), "paraphrase": rec["paraphrase_prompts"][0],
                     "new": rw["target_new"]["str"], "neighbour": rec["neighborhood_prompts"][0],
                     "neighbour_object": rw["target_true"]["str"]})

    asked = [(row[prompt], row[word]) for row in rows
             for prompt, word in (("prompt", "new"), ("paraphrase", "new"), ("neighbour", "neighbour_object"))]
    columns = torch.tensor([[object_id(tok, word)] for _, word in asked])

    def measure(key):
        probs, _ = next_token_scores(model, tok, [prompt for prompt, _ in asked], columns)
        for row, (rewrite, paraphrase, neighbour) in zip(rows, probs[:, 0].view(-1, 3).tolist()):
            row[key] = (rewrite, paraphrase, neighbour)

    measure("before")
    print(f"editing {n_edits} facts in one batch", flush=True)
    editor = AlphaEditor(model, tok, hparams, projector=bases, context_templates=CONTEXT_TEMPLATES, progress=True)
    timings.update(editor.edit([rec["requested_rewrite"] for rec in records]))
    measure("after")
    n_params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"\nAlphaEdit on the shipped fact-world model ({n_params:.1f}M parameters): {n_edits} counterfactual edits,"
          f" one batch, layers {hparams.layers}, null space {bases[0].shape[1]}/{bases[0].shape[0]}\n")
    print(f"{'rewrite prompt -> new object':<52} {'p(new)':>15} {'paraphrase p(new)':>18} {'neighbour p(true)':>18}")
    for row in rows:
        b, a = row["before"], row["after"]
        print(f"{row['prompt'] + ' ->' + row['new']:<52} {b[0]:6.3f} -> {a[0]:5.3f} {b[1]:8.3f} -> {a[1]:5.3f}"
              f" {b[2]:8.3f} -> {a[2]:5.3f}")
    print("\ntime: " + ", ".join(f"{k} {v:.2f}s" for k, v in timings.items()))
    return rows

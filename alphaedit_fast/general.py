"""General capability after editing: the original repository's `glue_eval` (SST-2, MRPC, CoLA, RTE,
NLI, MMLU) as its `experiments/evaluate.py` runs it with `--downstream_eval_steps` (zero-shot,
`number_of_tests=100`, `gen_len=5`), item for item, in batches.

Data: `{data_dir}/{task}.json`, the original's `glue_eval/dataset/{task}.pkl` as a JSON list of its
records in their order. Records 0-9 are the original's few-shot pool (unused at zero shots) and are
skipped; records 10 .. 10+n_items-1 are scored (few-shot prompts are not implemented: the paper runs
zero-shot). Any causal LM works (the original needs the model's name in its context-length table).

Per item, as the original's per-task `evaluate`:

- **generated answer** (`answer`): greedy generation of `gen_len` new tokens after the prompt (ending
  early at EOS); the decoded text, prompt included, is cut after the last `MARKERS[task]` (MMLU: the
  decoded prompt is removed instead) and lower-cased; the first of `KEYWORDS[task]` it contains gives
  the label, none is `-1` ("invalid").
- **log-probability answer** (`answer_new`): per candidate answer `CHOICES[task][label]`, the mean NLL
  of the tokens of `" " + answer` (the leading BOS dropped: the original drops it for Llama models,
  here for any tokenizer that prepends its BOS) read from the logits of `prompt + " " + answer`
  tokenised as one text, at the positions after the prompt's own tokens. The label whose
  exp(-NLL) is strictly the highest wins; a tie gives 0 (binary tasks) or -1 (MMLU), as the original.

Metrics per task: `correct`/`incorrect`/`invalid` counts of `answer` (invalid ones are neither),
`accuracy` = correct / n (the original's printed ACC), `f1` = support-weighted F1 and `mcc` =
Matthews correlation of `answer` against the labels (sklearn's `f1_score(average="weighted")` and
`matthews_corrcoef`, invalid answers a class of their own), `f1_new` the weighted F1 of `answer_new`,
`correct_new`/`incorrect_new` its counts (the original reports these for MMLU only), `accuracy_new`
and `mcc_new` (not in the original), `total` = `n` = items scored.
The original's RTE maps GLUE's label 1 (not_entailment) to "True"; kept, as it defines the numbers.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch

from .errors import InvalidArgumentError
from .head import own_logits
from .positions import pad_right, pad_token_id

TASKS = ("sst2", "mrpc", "cola", "rte", "nli", "mmlu")
POOL_SIZE = 10  # the original's FEW_SHOT_TEST_SPLIT
GEN_LEN = 5  # glue_eval.GLUEEval.evaluate's gen_len, which evaluate.py leaves at its default
FIELDS = {"sst2": ("sentence", "label"), "mrpc": ("sentence1", "sentence2", "label"),
          "cola": ("sentence", "label"), "rte": ("sentence1", "sentence2", "label"),
          "nli": ("sentence1", "sentence2", "label"), "mmlu": ("question", "choices", "answer")}
CHOICES = {"sst2": ("negative", "positive"), "mrpc": ("No", "Yes"), "cola": ("No", "Yes"),
           "rte": ("False", "True"), "nli": ("False", "True"), "mmlu": ("A", "B", "C", "D")}
MARKERS = {"sst2": "Sentiment :", "mrpc": "Answer:", "cola": "Answer:", "rte": "answer:",
           "nli": "True or False? Answer:"}
KEYWORDS = {"sst2": (("positive", 1), ("negative", 0)), "mrpc": (("yes", 1), ("no", 0)),
            "cola": (("yes", 1), ("no", 0)), "rte": (("false", 0), ("true", 1)),
            "nli": (("true", 1), ("false", 0)), "mmlu": (("a\n", 0), ("b\n", 1), ("c\n", 2), ("d\n", 3))}


# -- items -----------------------------------------------------------------------------------
def prompt_for(task: str, record: dict) -> str:
    """The original's zero-shot prompt (`_create_prompt` without few-shot context)."""
    if task == "sst2":
        return "Review :" + record["sentence"] + "\nSentiment :"
    if task == "mrpc":
        return (f"Are the sentences paraphrases of each other.\nSentence 1: {record['sentence1']}\n"
                f"Sentence 2: {record['sentence2']}\nAnswer:")
    if task == "cola":
        return f"Is this sentence linguistically acceptable?\nSentence: {record['sentence']}\nAnswer: "
    if task == "rte":
        return f"{record['sentence1']}\nquestion: {record['sentence2']} True or False?\nanswer:"
    if task == "nli":
        return f"{record['sentence1']} entails the {record['sentence2']} True or False? Answer:"
    if task == "mmlu":
        options = "".join(f"({letter}) {choice}\n" for letter, choice in zip("ABCD", record["choices"]))
        return f"Question: {record['question']}\n{options}Answer:"
    raise InvalidArgumentError(f"unknown task {task!r}; expected one of {TASKS}")


def label_of(task: str, record: dict) -> int:
    if task == "nli":
        return 1 if record["label"] == "entailment" else 0
    return int(record["answer" if task == "mmlu" else "label"])


def load_task(data_dir, task: str, n_items: int | None = 100) -> list[dict]:
    """The scored items of `task`: records POOL_SIZE .. POOL_SIZE+n_items-1 of `{data_dir}/{task}.json`
    (all after the pool with `n_items=None`), each `{"index", "prompt", "label", "record"}`."""
    if task not in TASKS:
        raise InvalidArgumentError(f"unknown task {task!r}; expected one of {TASKS}")
    path = Path(data_dir) / f"{task}.json"
    fields = ", ".join(FIELDS[task])
    if not path.is_file():
        raise InvalidArgumentError(
            f"{path} not found: the general-capability evaluation needs {task}.json, a JSON list of records with "
            f"{fields} (the original AlphaEdit repository's glue_eval/dataset/{task}.pkl converted to JSON, "
            "records in their order; this project's machines have them in ../shared/data/glue-eval)")
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
        items = [{"index": i, "prompt": prompt_for(task, r), "label": label_of(task, r), "record": r}
                 for i, r in enumerate(records[POOL_SIZE:], POOL_SIZE)]
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as err:
        raise InvalidArgumentError(f"{path}: malformed ({type(err).__name__}: {err}); expected a JSON list of "
                                   f"records with {fields}") from None
    if not items or n_items is not None and not 0 < n_items <= len(items):
        raise InvalidArgumentError(f"n_items={n_items}: {path} has {len(items)} records after the "
                                   f"{POOL_SIZE}-record few-shot pool")
    return items if n_items is None else items[:n_items]


def parse_answer(task: str, text: str, prompt_text: str = "") -> int:
    """The label a generation gives (`_get_answer`), -1 when invalid. `text`: the decoded prompt and
    continuation; `prompt_text`: the decoded prompt (MMLU parses `text` without it)."""
    answer = text.replace(prompt_text, "") if task == "mmlu" else text.split(MARKERS[task])[-1].strip()
    answer = answer.lower()
    return next((label for word, label in KEYWORDS[task] if word in answer), -1)


def choose(task: str, probs: Sequence[float]) -> int:
    """The label of the strictly most probable candidate; a tie gives 0, or -1 for MMLU."""
    best = max(range(len(probs)), key=probs.__getitem__)
    if all(probs[best] > p for k, p in enumerate(probs) if k != best):
        return best
    return -1 if task == "mmlu" else 0


# -- the model's answers ---------------------------------------------------------------------
@torch.no_grad()
def generate_texts(model, tok, prompts: Sequence[str], gen_len: int = GEN_LEN, batch_size: int = 16
                   ) -> list[tuple[str, str]]:
    """Per prompt, (decoded prompt, decoded prompt + greedy continuation) with skip_special_tokens:
    `gen_len` new tokens, cut after the first EOS, run in left-padded batches of similar lengths."""
    device = model.get_input_embeddings().weight.device
    pad = pad_token_id(tok)
    eos = model.generation_config.eos_token_id
    eos = {t for t in (eos if isinstance(eos, (list, tuple)) else [eos]) if t is not None}
    ids = tok(list(prompts))["input_ids"]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    texts: list = [None] * len(ids)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        width = max(len(ids[i]) for i in rows)
        input_ids = torch.tensor([[pad] * (width - len(ids[i])) + ids[i] for i in rows], device=device)
        mask = torch.tensor([[0] * (width - len(ids[i])) + [1] * len(ids[i]) for i in rows], device=device)
        out = model.generate(input_ids=input_ids, attention_mask=mask, do_sample=False, max_new_tokens=gen_len,
                             pad_token_id=pad)
        for row, i in zip(out[:, width:].tolist(), rows):
            stop = next((k + 1 for k, t in enumerate(row) if t in eos), len(row))
            texts[i] = (tok.decode(ids[i], skip_special_tokens=True),
                        tok.decode(ids[i] + row[:stop], skip_special_tokens=True))
    return texts


def answer_ids(tok, answer: str) -> list[int]:
    """Tokens of `" " + answer`, without the BOS the tokenizer prepends."""
    ids = tok(" " + answer)["input_ids"]
    return ids[1:] if ids and tok.bos_token_id is not None and ids[0] == tok.bos_token_id else ids


@torch.no_grad()
def candidate_nlls(model, tok, prompts: Sequence[str], answers: Sequence[str], batch_size: int = 16
                   ) -> list[list[float]]:
    """nll[p][a]: the mean NLL of `answer_ids(answers[a])` read from the logits of
    `prompts[p] + " " + answers[a]` (tokenised as one text) at the positions after the prompt's
    len(tok(prompt)) tokens, summed in float64 as the original; rows run in right-padded batches
    sorted by length and the LM head only where an answer token is predicted."""
    targets = [answer_ids(tok, a) for a in answers]
    starts = [len(x) for x in tok(list(prompts))["input_ids"]]
    pairs = [(p, a) for p in range(len(prompts)) for a in range(len(answers))]
    joint = tok([f"{prompts[p]} {answers[a]}" for p, a in pairs])["input_ids"]
    for (p, a), row in zip(pairs, joint):
        if starts[p] + len(targets[a]) - 1 > len(row):
            raise InvalidArgumentError(f"{answers[a]!r} after prompt {p} tokenises to fewer tokens than "
                                       f"{answers[a]!r} alone; the original's scoring is undefined there")
    order = sorted(range(len(pairs)), key=lambda r: -len(joint[r]))
    head, device = model.get_output_embeddings(), model.get_input_embeddings().weight.device
    nll = [[0.0] * len(answers) for _ in prompts]
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        input_ids, mask = pad_right([joint[r] for r in rows], pad_token_id(tok), device)
        hidden = model.base_model(input_ids=input_ids, attention_mask=mask).last_hidden_state
        lengths = [len(targets[pairs[r][1]]) for r in rows]
        row_of = torch.cat([torch.full((n,), k) for k, n in enumerate(lengths)]).to(hidden.device)
        at = torch.cat([torch.arange(n) + starts[pairs[r][0]] - 1 for r, n in zip(rows, lengths)]).to(hidden.device)
        logits = own_logits(model, hidden[row_of, at].to(head.weight.device))
        wanted = torch.tensor([t for r in rows for t in targets[pairs[r][1]]], device=logits.device)
        logp = logits.log_softmax(-1).gather(1, wanted[:, None])[:, 0].tolist()
        offset = 0
        for r, n in zip(rows, lengths):
            total = 0.0
            for value in logp[offset:offset + n]:
                total += -value
            nll[pairs[r][0]][pairs[r][1]] = total / n
            offset += n
    return nll


def general_predictions(model, tok, data_dir, tasks: Sequence[str] = TASKS, n_items: int | None = 100,
                        batch_size: int = 16, gen_len: int = GEN_LEN) -> dict[str, list[dict]]:
    """Per task, per scored item: `{"index", "label", "prompt", "generated_text"` (the continuation,
    as the original stores it), `"answer", "nll"` (per label), `"answer_new"}`."""
    tasks = (tasks,) if isinstance(tasks, str) else tuple(tasks)
    for name, value in (("batch_size", batch_size), ("gen_len", gen_len)):
        if not isinstance(value, int) or value < 1:
            raise InvalidArgumentError(f"{name} must be a positive integer, got {value!r}")
    loaded = {task: load_task(data_dir, task, n_items) for task in tasks}  # every file checked before any work
    out = {}
    for task, items in loaded.items():
        prompts = [item["prompt"] for item in items]
        texts = generate_texts(model, tok, prompts, gen_len, batch_size)
        nlls = candidate_nlls(model, tok, prompts, CHOICES[task], batch_size)
        out[task] = [{"index": item["index"], "label": item["label"], "prompt": item["prompt"],
                      "generated_text": full.replace(shown, ""), "answer": parse_answer(task, full, shown),
                      "nll": nll, "answer_new": choose(task, [math.exp(-x) for x in nll])}
                     for item, (shown, full), nll in zip(items, texts, nlls)]
    return out


# -- metrics ---------------------------------------------------------------------------------
def f1_weighted(labels: Sequence[int], predictions: Sequence[int]) -> float:
    """sklearn's f1_score(labels, predictions, average="weighted"): per label of `labels`, F1 =
    2TP / (2TP + FP + FN) (0 when undefined), averaged with weights = the label's count."""
    total = 0.0
    for c in sorted(set(labels)):
        tp = sum(y == c and p == c for y, p in zip(labels, predictions))
        fp = sum(y != c and p == c for y, p in zip(labels, predictions))
        fn = sum(y == c and p != c for y, p in zip(labels, predictions))
        total += (2 * tp / (2 * tp + fp + fn) if tp else 0.0) * (tp + fn)
    return total / len(labels) if labels else 0.0


def mcc(labels: Sequence[int], predictions: Sequence[int]) -> float:
    """sklearn's matthews_corrcoef (multiclass form, every distinct value a class; 0 when undefined):
    (c*s - t.p) / sqrt((s^2 - p.p)(s^2 - t.t)) with c correct, s items, t/p the true/predicted counts."""
    classes = sorted(set(labels) | set(predictions))
    t = [sum(y == c for y in labels) for c in classes]
    p = [sum(q == c for q in predictions) for c in classes]
    s, correct = len(labels), sum(y == q for y, q in zip(labels, predictions))
    cov_tp = correct * s - sum(a * b for a, b in zip(t, p))
    cov_pp, cov_tt = s * s - sum(b * b for b in p), s * s - sum(a * a for a in t)
    return cov_tp / math.sqrt(cov_tt * cov_pp) if cov_tt * cov_pp else 0.0


def task_metrics(items: Sequence[dict]) -> dict:
    """The metrics of one task's `general_predictions` items (module docstring)."""
    labels = [it["label"] for it in items]
    answers, news = [it["answer"] for it in items], [it["answer_new"] for it in items]
    n = len(items)
    correct = sum(a == y for a, y in zip(answers, labels))
    invalid = answers.count(-1)
    correct_new = sum(a == y for a, y in zip(news, labels))
    return {"n": n, "total": n, "correct": correct, "incorrect": n - correct - invalid, "invalid": invalid,
            "accuracy": correct / n, "f1": f1_weighted(labels, answers), "mcc": mcc(labels, answers),
            "f1_new": f1_weighted(labels, news), "correct_new": correct_new, "incorrect_new": n - correct_new,
            "accuracy_new": correct_new / n, "mcc_new": mcc(labels, news)}


def evaluate_general(model, tok, data_dir, tasks: Sequence[str] = TASKS, n_items: int | None = 100,
                     batch_size: int = 16, gen_len: int = GEN_LEN, return_items: bool = False):
    """`{task: task_metrics}` for `tasks` (with `return_items`, also the `general_predictions`)."""
    items = general_predictions(model, tok, data_dir, tasks, n_items, batch_size, gen_len)
    metrics = {task: task_metrics(task_items) for task, task_items in items.items()}
    return (metrics, items) if return_items else metrics

"""`alphaedit-fast demo`: edit a tiny model and show the target probabilities before and after.

A random-initialised model knows no facts, so this demo edits at the prompt's last token
(`fact_token="last"`); the shipped fact-world model will show subject-position edits.
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


def run_demo(family: str = "llama", seed: int = 0) -> list[tuple[str, float, float]]:
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

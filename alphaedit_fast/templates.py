"""Context templates (DESIGN step 1): short model-generated prefixes, cached per model."""

from __future__ import annotations

import unicodedata
import weakref

import torch

from .positions import encode_batch

_CACHE: weakref.WeakKeyDictionary[torch.nn.Module, dict] = weakref.WeakKeyDictionary()
PREFIXES = ("The", "Therefore", "Because", "I", "You")


def generate_snippet(model, tok, prompt: str, max_len: int, top_k: int, generator: torch.Generator) -> str:
    """Top-k sampled continuation of `prompt` up to `max_len` tokens in total (prompt included)."""
    device = model.get_input_embeddings().weight.device
    input_ids, mask = encode_batch(tok, [prompt], device)
    with torch.no_grad():
        while input_ids.shape[1] < max_len:
            logits = model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits[0, -1]
            probs, candidates = torch.softmax(logits.float(), dim=-1).topk(top_k)
            choice = torch.multinomial((probs / probs.sum()).cpu(), 1, generator=generator)
            next_id = candidates[choice.to(candidates.device)]
            input_ids = torch.cat([input_ids, next_id.view(1, 1)], dim=1)
            mask = torch.cat([mask, mask.new_ones(1, 1)], dim=1)
    text = tok.decode(input_ids[0].tolist(), skip_special_tokens=True)
    return unicodedata.normalize("NFKD", text).replace("\n\n", " ")


def get_context_templates(model, tok, seed: int | None = 0, max_len: int = 10, top_k: int = 5,
                          use_cache: bool = True) -> list[list[str]]:
    """`[["{}"], [five snippets + ". {}"]]`, generated like the original and cached per model.

    `seed` makes the sampling reproducible (None: torch's global generator state). Braces in
    generated text become spaces so each template holds exactly one `{}`.
    """
    key = (seed, max_len, top_k)
    cached = _CACHE.get(model, {}) if use_cache else {}
    if key in cached:
        return [list(group) for group in cached[key]]
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        snippets = [generate_snippet(model, tok, p, max_len, top_k, generator) for p in PREFIXES]
    finally:
        model.train(was_training)
    templates = [["{}"], [s.replace("{", " ").replace("}", " ") + ". {}" for s in snippets]]
    if use_cache:
        _CACHE.setdefault(model, {})[key] = templates
    return [list(group) for group in templates]

"""Held-out perplexity: how much an edit stream costs the model's language modelling elsewhere."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from .errors import InvalidArgumentError
from .head import own_logits


def read_text_tokens(tok, path, max_tokens: int) -> list[int]:
    """The first `max_tokens` tokens of text file `path` (no special tokens)."""
    path = Path(path)
    if not path.is_file():
        raise InvalidArgumentError(f"perplexity text {path} does not exist: give a UTF-8 text file the key statistics "
                                   "did not read (e.g. the part of a corpus after their token budget)")
    text = path.read_text(encoding="utf-8", errors="replace")
    ids = tok(text[: max_tokens * 16], add_special_tokens=False)["input_ids"][:max_tokens]
    if len(ids) < 2:
        raise InvalidArgumentError(f"perplexity text {path} holds fewer than 2 tokens")
    return ids


@torch.no_grad()
def perplexity(model, tok, token_ids: list[int], window: int = 512, batch_size: int = 8) -> float:
    """exp(mean NLL) of `token_ids` cut into consecutive windows of `window` tokens, each read on
    its own (after the tokenizer's BOS when it adds one), every token after its row's first scored.

    token_ids: (n,) ints. Windows run `batch_size` at a time, right-padded (the last may be short)."""
    bos = tok("", add_special_tokens=True)["input_ids"]
    bos = bos[:1] if bos and bos[0] == tok.bos_token_id else []
    device = model.get_input_embeddings().weight.device
    rows = [bos + token_ids[i:i + window] for i in range(0, len(token_ids), window)]
    rows = [r for r in rows if len(r) >= 2]
    total, count = 0.0, 0
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        width = max(len(r) for r in batch)
        ids = torch.tensor([r + [0] * (width - len(r)) for r in batch], device=device)
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in batch], device=device)
        hidden = model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
        scored = mask[:, 1:].bool()
        logits = own_logits(model, hidden[:, :-1][scored].to(model.get_output_embeddings().weight.device)).float()
        wanted = ids[:, 1:][scored].to(logits.device)
        total += float(-logits.log_softmax(-1).gather(1, wanted[:, None]).double().sum())
        count += int(scored.sum())
    return math.exp(total / count)

"""Lookup positions of a subject in filled prompts (DESIGN step 2), padding-safe.

Positions are counted from the first real token of a sequence (BOS included when the
tokenizer adds one), exactly as the original `get_words_idxs_in_templates`; `absolute_positions`
turns them into indices of a padded batch whatever side the padding is on.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .errors import InvalidRequestError

SUBTOKENS = ("last", "first_after_last", "first")


def split_template(template: str, what: str = "template") -> tuple[str, str]:
    """(prefix, suffix) around the single `{}` of `template`, which holds no other brace
    (`{0}`, `{x}`, a lone `{` or `}` would break `template.format(subject)`)."""
    if not isinstance(template, str) or template.count("{}") != 1:
        raise InvalidRequestError(f"{what} {template!r} must contain exactly one '{{}}' where the subject goes")
    prefix, suffix = template.split("{}")
    if any(brace in prefix + suffix for brace in "{}"):
        raise InvalidRequestError(f"{what} {template!r} holds a brace besides its one '{{}}' (a field such as "
                                  "'{0}' or '{x}', or a lone '{' or '}'); remove it")
    return prefix, suffix


def token_lengths(tok, texts: Sequence[str]) -> list[int]:
    """Token count of each text (special tokens included), in one batched tokenizer call."""
    if not texts:
        return []
    return [len(ids) for ids in tok(list(texts))["input_ids"]]


def get_words_idxs_in_templates(
    tok, context_templates: Sequence[str], words: Sequence[str], subtoken: str
) -> list[list[int]]:
    """Index of the subject's `subtoken` in each filled template: `[[idx], ...]`.

    `last`: len(tokens(prefix + word)) - 1; `first_after_last`: len(tokens(prefix + word))
    unless nothing follows the word; `first`: len(tokens(prefix)), at most the `last` index.
    Same values as the original for `last` and `first_after_last` (the original's `first`
    counts from the end, which is wrong under right padding).
    """
    if subtoken not in SUBTOKENS:
        raise InvalidRequestError(f"unknown subtoken {subtoken!r}; expected one of {SUBTOKENS}")
    if len(context_templates) != len(words):
        raise InvalidRequestError(
            f"{len(context_templates)} templates but {len(words)} words; pass one word per template"
        )
    for template, word in zip(context_templates, words):
        if not isinstance(word, str) or not word.strip():
            raise InvalidRequestError(f"subject {word!r} in {template!r} must be a non-empty string")
    # A prefix ending in a space may tokenise that space alone and merge it with a one-token
    # word, so tokens(prefix + word) can be no longer than tokens(prefix): the word's last
    # token is then the prefix's last position, which the formulas below give (as the original).
    parts = [split_template(t) for t in context_templates]
    n = len(parts)
    lengths = token_lengths(
        tok,
        [p for p, _ in parts]
        + [p + w for (p, _), w in zip(parts, words)]
        + [p + w + s for (p, s), w in zip(parts, words)],
    )
    prefix_len, prompt_len, input_len = lengths[:n], lengths[n : 2 * n], lengths[2 * n :]
    if subtoken == "first":  # clamped for the merged one-token case above
        return [[min(prefix_len[i], prompt_len[i] - 1)] for i in range(n)]
    return [
        [prompt_len[i] - (1 if subtoken == "last" or input_len[i] == prompt_len[i] else 0)]
        for i in range(n)
    ]


def lookup_positions(tok, templates: Sequence[str], words: Sequence[str], fact_token: str) -> list[int]:
    """Lookup position of each (template, word) pair, counted from the first real token.

    `fact_token` is `subject_{last,first,first_after_last}` or `last` (the last real token).
    """
    if fact_token == "last":
        for template in templates:
            split_template(template)
        lengths = token_lengths(tok, [t.format(w) for t, w in zip(templates, words)])
        return [n - 1 for n in lengths]
    if not fact_token.startswith("subject_"):
        raise InvalidRequestError(f"fact_token={fact_token!r} not recognised")
    idxs = get_words_idxs_in_templates(tok, templates, words, fact_token[len("subject_") :])
    return [i[0] for i in idxs]


def find_fact_lookup_idx(
    prompt: str, subject: str, tok, fact_token_strategy: str, verbose: bool = False
) -> int:
    """The original's single-prompt lookup index (`-1` for `last`, as the original returns)."""
    if fact_token_strategy == "last":
        split_template(prompt)
        idx = -1
    else:
        idx = lookup_positions(tok, [prompt], [subject], fact_token_strategy)[0]
    if verbose:
        token = tok.decode(tok(prompt.format(subject))["input_ids"][idx])
        print(f"Lookup index found: {idx} | Sentence: {prompt.format(subject)} | Token: {token}")
    return idx


def pad_token_id(tok) -> int:
    """The id used for padding: the tokenizer's pad token, else EOS, else 0."""
    for candidate in (tok.pad_token_id, tok.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def encode_batch(tok, texts: Sequence[str], device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenise `texts` in one call and pad on the right ourselves.

    Returns `input_ids, attention_mask`, both (batch, seq) int64. Right padding keeps real
    tokens at positions 0..n-1 for every model (absolute position embeddings included), and
    needs no pad token on the tokenizer, which is left untouched.
    """
    return pad_right(tok(list(texts))["input_ids"], pad_token_id(tok), device)


def pad_right(ids: Sequence[Sequence[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both (batch, longest) int64, from lists of token ids."""
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(ids), width), dtype=torch.long)
    for row, seq in enumerate(ids):
        input_ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        attention_mask[row, : len(seq)] = 1
    return input_ids.to(device), attention_mask.to(device)


def absolute_positions(relative: Sequence[int] | torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Batch indices of positions counted from each row's first real token.

    relative: (batch,), attention_mask: (batch, seq) with left or right padding -> (batch,) int64.
    """
    rel = torch.as_tensor(relative, dtype=torch.long, device=attention_mask.device)
    first_real = attention_mask.to(torch.long).argmax(dim=1)  # leading pads under left padding
    return rel + first_real

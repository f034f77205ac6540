"""Stand-in compute_keys: the rewrite module's input at the subject, averaged per template group
then over groups; (n, d_k)."""

import torch

from .representations import get_reprs_at_word_tokens
from .spy import CALLS


def compute_keys(model, tokenizer, requests, config, layer, context_templates):
    CALLS.append("compute_keys")
    subtoken = config.fact_token.removeprefix("subject_")
    keys = []
    for request in requests:
        means = []
        for group in context_templates:
            texts = [context.format(request["prompt"]) for context in group]
            reprs = get_reprs_at_word_tokens(model, tokenizer, texts, [request["subject"]] * len(texts),
                                             config.rewrite_module_template.format(layer), subtoken)[0]
            means.append(reprs.mean(0))
        keys.append(torch.stack(means).mean(0))
    return torch.stack(keys)

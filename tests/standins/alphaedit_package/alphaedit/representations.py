"""Stand-in representations: the subject's token found by character offsets, as the package does."""

import torch


def get_words_idxs_in_templates(tokenizer, context_templates, words, subtoken):
    out = []
    for template, word in zip(context_templates, words):
        prefix, suffix = template.split("{}")
        start, end = len(prefix), len(prefix) + len(word)
        offsets = tokenizer(prefix + word + suffix, return_offsets_mapping=True)["offset_mapping"]
        inside = [i for i, (a, b) in enumerate(offsets) if b > start and a < end]
        if subtoken == "first":
            out.append([inside[0]])
        elif subtoken == "last":
            out.append([inside[-1]])
        else:
            out.append([min(inside[-1] + 1, len(offsets) - 1)])
    return out


def get_reprs_at_word_tokens(model, tokenizer, context_templates, words, module_name, subtoken):
    """(input, output) of `module_name` at the subject token of each filled template, one at a time."""
    idxs = get_words_idxs_in_templates(tokenizer, context_templates, words, subtoken)
    module = dict(model.named_modules())[module_name]
    ins, outs = [], []
    for template, word, (index,) in zip(context_templates, words, idxs):
        seen = {}

        def keep(m, args, output, seen=seen):
            seen["in"], seen["out"] = args[0], output[0] if isinstance(output, tuple) else output

        handle = module.register_forward_hook(keep)
        try:
            with torch.no_grad():
                model(**tokenizer([template.format(word)], return_tensors="pt"))
        finally:
            handle.remove()
        ins.append(seen["in"][0, index])
        outs.append(seen["out"][0, index])
    return torch.stack(ins), torch.stack(outs)

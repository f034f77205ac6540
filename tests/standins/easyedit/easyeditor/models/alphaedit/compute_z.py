"""compute_z / get_module_input_output_at_words with EasyEdit's signatures, on alphaedit_fast.reference;
the request is EasyEdit's (prompt with '{}', target_new a string with its leading space)."""

from alphaedit_fast.reference.alphaedit import compute_z_ref, module_reprs_at_words_ref
from alphaedit_fast.validation import as_hparams

CALLS = []


def compute_z(model, tok, request, hparams, layer, context_templates):
    CALLS.append("compute_z")
    request = {**request, "target_new": {"str": request["target_new"]}}
    return compute_z_ref(model, tok, request, as_hparams(hparams), layer, context_templates)


def get_module_input_output_at_words(model, tok, layer, context_templates, words, module_template,
                                     fact_token_strategy):
    name = module_template.format(layer)
    return tuple(module_reprs_at_words_ref(model, tok, context_templates, words, name, fact_token_strategy, track)
                 for track in ("in", "out"))

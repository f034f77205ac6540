"""Stand-in compute_z: the reference implementation, recorded in util.spy.CALLS."""

from util.spy import CALLS

from alphaedit_fast.reference import compute_z_ref, module_reprs_at_words_ref
from alphaedit_fast.validation import as_hparams


def compute_z(model, tok, request, hparams, layer, context_templates):
    CALLS.append("compute_z")
    return compute_z_ref(model, tok, request, as_hparams(hparams), layer, context_templates)


def get_module_input_output_at_words(model, tok, layer, context_templates, words, module_template,
                                     fact_token_strategy):
    out = module_reprs_at_words_ref(model, tok, context_templates, words, module_template.format(layer),
                                    fact_token_strategy, "out")
    return None, out

"""Stand-in compute_ks: the reference implementation, recorded in util.spy.CALLS."""

from util.spy import CALLS

from alphaedit_fast.reference import compute_ks_ref
from alphaedit_fast.validation import as_hparams


def compute_ks(model, tok, requests, hparams, layer, context_templates):
    CALLS.append("compute_ks")
    return compute_ks_ref(model, tok, requests, as_hparams(hparams), layer, context_templates)

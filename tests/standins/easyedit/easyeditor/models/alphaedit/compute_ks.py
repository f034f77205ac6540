from alphaedit_fast.reference.alphaedit import compute_ks_ref
from alphaedit_fast.validation import as_hparams

CALLS = []


def compute_ks(model, tok, requests, hparams, layer, context_templates):
    CALLS.append("compute_ks")
    requests = [{**r, "target_new": {"str": r["target_new"]}} for r in requests]
    return compute_ks_ref(model, tok, requests, as_hparams(hparams), layer, context_templates)

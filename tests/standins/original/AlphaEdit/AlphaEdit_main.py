# ruff: noqa: N999 - the original module names
"""Stand-in AlphaEdit_main: the original's entry points and module-level caches, plainly (CPU)."""

from copy import deepcopy

import torch
from rome.layer_stats import layer_stats
from util import nethook
from util.globals import *  # noqa: F403 - STATS_DIR, as the original
from util.spy import CALLS

from .AlphaEdit_hparams import AlphaEditHyperParams  # noqa: F401
from .compute_ks import compute_ks
from .compute_z import compute_z, get_module_input_output_at_words

CONTEXT_TEMPLATES_CACHE = None
COV_CACHE = {}
STANDIN_TEMPLATES = [["{}"], ["Stand-in text. {}", "Another one. {}"]]


def apply_AlphaEdit_to_model(model, tok, requests, hparams, cache_template=None, cache_c=None, P=None):
    CALLS.append("apply_AlphaEdit_to_model")
    requests = deepcopy(requests)
    for r in requests:
        if not r["target_new"]["str"].startswith(" "):
            r["target_new"]["str"] = " " + r["target_new"]["str"]
    context_templates = get_context_templates(model, tok)
    z_layer = hparams.layers[-1]
    zs = torch.stack([compute_z(model, tok, r, hparams, z_layer, context_templates) for r in requests], dim=1)
    for i, layer in enumerate(hparams.layers):
        keys = compute_ks(model, tok, requests, hparams, layer, context_templates).T
        cur = get_module_input_output_at_words(model, tok, z_layer, [r["prompt"] for r in requests],
                                               [r["subject"] for r in requests], hparams.layer_module_tmp,
                                               hparams.fact_token)[1].T
        resid = (zs - cur) / (len(hparams.layers) - i)
        lhs = P[i] @ (keys @ keys.T + cache_c[i]) + hparams.L2 * torch.eye(keys.shape[0])
        upd = torch.linalg.solve(lhs, P[i] @ keys @ resid.T)
        weight = nethook.get_parameter(model, f"{hparams.rewrite_module_tmp.format(layer)}.weight")
        with torch.no_grad():
            weight[...] = weight + (upd if upd.shape == weight.shape else upd.T)
    for i, layer in enumerate(hparams.layers):
        keys = compute_ks(model, tok, requests, hparams, layer, context_templates).T
        cache_c[i, :, :] += keys @ keys.T
    return model, cache_c


def get_cov(model, tok, layer_name, mom2_dataset, mom2_n_samples, mom2_dtype, inv=False, force_recompute=False):
    CALLS.append("get_cov")
    key = (model.config._name_or_path.replace("/", "_"), layer_name)
    if key not in COV_CACHE or force_recompute:
        stat = layer_stats(model, tok, layer_name, STATS_DIR, mom2_dataset, to_collect=["mom2"],  # noqa: F405
                           sample_size=mom2_n_samples, precision=mom2_dtype, force_recompute=force_recompute)
        COV_CACHE[key] = stat.mom2.moment().float()
    return torch.inverse(COV_CACHE[key]) if inv else COV_CACHE[key]


def get_context_templates(model, tok):
    global CONTEXT_TEMPLATES_CACHE
    CALLS.append("get_context_templates")
    if CONTEXT_TEMPLATES_CACHE is None:
        CONTEXT_TEMPLATES_CACHE = deepcopy(STANDIN_TEMPLATES)
    return CONTEXT_TEMPLATES_CACHE

# ruff: noqa: N999 - EasyEdit's module name
"""EasyEdit's AlphaEdit_main contract: apply_AlphaEdit_to_model(model, tok, requests, hparams, copy,
return_orig_weights, cache_template, keep_original_weight, reset_cache, **kwargs) -> (model, weights_copy);
module globals P / P_loaded / cache_c / cache_c_new / COV_CACHE / CONTEXT_TEMPLATES_CACHE; execute_AlphaEdit,
get_cov, get_project, get_context_templates. Written for the tests on alphaedit_fast.reference (fixed
context templates instead of sampled ones); P computed here is saved to hparams.P_loc."""

import os
from copy import deepcopy

import torch

from alphaedit_fast.arch import key_width

from ..rome.layer_stats import layer_stats
from .AlphaEdit_hparams import AlphaEditHyperParams  # noqa: F401
from .compute_ks import compute_ks
from .compute_z import compute_z, get_module_input_output_at_words

CONTEXT_TEMPLATES_CACHE = None
COV_CACHE = {}
P_loaded = False
cache_c_new = False
CALLS = []


def _d_k(model, hparams):
    return key_width(model.get_submodule(hparams.rewrite_module_tmp.format(hparams.layers[-1])))


def apply_AlphaEdit_to_model(model, tok, requests, hparams, copy=False, return_orig_weights=False,  # noqa: N802
                             cache_template=None, keep_original_weight=False, reset_cache=False, **kwargs):
    global P, P_loaded, cache_c, cache_c_new
    CALLS.append("apply")
    if reset_cache:
        cache_c_new = False
    weights_copy = {}
    if copy:
        model = deepcopy(model)
    d_k, n = _d_k(model, hparams), len(hparams.layers)
    if not os.path.exists(hparams.P_loc):
        P = torch.stack([get_project(model, tok, layer, hparams) for layer in hparams.layers])
        torch.save(P, hparams.P_loc)
        P_loaded = True
    elif not P_loaded:
        P, P_loaded = torch.load(hparams.P_loc), True
    if not cache_c_new:
        cache_c, cache_c_new = torch.zeros(n, d_k, d_k), True
    deltas = execute_AlphaEdit(model, tok, requests, hparams, cache_template=cache_template)
    with torch.no_grad():
        for name, delta in deltas.items():
            w = model.get_parameter(name)
            if return_orig_weights and name not in weights_copy:
                weights_copy[name] = w.detach().clone()
            w[...] += (delta if delta.shape == w.shape else delta.T).to(w.device, w.dtype)
    return model, weights_copy


def execute_AlphaEdit(model, tok, requests, hparams, cache_template=None):  # noqa: N802
    CALLS.append("execute")
    requests = deepcopy(requests)
    for r in requests:
        if r["target_new"][0] != " ":
            r["target_new"] = " " + r["target_new"]
        r["prompt"] = r["prompt"].replace(r["subject"], "{}")
    names = [f"{hparams.rewrite_module_tmp.format(layer)}.weight" for layer in hparams.layers]
    weights = {name: model.get_parameter(name) for name in names}
    saved = {name: w.detach().clone() for name, w in weights.items()}
    templates = get_context_templates(model, tok)
    z_layer = hparams.layers[-1]
    zs = torch.stack([compute_z(model, tok, r, hparams, z_layer, templates) for r in requests], dim=1)
    deltas = {}
    for i, (layer, name) in enumerate(zip(hparams.layers, names)):
        ks = compute_ks(model, tok, requests, hparams, layer, templates).T
        cur = get_module_input_output_at_words(model, tok, z_layer, [r["prompt"] for r in requests],
                                               [r["subject"] for r in requests], hparams.layer_module_tmp,
                                               hparams.fact_token)[1].T
        resid = (zs - cur) / (len(hparams.layers) - i)
        lhs = P[i] @ (ks @ ks.T + cache_c[i]) + hparams.L2 * torch.eye(ks.shape[0])
        upd = torch.linalg.solve(lhs, P[i] @ ks @ resid.T)
        w = weights[name]
        upd = upd if upd.shape == w.shape else upd.T
        with torch.no_grad():
            w[...] += upd
        deltas[name] = upd.detach().cpu()
    for i, layer in enumerate(hparams.layers):
        ks = compute_ks(model, tok, requests, hparams, layer, templates).T
        cache_c[i] += ks @ ks.T
    with torch.no_grad():
        for name, w in weights.items():
            w[...] = saved[name]
    return deltas


def get_cov(model, tok, layer_name, mom2_dataset, mom2_n_samples, mom2_dtype, inv=False, force_recompute=False,
            hparams=None):
    key = (model.config._name_or_path.replace("/", "_"), layer_name)
    if key not in COV_CACHE or force_recompute:
        stat = layer_stats(model, tok, layer_name, hparams.stats_dir, mom2_dataset, to_collect=["mom2"],
                           sample_size=mom2_n_samples, precision=mom2_dtype, hparams=hparams,
                           force_recompute=force_recompute)
        COV_CACHE[key] = stat.mom2.moment().float().to("cpu")
    return torch.inverse(COV_CACHE[key]) if inv else COV_CACHE[key]


def get_project(model, tok, layer, hparams):
    cov = get_cov(model, tok, hparams.rewrite_module_tmp.format(layer), hparams.mom2_dataset, hparams.mom2_n_samples,
                  hparams.mom2_dtype, hparams=hparams).cpu()
    U, S, _ = torch.linalg.svd(cov, full_matrices=False)
    small = (S < hparams.nullspace_threshold).nonzero(as_tuple=True)[0]
    return U[:, small] @ U[:, small].T


def get_context_templates(model, tok):
    global CONTEXT_TEMPLATES_CACHE
    if CONTEXT_TEMPLATES_CACHE is None:
        CONTEXT_TEMPLATES_CACHE = [["{}"], ["The a. {}", "I b. {}"]]
    return CONTEXT_TEMPLATES_CACHE

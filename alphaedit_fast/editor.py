"""apply_AlphaEdit_to_model: validate everything, edit every layer or none (DESIGN steps 3-5)."""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .arch import get_module, key_width, stores_keys_first
from .errors import InvalidRequestError, ModelStructureError, ShapeError, require_finite
from .hparams import AlphaEditHyperParams
from .keys import compute_ks, get_module_input_output_at_words
from .modelstate import frozen, restore_on_error
from .positions import split_template
from .requests import normalize_requests
from .solve import dense_update
from .templates import get_context_templates
from .values import compute_z

log = logging.getLogger(__name__)


def as_hparams(hparams: Any) -> AlphaEditHyperParams:
    """Our hyper-parameters from ours, a dict, or any object with the original's attributes."""
    if isinstance(hparams, AlphaEditHyperParams):
        return hparams
    if isinstance(hparams, dict):
        return AlphaEditHyperParams.from_dict(hparams)
    return AlphaEditHyperParams.from_dict(dict(vars(hparams)))


def check_model(model, hparams: AlphaEditHyperParams) -> list[torch.nn.Module]:
    """Every module the edit touches exists; returns the rewrite modules, one per layer."""
    z_layer = hparams.layers[-1]
    for name in (hparams.layer_module_tmp.format(z_layer),
                 hparams.layer_module_tmp.format(max(hparams.v_loss_layer, z_layer)),
                 hparams.ln_f_module, hparams.lm_head_module):
        get_module(model, name)
    modules = [get_module(model, hparams.rewrite_module_tmp.format(layer)) for layer in hparams.layers]
    widths = {key_width(m) for m in modules}
    if len(widths) != 1:
        raise ModelStructureError(f"rewrite modules of layers {hparams.layers} differ in input width: {widths}")
    return modules


def check_context_templates(context_templates) -> list[list[str]]:
    if not context_templates or not all(isinstance(g, (list, tuple)) and g for g in context_templates):
        raise InvalidRequestError("context_templates must be a non-empty list of non-empty lists of strings")
    for group in context_templates:
        for template in group:
            split_template(template)
    return [list(g) for g in context_templates]


def layer_stack(value: torch.Tensor | None, n_layers: int, d_k: int, name: str, fill: str) -> torch.Tensor:
    """Validate P or cache_c, shaped (n_layers, d_k, d_k); None becomes identity or zeros."""
    if value is None:
        if fill == "identity":
            warnings.warn("P=None: editing without a null-space constraint (P = I)", stacklevel=3)
            return torch.eye(d_k).expand(n_layers, d_k, d_k)
        return torch.zeros(n_layers, d_k, d_k)
    if not isinstance(value, torch.Tensor):
        value = torch.as_tensor(np.asarray(value))
    if tuple(value.shape) != (n_layers, d_k, d_k):
        raise ShapeError(
            f"{name} must have shape (len(layers), d_k, d_k) = {(n_layers, d_k, d_k)}, got {tuple(value.shape)}"
        )
    require_finite(value, name)
    return value


def z_cache_path(cache_template: str | None, hparams: AlphaEditHyperParams, request) -> Path | None:
    if cache_template is None:
        return None
    if "case_id" not in request:
        raise InvalidRequestError("cache_template needs a case_id in every request")
    return Path(str(cache_template).format(hparams.layers[-1], hparams.clamp_norm_factor, request["case_id"]))


def load_or_compute_z(model, tok, request, hparams, context_templates, cache_template) -> torch.Tensor:
    """z for one request, read from / written to the original's `.npz` cache when given."""
    path = z_cache_path(cache_template, hparams, request)
    if path is not None and path.exists():
        try:
            with np.load(path, allow_pickle=False) as data:
                return torch.from_numpy(data["v_star"])
        except (OSError, KeyError, ValueError) as err:
            log.warning("ignoring unreadable z cache %s (%s); recomputing", path, err)
    z = compute_z(model, tok, request, hparams, hparams.layers[-1], context_templates)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz")
        with os.fdopen(fd, "wb") as f:
            np.savez(f, v_star=z.detach().cpu().numpy())
        os.replace(tmp, path)
    return z


def apply_AlphaEdit_to_model(  # noqa: N802 - the original's name
    model, tok, requests: Sequence[dict], hparams, cache_template: str | None = None,
    cache_c: torch.Tensor | None = None, P: torch.Tensor | None = None,
    context_templates: list[list[str]] | None = None,
) -> tuple[torch.nn.Module, torch.Tensor]:
    """Edit `model` in place with AlphaEdit; returns (model, updated cache_c).

    P, cache_c: (len(layers), d_k, d_k), as the original expects (P=None: no null-space
    constraint; cache_c=None: zeros). Neither they nor `requests` are modified: the new cache
    is returned. Everything is validated before the first weight changes, and if anything
    fails part-way every weight is restored.
    """
    hparams = as_hparams(hparams)
    requests = normalize_requests(requests)
    modules = check_model(model, hparams)
    d_k, n_layers = key_width(modules[0]), len(hparams.layers)
    P = layer_stack(P, n_layers, d_k, "P", "identity")
    cache_c = layer_stack(cache_c, n_layers, d_k, "cache_c", "zeros")
    if context_templates is None:
        context_templates = get_context_templates(model, tok)
    context_templates = check_context_templates(context_templates)
    z_layer = hparams.layers[-1]

    with frozen(model), restore_on_error([m.weight for m in modules]):
        zs = torch.stack([
            load_or_compute_z(model, tok, r, hparams, context_templates, cache_template).float().cpu()
            for r in requests
        ], dim=1)  # (d_model, n)
        require_finite(zs, "target values z")
        for i, (layer, module) in enumerate(zip(hparams.layers, modules)):
            device = module.weight.device
            keys = compute_ks(model, tok, requests, hparams, layer, context_templates).T.to(device)
            cur_zs = get_module_input_output_at_words(
                model, tok, z_layer, [r["prompt"] for r in requests], [r["subject"] for r in requests],
                hparams.layer_module_tmp, hparams.fact_token,
            )[1].T.float().to(device)
            resid = (zs.to(device) - cur_zs) / (n_layers - i)
            upd = dense_update(P[i].to(device), keys, cache_c[i].to(device), resid, hparams.L2)
            require_finite(upd, f"weight update of layer {layer}")
            log.info("layer %d: |W| %.4g, |dW| %.4g", layer, module.weight.norm(), upd.norm())
            with torch.no_grad():
                module.weight.add_((upd if stores_keys_first(module) else upd.T).to(module.weight.dtype))

        new_cache = cache_c.clone()
        for i, layer in enumerate(hparams.layers):
            keys = compute_ks(model, tok, requests, hparams, layer, context_templates).T
            new_cache[i] += (keys @ keys.T).to(new_cache.device, new_cache.dtype)
        require_finite(new_cache, "updated cache_c")
    return model, new_cache

"""Opt-in norm anchors for the target values (NAS, "Norm Anchors Make Model Edits Last";
`"norm_anchor"` in the hyper-parameters).

After a request's z optimisation, its target MLP output at the z layer, v* = v0 + delta (v0: the
MLP output at the lookup token of its first rewriting prompt), is rescaled to a reference norm,
and an edit whose ||v*|| is above twice the reference keeps v* = v0 (delta = 0: "keep the current
output"; its key still enters the solve, as in NAS's code). z = h0 - v0 + v*. The reference is a
trimmed mean of ||v*|| over a sample of rewrites optimised on their bare prompts (the largest 5%
left out), computed once per model, layers and hyper-parameters and cached (`reference_norm`).
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from pathlib import Path

import torch

from .arch import get_module
from .errors import HyperParamsError
from .hparams import NORM_ANCHOR_KEY, AlphaEditHyperParams
from .trace import hidden_of, read_modules

DROP_RATIO = 2.0  # NAS: an edit with ||v*|| above DROP_RATIO x reference keeps v0
TRIM_QUANTILE = 0.95  # NAS: the reference leaves out the largest (1 - TRIM_QUANTILE) of the sample's norms
EPS = 1e-10


def anchor_values(zs: torch.Tensor, h0: torch.Tensor, v0: torch.Tensor, reference: float) -> torch.Tensor:
    """The anchored z of each request (n, d): zs, h0 (block output at the lookup token) and v0 (MLP
    output there), all (n, d) fp32."""
    v_star = v0 + (zs - h0)
    norms = v_star.norm(dim=-1, keepdim=True)
    anchored = torch.where(norms > DROP_RATIO * reference, v0, v_star * (reference / (norms + EPS)))
    return h0 - v0 + anchored


def lookup_outputs(model, tok, requests: Sequence[dict], hparams: AlphaEditHyperParams, context_templates
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(h0, v0), each (n, d) fp32: block `layers[-1]`'s output and its MLP's output at the lookup
    token of each request's first rewriting prompt (its first context template, the prompt and
    the target's tokens but the last), in one batched pass."""
    from .values import _prepare

    device = model.get_input_embeddings().weight.device
    batch = _prepare(tok, requests, context_templates, hparams.fact_token, device)
    rows, positions = batch.first_rows, batch.positions[batch.first_rows]
    seen = {}

    def reader(key):
        def read(x, output):  # the pass runs only the first rewriting rows
            hidden = hidden_of(output)
            seen[key] = hidden[torch.arange(len(rows), device=hidden.device), positions.to(hidden.device)].float()
        return read

    layer = hparams.layers[-1]
    readers = {hparams.layer_module_tmp.format(layer): reader("h0"), hparams.mlp_module_tmp.format(layer): reader("v0")}
    read_modules(model, batch.input_ids[rows], batch.attention_mask[rows], readers)
    return seen["h0"], seen["v0"]


def check_norm_anchor(model, hparams: AlphaEditHyperParams) -> None:
    """HyperParamsError where norm anchors are not defined: no MLP module template, or blocks that
    normalise the MLP output before adding it (Gemma 2/3: there z - v0 is not the rest of the residual)."""
    from .validation import post_mlp_norms

    if not hparams.mlp_module_tmp:
        raise HyperParamsError(f"{NORM_ANCHOR_KEY} reads the MLP output: give mlp_module_tmp in the hyper-parameters")
    get_module(model, hparams.mlp_module_tmp.format(hparams.layers[-1]))
    if post_mlp_norms(model, hparams):
        raise HyperParamsError(f"{NORM_ANCHOR_KEY} anchors v* = v0 + delta, the MLP output added to the residual; "
                               f"{type(model).__name__} normalises the MLP output first (a post-MLP norm), where "
                               "that does not hold: edit without it")


def sample_norms(model, tok, requests: Sequence[dict], hparams: AlphaEditHyperParams, batch_size: int | None = None,
                 progress: bool = False) -> torch.Tensor:
    """||v0 + delta|| of each request (n,), its z optimised on the bare prompt alone (NAS's sample)."""
    from .values import optimise_zs

    templates = [["{}"]]
    zs = optimise_zs(model, tok, list(requests), hparams, hparams.layers[-1], templates, batch_size, progress)
    h0, v0 = lookup_outputs(model, tok, requests, hparams, templates)
    return (v0 + zs.to(h0.device) - h0).norm(dim=-1)


def trimmed_mean(norms: torch.Tensor, quantile: float = TRIM_QUANTILE) -> float:
    """The mean of the smallest norms, the largest floor((1 - quantile) n) left out (NAS's reference)."""
    ordered = norms.double().sort().values
    keep = len(ordered) - int((1 - quantile) * len(ordered))
    return float(ordered[:keep].mean())


def reference_norm(model, tok, requests: Sequence[dict], hparams: AlphaEditHyperParams, samples: int = 1000,
                   seed: int = 0, cache_dir=None, batch_size: int | None = None, progress: bool = False) -> float:
    """The reference ||v*|| of `model` at `hparams.layers[-1]`: `trimmed_mean` of `sample_norms` over
    `samples` requests drawn with random.Random(seed) from `requests` (all of them when fewer).
    Cached in `cache_dir` (default: the project's cache) under a fingerprint of the model (its
    embedding and edited weights, `storage.model_fingerprint`), the hyper-parameters and the sample."""
    from .requests import normalize_requests
    from .storage import cache_root, model_fingerprint

    requests = normalize_requests(requests)
    if not requests:
        raise HyperParamsError(f"{NORM_ANCHOR_KEY}: the reference norm needs a sample of rewrites, got none")
    sample = random.Random(seed).sample(requests, min(samples, len(requests)))
    settings = {k: v for k, v in hparams.to_dict().items() if k != NORM_ANCHOR_KEY}
    layer = hparams.layers[-1]
    names = [hparams.rewrite_module_tmp.format(l) for l in hparams.layers]
    key = hashlib.sha256(json.dumps({"model": model_fingerprint(model, names), "hparams": settings,
                                     "sample": sample, "quantile": TRIM_QUANTILE}, sort_keys=True,
                                    default=str).encode()).hexdigest()[:32]
    path = Path(cache_dir) if cache_dir is not None else cache_root() / "norm-anchors"
    path = path / f"vstar-norm-{key}.json"
    if path.is_file():
        return float(json.loads(path.read_text())["reference"])
    norms = sample_norms(model, tok, sample, hparams, batch_size, progress)
    value = trimmed_mean(norms)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps({"reference": value, "layer": layer, "samples": len(sample),
                                     "mean": float(norms.double().mean()), "quantile": TRIM_QUANTILE}))
    temporary.replace(path)
    return value


def resolve_norm_anchor(model, tok, hparams: AlphaEditHyperParams, requests: Sequence[dict],
                        progress: bool = False) -> AlphaEditHyperParams:
    """`hparams` with `"norm_anchor": "auto"` replaced by `reference_norm` over a sample of
    `requests` (`hparams.norm_anchor_samples` of them; cached); `hparams` itself otherwise."""
    if hparams.norm_anchor != "auto":
        return hparams
    check_norm_anchor(model, hparams)
    samples = hparams.norm_anchor_samples
    if progress:
        print(f"norm_anchor auto: the reference norm of v* from {min(samples, len(requests))} of the requests "
              "(optimised on their bare prompts; cached)", flush=True)
    value = reference_norm(model, tok, requests, hparams, samples, progress=progress)
    resolved = AlphaEditHyperParams.from_dict({**hparams.to_dict(), NORM_ANCHOR_KEY: value})
    if progress:
        print(f"norm_anchor: {value:.6g}", flush=True)
    return resolved

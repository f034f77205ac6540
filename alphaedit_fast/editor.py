"""apply_AlphaEdit_to_model: validate everything, edit every layer or none (DESIGN steps 3-5)."""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
import weakref
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .anchors import anchor_values, check_norm_anchor, lookup_outputs
from .arch import key_width, stores_keys_first
from .errors import InvalidArgumentError, InvalidRequestError, ShapeError, require_finite
from .hparams import AlphaEditHyperParams
from .keys import KeyPasses, get_module_input_output_at_words
from .modelstate import frozen, restore_on_error
from .projector import ProjectorBases, basis_from_projector, check_projector_model
from .requests import normalize_requests
from .sharding import Shard, check_replicas, current_shard, weights_digest
from .solve import DenseSolver, FactoredDenseSolver, ProjectedSolver
from .storage import StatsFileError, load_tensors, model_fingerprint, require_tensors, save_tensors, umask_mode
from .templates import get_context_templates
from .timing import Phases, progress_line
from .validation import (
    as_bases,
    as_hparams,
    check_context_templates,
    check_model,
    check_options,
    check_projector,
    check_requests_for_model,
    layer_stack,
    model_width,
    post_mlp_norms,
)
from .values import optimise_zs_and_keys

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ZCacheFiles:
    """Where the z of each request is cached: `path_of(request)` and the `.npz` entry holding it
    (the original's `cache_template` files hold "v_star"; the authors' package's hold "target")."""

    path_of: Callable[[dict], Path]
    entry: str = "v_star"


def z_cache_files(cache: str | ZCacheFiles | None, hparams: AlphaEditHyperParams) -> ZCacheFiles | None:
    """The original's `cache_template` (formatted with the z layer, clamp_norm_factor and
    case_id) as `ZCacheFiles`; a `ZCacheFiles` or None as given."""
    if cache is None or isinstance(cache, ZCacheFiles):
        return cache
    return ZCacheFiles(lambda request: z_cache_path(cache, hparams, request))


def z_cache_path(cache_template: str | None, hparams: AlphaEditHyperParams, request) -> Path | None:
    if cache_template is None:
        return None
    if "case_id" not in request:
        raise InvalidRequestError("cache_template needs a case_id in every request")
    return Path(str(cache_template).format(hparams.layers[-1], hparams.clamp_norm_factor, request["case_id"]))


def target_values(model, tok, requests, hparams, context_templates, cache: ZCacheFiles | None, z_batch_size, progress
                  ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """z of every request (d_model, n) fp32: read from the `cache` files that exist, the rest
    optimised together by `compute_zs` and written there. Also the first
    layer's keys (n, d_k) and block L's output at the plain prompts (n, d_model), when the z
    pass read them (every z computed, prompts that allow it), else None."""
    paths = [cache.path_of(r) if cache is not None else None for r in requests]
    d_model = model_width(model)
    zs: list[torch.Tensor | None] = [None] * len(requests)
    for i, path in enumerate(paths):
        if path is not None and path.exists():
            zs[i] = read_cached_z(path, d_model, cache.entry)
    todo = [i for i, z in enumerate(zs) if z is None]
    first = None
    if todo:
        computed, keys, z_out = optimise_zs_and_keys(
            model, tok, [requests[i] for i in todo], hparams, hparams.layers[-1], context_templates,
            batch_size=z_batch_size, progress=progress, key_layer=hparams.layers[0])
        if keys is not None and len(todo) == len(requests):
            first = (keys, z_out)
        if hparams.norm_anchor is not None:
            h0, v0 = lookup_outputs(model, tok, [requests[i] for i in todo], hparams, context_templates)
            computed = anchor_values(computed.to(h0.device), h0, v0, hparams.norm_anchor)
        for i, z in zip(todo, computed):
            zs[i] = z.cpu()
            if paths[i] is not None:
                save_npz_atomically(paths[i], **{cache.entry: zs[i].numpy()})
    return torch.stack(zs, dim=1), first


def read_cached_z(path: Path, d_model: int, entry: str = "v_star") -> torch.Tensor | None:
    """z (d_model,) fp32 from the `entry` of a z-cache file, or None (with a warning) when the
    file is truncated, malformed, of another width or not finite: it is then recomputed."""
    try:
        with np.load(path, allow_pickle=False) as data:
            z = torch.from_numpy(np.array(data[entry], dtype=np.float32))
        if tuple(z.shape) != (d_model,) or not bool(torch.isfinite(z).all()):
            raise ValueError(f"{entry} has shape {tuple(z.shape)}, expected ({d_model},) with finite values")
        return z
    except (OSError, EOFError, KeyError, ValueError, TypeError, zipfile.BadZipFile) as err:
        warnings.warn(f"ignoring unreadable z cache {path} ({type(err).__name__}: {err}); recomputing it",
                      stacklevel=4)
        return None


def save_npz_atomically(path: Path, **arrays) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz")
    with os.fdopen(fd, "wb") as f:
        np.savez(f, **arrays)
    os.chmod(tmp, umask_mode(0o666))
    os.replace(tmp, path)


def check_edit(model, tok, requests: list[dict], hparams: AlphaEditHyperParams, context_templates,
               cache_template: str | ZCacheFiles | None, z_batch_size) -> None:
    """Everything about one batch of edits that can be checked before any work starts."""
    hparams.validate()  # fields may have been set since construction (run_edit then checks the model)
    check_requests_for_model(model, tok, requests, context_templates)
    check_options(z_batch_size=z_batch_size)
    if hparams.norm_anchor is not None:
        if hparams.norm_anchor == "auto":
            raise InvalidArgumentError("norm_anchor 'auto': compute the reference norm first, "
                                       "anchors.reference_norm(model, tok, sample_requests, hparams), and put it "
                                       "in the hyper-parameters (the CLI's edit and eval do this from --requests)")
        check_norm_anchor(model, hparams)
    cache = z_cache_files(cache_template, hparams)
    for request in requests if cache is not None else []:
        cache.path_of(request)


def run_edit(model, tok, requests, hparams: AlphaEditHyperParams, context_templates, solver, *,
             cache_template: str | ZCacheFiles | None = None, z_batch_size: int | None = None, progress: bool = False,
             timings: dict[str, float] | None = None, peak_bytes: dict[str, int] | None = None,
             shard: Shard | None = None) -> dict[int, torch.Tensor]:
    """DESIGN steps 3-5 on inputs `check_edit` has passed; `solver` gives each layer's update and absorbs the
    new keys (solve.DenseSolver or solve.ProjectedSolver). Returns {layer: update (d_k, d_model)}.

    Either every layer is edited and the solver has absorbed the keys, or the weights are
    restored and the error propagates. With `progress`: a bar of the z steps, then a line per
    layer (keys, solve) and one for the cache update, on stderr. With a `shard` (data-parallel,
    `sharding.Shard`), this rank computes z and keys for its slice of `requests` only; the slices
    are gathered in request order and every rank applies rank 0's update and solver state.
    """
    modules = check_model(model, hparams)
    n, n_layers = len(requests), len(hparams.layers)
    progress = progress and (shard is None or shard.rank == 0)
    phase = Phases(model.get_input_embeddings().weight.device, timings, peak_bytes)
    mine = shard.local(requests) if shard else list(requests)
    rows_dtype = torch.promote_types(modules[0].weight.dtype, torch.float32)  # gathered exactly

    def gathered(rows: torch.Tensor | None, width: int, what: str) -> torch.Tensor:
        """(n, width): every rank's rows in request order (this rank's alone without a shard)."""
        if shard is None:
            return rows
        rows = rows.to(rows_dtype) if rows is not None else torch.zeros(0, width, dtype=rows_dtype)
        return shard.gather_rows(rows, n, what)

    d_k, d_model = key_width(modules[0]), model_width(model)
    updates = {}
    with frozen(model), restore_on_error([m.weight for m in modules]):
        with phase("z"):
            zs, first = (target_values(model, tok, mine, hparams, context_templates,
                                       z_cache_files(cache_template, hparams), z_batch_size, progress)
                         if mine else (None, None))
            if shard is not None:
                zs = gathered(None if zs is None else zs.T, d_model, "target values z").T
                if all(shard.gather_objects(first is not None or not mine, "keys of the z pass")):
                    first = tuple(gathered(part if first else None, width, "keys of the z pass")
                                  for part, width in zip(first or (None, None), (d_k, d_model)))
                else:
                    first = None
            require_finite(zs, "target values z")
        with phase("keys"):
            passes = KeyPasses(model, tok, mine, hparams, context_templates, with_z_output=True) if mine else None

        def read(layers_read, **kwargs) -> tuple[list[torch.Tensor], torch.Tensor | None]:
            keys, outputs = passes.read(layers_read, **kwargs) if passes else ([None] * len(layers_read), None)
            keys = [gathered(k, d_k, f"keys of layer {layer}") for k, layer in zip(keys, layers_read)]
            if kwargs.get("with_z_output"):
                outputs = gathered(outputs, d_model, "block outputs at the prompts")
            return keys, outputs

        layers = hparams.layers
        post_norms = post_mlp_norms(model, hparams) if hparams.maps_post_mlp_norm else {}
        for i, (layer, module) in enumerate(zip(layers, modules)):
            device = module.weight.device
            before = dict(phase.seconds)
            with phase("keys"):
                if i == 0 and first is not None:  # read in the z pass (the subject lies before the target)
                    (keys, cur_zs), first = first, None
                else:
                    # Editing layers[i-1] changed nothing before its block: restart there. Block
                    # layers[0]'s input never changes; the cache update restarts from it too.
                    (keys,), cur_zs = read([layer], with_z_output=True, resume_at=layers[i - 1] if i else None,
                                           keep_inputs_of=sorted({layers[0], layer}))
                    if i > 1 and passes:
                        passes.drop_input(layers[i - 1])
                if layer in post_norms:
                    mlp_out = get_module_input_output_at_words(
                        model, tok, layer, [r["prompt"] for r in mine], [r["subject"] for r in mine],
                        hparams.rewrite_module_tmp, hparams.fact_token)[1] if mine else None
                    mlp_out = gathered(mlp_out, d_model, f"MLP outputs of layer {layer}")
            with phase("solve"):
                resid = (zs.to(device) - cur_zs.T.to(device)) / (n_layers - i)
                if layer in post_norms:
                    resid = through_post_mlp_norm(resid, mlp_out.to(device), post_norms[layer])
                upd = solver.update(i, keys.T.to(device), resid)
                if shard is not None:  # one update for all replicas, whatever each rank's BLAS did
                    shard.broadcast_(upd, f"update of layer {layer}")
                require_finite(upd, f"weight update of layer {layer}")
                log.info("layer %d: |W| %.4g, |dW| %.4g", layer, module.weight.norm(), upd.norm())
                with torch.no_grad():
                    module.weight.add_((upd if stores_keys_first(module) else upd.T).to(module.weight.dtype))
            updates[layer] = upd
            if progress:
                progress_line(f"layer {layer}: {phase.since(before, 'keys', 'solve')}")
        if shard is not None:
            shard.require_same(weights_digest([m.weight for m in modules]), "edited weights after the batch")
        before = dict(phase.seconds)
        with phase("cache update"):
            keys_after, _ = read(layers, resume_at=layers[0])
            solver.absorb([k.T.to(m.weight.device) for k, m in zip(keys_after, modules)])
            if shard is not None:
                state = solver.state_tensors(layers) if hasattr(solver, "state_tensors") else {"": solver.new_cache}
                for name, tensor in sorted(state.items()):
                    shard.broadcast_(tensor, f"editor state {name}".strip())
        if progress:
            progress_line(phase.since(before, "cache update"))
    return updates


def through_post_mlp_norm(resid: torch.Tensor, mlp_out: torch.Tensor, norm: torch.nn.Module) -> torch.Tensor:
    """The change of the MLP output (d_model, n) that moves `norm`'s output as close as it can go
    to its current value + `resid` (d_model, n), for an RMS norm (Gemma's post_feedforward_layernorm):
    norm(m) = g * m / rms(m) can only reach g * u with rms(u) = 1, so u = argmin ||g * u - target||
    over rms(u) = 1 (`closest_unit_rms`), and the MLP output becomes the multiple of u nearest to
    the current one. mlp_out: the MLP output at the lookup positions (n, d_model); g = norm(1, ...,
    1), the norm's gain."""
    with torch.no_grad():
        gain = norm(torch.ones(1, resid.shape[0], device=resid.device, dtype=mlp_out.dtype)).double()[0]
    m = mlp_out.double().T
    target = gain[:, None] * m / m.pow(2).mean(0).sqrt() + resid.double()
    u = closest_unit_rms(gain, target)
    scale = ((u * m).sum(0) / u.pow(2).sum(0).clamp_min(1e-300)).clamp_min(0)
    return (scale * u - m).to(resid.dtype)


def closest_unit_rms(gain: torch.Tensor, target: torch.Tensor, iterations: int = 200) -> torch.Tensor:
    """u (d, n) minimising ||gain * u - target|| per column subject to mean(u^2) = 1: u = gain *
    target / (gain^2 + mu), with mu per column found by bisection (mean(u^2) falls as mu grows)."""
    gt = gain[:, None] * target
    g2 = gain.pow(2)[:, None]
    moved = gt != 0
    low = torch.where(moved, -g2, torch.full_like(gt, -torch.inf)).amax(0)  # mean(u^2) -> inf as mu -> low
    high = gt.pow(2).mean(0).sqrt().clamp_min(1e-300) + low.clamp_min(0)  # there mean(u^2) <= 1
    u = lambda mu: torch.where(moved, gt / (g2 + mu), torch.zeros_like(gt))  # noqa: E731
    for _ in range(iterations):
        mu = (low + high) / 2
        too_long = u(mu).pow(2).mean(0) > 1
        low, high = torch.where(too_long, mu, low), torch.where(too_long, high, mu)
    return u(high)


# id(P) -> (weak reference to P, P's in-place version, bases or the number of dense calls so far);
# tensors cannot be dict keys by value
_FACTORED: dict[int, tuple[weakref.ref, int, list[torch.Tensor] | None | int]] = {}
DENSE_CALLS_BEFORE_FACTORING = 3


def factored_projector(P: torch.Tensor, devices: list[torch.device]) -> list[torch.Tensor] | None:
    """U per layer with U U^T = P[i], on each layer's device, or None: solve densely.

    Factoring costs about three dense solves at d_k = 3072 (2 CPU cores: 1.7 s against 0.55 s
    per layer) and up to ten at d_k = 1024, so a P is factored only once it has paid that much in
    dense solves: the first DENSE_CALLS_BEFORE_FACTORING calls with a P tensor get None and
    solve as the original does; the next call with the same tensor, unchanged in place, factors
    it, and later calls reuse the factors. None also when some P[i] is not an orthogonal projector."""
    key = id(P)
    ref, version, cached = _FACTORED.get(key, (None, None, None))
    if ref is None or ref() is not P or version != P._version:
        ref, version, cached = weakref.ref(P, lambda _: _FACTORED.pop(key, None)), P._version, 0
    if isinstance(cached, int):
        if cached < DENSE_CALLS_BEFORE_FACTORING:
            _FACTORED[key] = (ref, version, cached + 1)
            return None
    else:
        return cached
    bases: list[torch.Tensor] | None = []
    for layer_P, device in zip(P, devices):
        # fp64 on the CPU; on a GPU fp32 suffices: a projector's eigenvalues are 0 or 1, far apart
        work = layer_P.to(device, torch.float32 if device.type == "cuda" else torch.float64)
        basis = basis_from_projector(work, tolerance=1e-3)
        if basis is None:
            bases = None
            break
        bases.append(basis.float())
    _FACTORED[key] = (ref, version, bases)
    return bases


def apply_AlphaEdit_to_model(  # noqa: N802 - the original's name
    model, tok, requests: Sequence[dict], hparams, cache_template: str | None = None,
    cache_c: torch.Tensor | None = None, P: torch.Tensor | None = None,
    context_templates: list[list[str]] | None = None, solver: str = "auto", **options,
) -> tuple[torch.nn.Module, torch.Tensor]:
    """Edit `model` in place with AlphaEdit; returns (model, updated cache_c).

    P, cache_c: (len(layers), d_k, d_k) tensors, arrays or nested lists, as the original expects
    (P=None: no null-space constraint; cache_c=None: zeros); P must be a symmetric idempotent
    projector U0 U0^T, as the original's always is. `solver="auto"` solves as the original on the
    first DENSE_CALLS_BEFORE_FACTORING calls with a P tensor (a zero cache_c needs only an n x n
    solve, `solve.zero_cache_update`) and in the null space from the next one on (P's factors are
    cached per tensor, see `factored_projector`); `solver="dense"` always uses the original's dense
    form. Neither they nor `requests` are modified: the new cache is returned. Everything is validated before the first
    weight changes, and if anything fails part-way every weight is restored. `options`:
    z_batch_size, progress, timings (see `run_edit`), distributed (see `AlphaEditor`). For many sequential batches use
    `AlphaEditor`, which keeps a factored projector on the device and solves in the null space.
    """
    hparams = as_hparams(hparams)
    requests = normalize_requests(requests)
    modules = check_model(model, hparams)
    if solver not in ("auto", "dense"):
        raise InvalidArgumentError(f"solver must be 'auto' or 'dense', got {solver!r}")
    unknown = sorted(set(options) - {"z_batch_size", "progress", "timings", "distributed"})
    if unknown:
        raise InvalidArgumentError(f"unknown option(s) {unknown}; apply_AlphaEdit_to_model takes z_batch_size, "
                                   "progress, timings and distributed besides the original's arguments")
    shard = current_shard(options.pop("distributed", None))
    d_k, n_layers = key_width(modules[0]), len(hparams.layers)
    constrained = P is not None
    P = layer_stack(P, n_layers, d_k, "P", "identity")  # the caller's tensor itself when valid
    if constrained:
        check_projector(P)
    cache_c = layer_stack(cache_c, n_layers, d_k, "cache_c", "zeros")
    context_templates = check_context_templates(
        context_templates if context_templates is not None else get_context_templates(model, tok))
    check_edit(model, tok, requests, hparams, context_templates, cache_template, options.get("z_batch_size"))
    if shard is not None:
        check_replicas(shard, model, [hparams.rewrite_module_tmp.format(l) for l in hparams.layers], hparams,
                       requests, context_templates)
    bases = None
    if solver == "auto" and constrained:
        bases = factored_projector(P, [m.weight.device for m in modules])
    layer_solver = (DenseSolver(P, cache_c, hparams.L2, original_form=solver == "dense") if bases is None
                    else FactoredDenseSolver(bases, P, cache_c, hparams.L2))
    run_edit(model, tok, requests, hparams, context_templates, layer_solver, cache_template=cache_template,
             shard=shard, **options)
    require_finite(layer_solver.new_cache, "updated cache_c")
    return model, layer_solver.new_cache


class AlphaEditor:
    """Sequential AlphaEdit on one model: keeps each layer's factored projector U (d_k, r) and
    projected cache U^T C U (r, r) on that layer's device, and solves in the null space.

    projector: per-layer bases U with orthonormal columns (a list of (d_k, r) tensors or arrays,
    e.g. from `nullspace_basis`, or a {layer: U} dict such as `load_projector` returns), or
    dense P (len(layers), d_k, d_k) as the original uses (a tensor, array or nested list; factored
    once here), or None for no constraint (U = I). cache_c: optional dense (len(layers), d_k, d_k)
    starting cache. solver: "auto" (Woodbury when keys are few against r, else Cholesky),
    "cholesky", "woodbury"; solve_dtype: torch.float32 or torch.float64.
    A projector read by `load_projector` must be for this model (or an edited descendant)
    unless `allow_foreign_projector=True`.

    distributed: None (default) edits data-parallel when torch.distributed is initialised with
    several ranks (`torchrun`): every rank calls `edit` with the same requests, optimises z and
    reads keys for its slice, and all end with rank 0's update (`sharding`); False edits in this
    process alone; True requires a process group.
    """

    def __init__(self, model, tok, hparams, projector=None, cache_c: torch.Tensor | None = None,
                 context_templates: list[list[str]] | None = None, solver: str = "auto",
                 solve_dtype: torch.dtype = torch.float32, z_batch_size: int | None = None, progress: bool = False,
                 allow_foreign_projector: bool = False, distributed: bool | None = None):
        self.model, self.tok, self.hparams = model, tok, as_hparams(hparams)
        self.distributed = distributed
        self.modules = check_model(model, self.hparams)
        solve_dtype = check_options(solver, z_batch_size, solve_dtype)
        if isinstance(projector, ProjectorBases):
            check_projector_model(projector, model, allow_foreign_projector)
        d_k, n_layers = key_width(self.modules[0]), len(self.hparams.layers)
        devices = [m.weight.device for m in self.modules]
        bases = self._bases(projector, self.hparams.layers, d_k)
        bases = [u.to(device, solve_dtype) for u, device in zip(bases, devices)]
        empty = [layer for layer, u in zip(self.hparams.layers, bases) if u.shape[1] == 0]
        if empty:
            warnings.warn(f"the null space of layer(s) {empty} is empty: edits there change nothing; raise the "
                          "projector's threshold or check the statistics", stacklevel=2)
        cache_proj = None
        if cache_c is not None:
            cache_c = layer_stack(cache_c, n_layers, d_k, "cache_c", "zeros")
            cache_proj = [u.T @ c.to(u.device, u.dtype) @ u for u, c in zip(bases, cache_c)]
        self.solver = ProjectedSolver(bases, self.hparams.L2, solver, solve_dtype, cache_proj)
        self.context_templates = check_context_templates(
            context_templates if context_templates is not None else get_context_templates(model, tok))
        self.z_batch_size, self.progress = z_batch_size, progress
        self.num_edits = 0

    @staticmethod
    def _bases(projector, layers: list[int], d_k: int) -> list[torch.Tensor]:
        """Per-layer bases U (d_k, r) from any projector form the class docstring lists."""
        n_layers = len(layers)
        if projector is None:
            warnings.warn("projector=None: editing without a null-space constraint (U = I)", stacklevel=3)
            return [torch.eye(d_k)] * n_layers
        if isinstance(projector, (str, bytes, os.PathLike)):
            raise ShapeError(f"projector={str(projector)!r} is a path, but AlphaEditor takes tensors: read the file "
                             f"with load_projector(path, model), or use AlphaEditor.from_pretrained(..., "
                             f"projector=path)")
        bases = as_bases(projector, layers, d_k)
        if bases is None:  # a dense P, as the original's
            dense = layer_stack(projector, n_layers, d_k, "P", "identity")
            check_projector(dense)
            bases = [basis_from_projector(p) for p in dense]
        return bases

    def edit(self, requests: Sequence[dict], cache_template: str | None = None,
             peak_bytes: dict[str, int] | None = None) -> dict[str, float]:
        """Apply one batch of edits in place; returns the seconds spent per phase. A `peak_bytes`
        dict receives each phase's peak memory (`timing.peak_memory_bytes`)."""
        requests = normalize_requests(requests)
        shard = current_shard(self.distributed)
        check_edit(self.model, self.tok, requests, self.hparams, self.context_templates, cache_template,
                   self.z_batch_size)
        if shard is not None:
            check_replicas(shard, self.model, self._names(), self.hparams, requests,
                           self.context_templates)
        timings: dict[str, float] = {}
        run_edit(self.model, self.tok, requests, self.hparams, self.context_templates, self.solver,
                 cache_template=cache_template, z_batch_size=self.z_batch_size, progress=self.progress,
                 timings=timings, peak_bytes=peak_bytes, shard=shard)
        self.num_edits += len(requests)
        return timings

    def _names(self) -> list[str]:
        return [self.hparams.rewrite_module_tmp.format(layer) for layer in self.hparams.layers]

    @classmethod
    def from_pretrained(cls, model, hparams=None, projector=None, stats=None, context_templates=None, *,
                        dtype=None, device=None, device_map=None, allow_foreign_projector: bool = False,
                        max_memory=None, **options) -> AlphaEditor:
        """An editor for a model by local directory or hub id, with its tokenizer, hyper-parameters
        (a preset name, file, dict, or None for the preset matching the model), projector (a file,
        bases, dense P or "identity") or statistics (a file or the original's `.npz` directory) and
        context templates (a JSON file or groups of strings). See `pretrained.load_for_editing`;
        `options` go to `AlphaEditor`. The editor's `model` and `tok` are the loaded ones."""
        from .pretrained import load_for_editing

        parts = load_for_editing(model, hparams, projector, stats, context_templates, dtype=dtype, device=device,
                                 device_map=device_map, allow_foreign_projector=allow_foreign_projector,
                                 max_memory=max_memory)
        return cls(**parts, allow_foreign_projector=allow_foreign_projector, **options)

    def edit_prompts(self, prompts, subject, target_new, ground_truth=None, rephrase_prompts=None,
                     locality_prompts=None, locality_ground_truth=None, batch_size: int | None = None) -> list[dict]:
        """Edit as EasyEdit's `BaseEditor.edit` is called, and measure before and after.

        Arguments are lists with one entry per edit (a string is one edit); `prompts` hold the
        subject itself (or `{}`), `rephrase_prompts` / `locality_prompts` may hold a string or a
        list per edit, with `locality_ground_truth` their answers. Edits run in sequential
        batches of `batch_size` (default: one batch). Returns per edit
        `{"case_id", "requested_rewrite", "num_edits", "pre", "post"}`, where pre/post hold `rates`:
        `efficacy` (token accuracy of target_new at the prompt), `paraphrase` (at the rephrase
        prompts) and `neighborhood` (of the locality answers), and the per-prompt NLLs and token
        flags (`evaluation.score_cases`).
        """
        from .evaluation import cases_from_lists, evaluate_edits

        cases = cases_from_lists(prompts, subject, target_new, ground_truth, rephrase_prompts, locality_prompts,
                                 locality_ground_truth)
        _, records = evaluate_edits(self, cases, "easyedit", batch_size or len(cases), log=lambda _: None)
        return records

    def dense_cache(self) -> torch.Tensor:
        """U Cp U^T per layer (len(layers), d_k, d_k) on the CPU: a cache_c for the original API
        that gives the same future updates (only its null-space part ever matters)."""
        return torch.stack([(u @ cp @ u.T).float().cpu() for u, cp in zip(self.solver.bases, self.solver.cache_proj)])

    STATE_KIND = "alphaeditor-state"

    def save_state(self, path) -> Path:
        """Write the projector bases, projected caches and edit count (safetensors, atomic), so a
        later run can go on editing with `AlphaEditor.from_state`."""
        tensors = {}
        for layer, basis, cache in zip(self.hparams.layers, self.solver.bases, self.solver.cache_proj):
            tensors[f"layer.{layer}.basis"], tensors[f"layer.{layer}.cache_proj"] = basis, cache
        names = self._names()
        return save_tensors(path, tensors, {
            "kind": self.STATE_KIND, "layers": self.hparams.layers, "num_edits": self.num_edits,
            "context_templates": self.context_templates, "model_fingerprint": model_fingerprint(self.model, names)})

    @classmethod
    def from_state(cls, model, tok, hparams, path, **options) -> AlphaEditor:
        """An editor that continues from `save_state`'s file; the model must be the edited one."""
        tensors, meta = load_tensors(path, cls.STATE_KIND, STATE_FIELDS)
        hparams = as_hparams(hparams)
        layers = meta["layers"]
        if layers != hparams.layers:
            raise StatsFileError(f"{path} holds layers {layers}, the hyper-parameters edit {hparams.layers}")
        require_tensors(path, tensors, [f"layer.{l}.{t}" for l in layers for t in ("basis", "cache_proj")])
        for l in layers:
            basis, cache = tensors[f"layer.{l}.basis"], tensors[f"layer.{l}.cache_proj"]
            if basis.ndim != 2 or cache.shape != (basis.shape[-1], basis.shape[-1]) or meta["num_edits"] < 0:
                raise StatsFileError(f"{path}: layer {l} holds a basis {tuple(basis.shape)} and a projected cache "
                                     f"{tuple(cache.shape)} that do not fit together; the file is not usable")
        names = [hparams.rewrite_module_tmp.format(layer) for layer in layers]
        if model_fingerprint(model, names) != meta["model_fingerprint"]:
            raise StatsFileError(f"{path} was saved with other weights: load the model edited in that run, "
                                 "in the dtype it was saved in or a wider one")
        editor = cls(model, tok, hparams, projector=[tensors[f"layer.{l}.basis"] for l in layers],
                     context_templates=meta["context_templates"], **options)
        editor.solver.cache_proj = [tensors[f"layer.{l}.cache_proj"].to(u.device, u.dtype)
                                    for l, u in zip(layers, editor.solver.bases)]
        editor.num_edits = meta["num_edits"]
        return editor


STATE_FIELDS = {"layers": list[int], "num_edits": int, "context_templates": list[list[str]], "model_fingerprint": str}

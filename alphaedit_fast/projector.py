"""Null-space projector (DESIGN step 6): eigendecomposition of a key covariance -> U0 (d, r).

The null space is spanned by the covariance's eigenvectors of small eigenvalue. Which are
"small" is set by exactly one rule: an absolute `threshold` (the original's
`nullspace_threshold`), a threshold `relative` to the largest eigenvalue, the `energy` fraction
of the trace the protected (non-null) directions must keep, or the `rank` of protected directions.
"""

from __future__ import annotations

import warnings

import torch

from .errors import InvalidRequestError, ModelStructureError, ShapeError, require_finite


def _eigh(cov: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    if cov.ndim != 2 or cov.shape[0] != cov.shape[1]:
        raise ShapeError(f"covariance must be a square (d, d) matrix, got shape {tuple(cov.shape)}")
    require_finite(cov, "covariance")
    sym = cov.to(dtype)
    return torch.linalg.eigh((sym + sym.T) / 2)  # ascending eigenvalues


def _null_mask(evals: torch.Tensor, threshold, relative, energy, rank) -> torch.Tensor:
    rules = {"threshold": threshold, "relative": relative, "energy": energy, "rank": rank}
    given = [k for k, v in rules.items() if v is not None]
    if len(given) != 1:
        raise InvalidRequestError(f"give exactly one of threshold, relative, energy, rank (got {given or 'none'})")
    d = evals.shape[0]
    if threshold is not None:
        return evals < threshold
    if relative is not None:
        return evals < relative * evals[-1].clamp(min=0)
    if rank is not None:
        if not 0 <= rank <= d:
            raise InvalidRequestError(f"rank must be in [0, {d}], got {rank}")
        protected = int(rank)
    else:
        if not 0.0 <= energy <= 1.0:
            raise InvalidRequestError(f"energy must be in [0, 1], got {energy}")
        kept = torch.cumsum(evals.clamp(min=0).flip(0), 0) / evals.clamp(min=0).sum().clamp(min=1e-300)
        protected = int((kept < energy).sum()) + (1 if energy > 0 else 0)
    mask = torch.ones(d, dtype=torch.bool, device=evals.device)
    mask[d - min(protected, d):] = False
    return mask


def nullspace_basis(cov: torch.Tensor, threshold: float | None = None, *, relative: float | None = None,
                    energy: float | None = None, rank: int | None = None,
                    compute_dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """U0: eigenvectors of `cov` (d, d) spanning its null space, as (d, r) in cov's dtype.

    Exactly one rule (see the module docstring). The eigendecomposition runs in `compute_dtype`
    (fp64 by default); for a symmetric PSD covariance the eigenvalues are its singular values,
    so `threshold` selects the same subspace as the original's SVD. Warns when the null space
    comes out empty (edits would change nothing) or full (no constraint at all).
    """
    evals, evecs = _eigh(cov, compute_dtype)
    mask = _null_mask(evals, threshold, relative, energy, rank)
    r = int(mask.sum())
    if r == 0:
        warnings.warn("the null space is empty: every direction is protected and edits will change nothing; "
                      "raise the threshold", stacklevel=2)
    elif r == cov.shape[0]:
        warnings.warn("the null space is the whole key space: edits are not constrained at all; "
                      "lower the threshold or check the statistics", stacklevel=2)
    return evecs[:, mask].to(cov.dtype)


def nullspace_projector(cov: torch.Tensor, threshold: float | None = None, **rule) -> torch.Tensor:
    """P = U0 U0^T (d, d) in cov's dtype: what the original's `get_project` returns for `cov`."""
    basis = nullspace_basis(cov.to(torch.float64), threshold, **rule)
    return (basis @ basis.T).to(cov.dtype)


def dense_projectors(bases: list[torch.Tensor]) -> torch.Tensor:
    """P per layer, (len(bases), d, d) on the CPU, for the original API."""
    return torch.stack([(u @ u.T).float().cpu() for u in bases])


def basis_from_projector(P: torch.Tensor, tolerance: float | None = None) -> torch.Tensor | None:
    """U (d, r) with orthonormal columns and U U^T = P, for a dense orthogonal projector P (d, d),
    in P's dtype (computed in fp64 on the CPU).

    Usually without an eigendecomposition (`range_basis`); `eigh` is the fallback. With
    `tolerance`, returns None unless every eigenvalue of P lies within `tolerance` of 0 or 1
    (P is not a projector, so no basis reproduces it).
    """
    if P.ndim != 2 or P.shape[0] != P.shape[1]:
        raise ShapeError(f"projector must be a square (d, d) matrix, got shape {tuple(P.shape)}")
    require_finite(P, "projector P")
    sym = P.to(torch.float64) if P.device.type == "cpu" else P
    sym = (sym + sym.T) / 2
    basis = range_basis(sym, RANGE_TOLERANCE if tolerance is None else tolerance)
    if basis is not None:
        return basis.to(P.dtype)
    evals, evecs = torch.linalg.eigh(sym)
    if tolerance is not None and not bool((torch.minimum(evals.abs(), (evals - 1).abs()) < tolerance).all()):
        return None
    return evecs[:, evals > 0.5].to(P.dtype)


# Accepting a QR basis: P U = U and P x = U U^T x to this accuracy, the same test `eigh`'s
# eigenvalues pass with `tolerance` (within it of 1 or 0); measured residuals for projectors stored in
# fp32 are ~5e-7 at d = 3072.
RANGE_TOLERANCE = 1e-3


def range_basis(P: torch.Tensor, tolerance: float) -> torch.Tensor | None:
    """An orthonormal basis (d, r) of range(P) for a symmetric projector P (d, d), or None.

    r = round(trace P); U = the Q of QR(P P G) for a fixed Gaussian G (d, r), which spans range(P)
    with probability 1. The second product (one power step) matters for a P rounded to fp32: its
    null-space eigenvalues are ~1e-7, not 0, and one product leaves that much of them in U (updates
    1e-5 off eigh's at d = 3072; with two, 3e-12). Accepted only when ||P U - U|| and
    ||P x - U U^T x|| (x: a few random unit vectors) are below `tolerance`. Cost: three (d, d) x
    (d, r) products and a QR, against a full `eigh` of P.
    """
    d = P.shape[0]
    r = int(round(float(torch.diagonal(P).sum())))
    if not 0 <= r <= d:
        return None
    from .validation import random_unit_vectors

    probes = random_unit_vectors(d, P.device, P.dtype)
    gen = torch.Generator(device=P.device).manual_seed(0)
    basis = torch.linalg.qr(P @ (P @ torch.randn(d, r, generator=gen, device=P.device, dtype=P.dtype)))[0]
    in_range = (P @ basis - basis).norm(dim=0).max() if r else P.new_zeros(())
    complete = (P @ probes - basis @ (basis.T @ probes)).norm(dim=0).max()
    return basis if max(float(in_range), float(complete)) <= tolerance else None


PROJECTOR_KIND = "nullspace-projector"
PROJECTOR_FIELDS = {"layers": list[int], "rewrite_module_tmp": str, "model": str, "model_fingerprint": str,
                    "base_fingerprint": str}


class ProjectorBases(dict):
    """{layer: U0 (d_k, r)} read from a projector file; `metadata` says which model it is for.
    AlphaEditor checks it against the model it edits (see `check_projector_model`)."""

    def __init__(self, bases: dict[int, torch.Tensor], metadata: dict, path):
        super().__init__(bases)
        self.metadata, self.path = metadata, path


def save_projector(path, bases: dict[int, torch.Tensor], stats, metadata: dict | None = None):
    """Write per-layer bases U0 (d_k, r) computed from `stats` (a KeyStatistics) atomically as
    safetensors, with `metadata` (rule, ...) and the statistics' model, fingerprints, templates."""
    from .storage import save_tensors

    source = {k: stats.metadata.get(k) for k in PROJECTOR_FIELDS if k != "layers"}
    if not all(isinstance(v, str) for v in source.values()) or not set(bases) <= set(stats.sums):
        raise InvalidRequestError("save_projector needs the KeyStatistics the bases were computed from "
                                  "(from collect_statistics or KeyStatistics.load), holding every layer of `bases`")
    return save_tensors(path, {f"layer.{l}.basis": u for l, u in bases.items()},
                        {**(metadata or {}), **source, "kind": PROJECTOR_KIND, "layers": sorted(bases),
                         "stats_tokens": stats.count})


def load_projector(path, model=None, *, allow_foreign: bool = False) -> ProjectorBases:
    """Per-layer bases U0 from `save_projector`'s file, checked: {layer: (d_k, r)}.

    With `model`, refuses a file computed for another model unless `allow_foreign` (see
    `check_projector_model`); AlphaEditor repeats that check on the model it edits.
    """
    from .storage import StatsFileError, load_tensors, require_tensors

    tensors, metadata = load_tensors(path, PROJECTOR_KIND, PROJECTOR_FIELDS)
    layers = sorted(metadata["layers"])
    require_tensors(path, tensors, [f"layer.{l}.basis" for l in layers])
    bases = {l: tensors[f"layer.{l}.basis"] for l in layers}
    for layer, u in bases.items():
        if u.ndim != 2 or u.shape[1] > u.shape[0]:
            raise StatsFileError(f"{path}: the basis of layer {layer} has shape {tuple(u.shape)}, not (d_k, r <= d_k)")
        require_finite(u, f"projector basis of layer {layer} in {path}")
    projector = ProjectorBases(bases, metadata, path)
    if model is not None:
        check_projector_model(projector, model, allow_foreign)
    return projector


def check_projector_model(projector: ProjectorBases, model, allow_foreign: bool = False) -> None:
    """StatsFileError unless `projector` was computed for `model` or one of its edited descendants.

    A projector comes from the statistics of the unedited model, and sequential editing changes
    the rewrite weights, so the check compares `storage.base_fingerprint` (embedding and the
    rewrite modules' unedited siblings), which editing leaves alone; the full fingerprint of the
    statistics' model is recorded too (`model_fingerprint`). `allow_foreign=True` (CLI:
    `--allow-foreign-projector`) accepts a projector of another model deliberately.
    """
    from .storage import StatsFileError, base_fingerprint

    if allow_foreign:
        return
    meta = projector.metadata
    names = [meta["rewrite_module_tmp"].format(l) for l in meta["layers"]]
    try:
        same = base_fingerprint(model, names) == meta["base_fingerprint"]
    except ModelStructureError:
        same = False
    if not same:
        raise StatsFileError(f"{projector.path} was computed for another model ({meta['model']!r}); compute the "
                             "statistics and projector for this one, or pass allow_foreign=True "
                             "(--allow-foreign-projector) to use it anyway")

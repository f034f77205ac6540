"""Null-space projector (DESIGN step 6): eigendecomposition of a key covariance -> U0 (d, r).

The null space is spanned by the covariance's eigenvectors of small eigenvalue. Which are
"small" is set by exactly one rule: an absolute `threshold` (the original's
`nullspace_threshold`), a threshold `relative` to the largest eigenvalue, the `energy` fraction
of the trace the protected (non-null) directions must keep, or the `rank` of protected directions.
"""

from __future__ import annotations

import warnings

import torch

from .errors import InvalidRequestError, ShapeError, require_finite


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
    """U (d, r) with U U^T = P for a dense orthogonal projector P (d, d), in P's dtype.

    With `tolerance`, returns None unless every eigenvalue of P lies within `tolerance` of 0
    or 1 (P is not a projector, so no basis reproduces it).
    """
    if P.ndim != 2 or P.shape[0] != P.shape[1]:
        raise ShapeError(f"projector must be a square (d, d) matrix, got shape {tuple(P.shape)}")
    require_finite(P, "projector P")
    sym = P.to(torch.float64) if P.device.type == "cpu" else P
    evals, evecs = torch.linalg.eigh((sym + sym.T) / 2)
    if tolerance is not None and not bool((torch.minimum(evals.abs(), (evals - 1).abs()) < tolerance).all()):
        return None
    return evecs[:, evals > 0.5].to(P.dtype)


PROJECTOR_KIND = "nullspace-projector"


def save_projector(path, bases: dict[int, torch.Tensor], metadata: dict | None = None):
    """Write per-layer bases U0 (d, r) as safetensors (atomic), with metadata (rule, stats file...)."""
    from .storage import save_tensors

    return save_tensors(path, {f"layer.{l}.basis": u for l, u in bases.items()},
                        {**(metadata or {}), "kind": PROJECTOR_KIND, "layers": sorted(bases)})


def load_projector(path) -> dict[int, torch.Tensor]:
    """Per-layer bases U0 from `save_projector`'s file, checked: {layer: (d, r)}."""
    from .storage import load_tensors

    tensors, _ = load_tensors(path, PROJECTOR_KIND)
    bases = {int(k.split(".")[1]): v for k, v in tensors.items()}
    for layer, u in bases.items():
        require_finite(u, f"projector basis of layer {layer} in {path}")
    return dict(sorted(bases.items()))

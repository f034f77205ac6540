"""Null-space projector (DESIGN step 6) from a key covariance."""

from __future__ import annotations

import torch

from .errors import ShapeError, require_finite


def _basis_fp64(cov: torch.Tensor, threshold: float) -> torch.Tensor:
    if cov.ndim != 2 or cov.shape[0] != cov.shape[1]:
        raise ShapeError(f"covariance must be a square (d, d) matrix, got shape {tuple(cov.shape)}")
    require_finite(cov, "covariance")
    sym = cov.to(torch.float64)
    evals, evecs = torch.linalg.eigh((sym + sym.T) / 2)
    return evecs[:, evals < threshold]


def nullspace_basis(cov: torch.Tensor, threshold: float) -> torch.Tensor:
    """U0: eigenvectors of `cov` (d, d) with eigenvalue < threshold, as (d, r) in cov's dtype.

    The eigendecomposition runs in fp64. A symmetric PSD covariance's eigenvalues are its
    singular values, so this selects the same subspace as the original's SVD.
    """
    return _basis_fp64(cov, threshold).to(cov.dtype)


def nullspace_projector(cov: torch.Tensor, threshold: float) -> torch.Tensor:
    """P = U0 U0^T (d, d) in cov's dtype: what the original's `get_project` returns for `cov`."""
    basis = _basis_fp64(cov, threshold)
    return (basis @ basis.T).to(cov.dtype)


def basis_from_projector(P: torch.Tensor, tolerance: float | None = None) -> torch.Tensor | None:
    """U (d, r) with U U^T = P for a dense orthogonal projector P (d, d), in P's dtype.

    With `tolerance`, returns None unless every eigenvalue of P lies within `tolerance` of 0
    or 1 (P is not a projector, so no basis reproduces it).
    """
    if P.ndim != 2 or P.shape[0] != P.shape[1]:
        raise ShapeError(f"projector must be a square (d, d) matrix, got shape {tuple(P.shape)}")
    require_finite(P, "projector P")
    sym = P.to(torch.float64)
    evals, evecs = torch.linalg.eigh((sym + sym.T) / 2)
    if tolerance is not None and not bool((torch.minimum(evals.abs(), (evals - 1).abs()) < tolerance).all()):
        return None
    return evecs[:, evals > 0.5].to(P.dtype)

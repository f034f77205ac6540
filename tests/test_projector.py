import pytest
import torch

from alphaedit_fast import NonFiniteError, ShapeError, nullspace_basis, nullspace_projector
from alphaedit_fast.reference import nullspace_projector_ref

from .conftest import tolerance


def covariance(d=48, n=30, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    return x.T @ x / n  # rank n < d: a real null space


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_projector_matches_svd_reference(dtype):
    cov = covariance().to(dtype)
    P = nullspace_projector(cov, 2e-2)
    ref = nullspace_projector_ref(cov, 2e-2)
    assert P.dtype == dtype
    # The threshold lies well inside the spectral gap (zero eigenvalues vs the smallest nonzero
    # one, 5.8e-2), so the rank never hinges on rounding. The null space moves by at most
    # ||rounding of cov|| / gap (Davis-Kahan), with a decomposition error of 48-long sums.
    evals = torch.linalg.eigvalsh(cov.double())
    assert evals[17] < 1e-3 * 2e-2 and evals[18] > 2 * 2e-2
    rtol, _ = tolerance(dtype, 48)
    bound = rtol * evals[-1].item() / evals[18].item()
    torch.testing.assert_close(P, ref, rtol=bound, atol=bound)
    assert abs(torch.trace(P).item() - 18) < 1e-3  # 48 - 30 null directions


def test_projector_properties():
    cov = covariance()
    P = nullspace_projector(cov, 2e-2)
    torch.testing.assert_close(P @ P, P)
    torch.testing.assert_close(P, P.T)
    assert (P @ cov @ P).abs().max() < 1e-10
    basis = nullspace_basis(cov, 2e-2)
    assert basis.shape == (48, 18)
    torch.testing.assert_close(basis.T @ basis, torch.eye(18, dtype=torch.float64))


def test_bad_covariances():
    with pytest.raises(ShapeError):
        nullspace_projector(torch.zeros(3, 4), 1e-2)
    cov = covariance()
    cov[0, 0] = float("nan")
    with pytest.raises(NonFiniteError):
        nullspace_projector(cov, 1e-2)

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


def random_projector(d, r, seed=0, dtype=torch.float32):
    """U U^T (d, d) for a random orthonormal U (d, r), rounded to `dtype`, and that U (fp64)."""
    gen = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(d, r, generator=gen, dtype=torch.float64))[0]
    return (basis @ basis.T).to(dtype), basis


@pytest.mark.parametrize("r", [0, 1, 57, 159, 160])
def test_a_projector_is_factored_without_eigh(r, monkeypatch):
    from alphaedit_fast.projector import basis_from_projector
    from alphaedit_fast.solve import projected_update

    P, exact = random_projector(160, r)
    monkeypatch.setattr(torch.linalg, "eigh", lambda *a, **k: pytest.fail("eigh called for a projector"))
    basis = basis_from_projector(P, tolerance=1e-3)
    assert basis.shape == (160, r) and basis.dtype == torch.float32
    rtol, _ = tolerance(torch.float32, 160)  # P's entries are fp32 sums of r products
    torch.testing.assert_close((basis.double() @ basis.double().T), exact @ exact.T, rtol=0, atol=rtol)
    if r:
        monkeypatch.undo()
        evals, evecs = torch.linalg.eigh(P.double())
        eigh_basis = evecs[:, evals > 0.5]
        gen = torch.Generator().manual_seed(1)
        keys, resid = torch.randn(160, 7, generator=gen, dtype=torch.float64), torch.randn(64, 7, dtype=torch.float64)
        x = torch.randn(100, 160, generator=gen, dtype=torch.float64)
        cache = x.T @ x / 100

        def update(u):
            return projected_update(u, u.T @ cache @ u, keys, resid, 10.0)

        # rotation-invariant: both bases span range(P); the solve is well conditioned (L2 = 10)
        ours, theirs = update(basis.double()), update(eigh_basis)
        assert ((ours - theirs).norm() / theirs.norm()).item() < 1e-6


def test_not_a_projector_goes_to_eigh():
    from alphaedit_fast.projector import basis_from_projector, range_basis

    P, _ = random_projector(160, 60)
    shrunk = 0.4 * P.double()
    assert range_basis(shrunk, 1e-4) is None
    assert basis_from_projector(shrunk, tolerance=1e-3) is None  # eigenvalues 0.4: no basis reproduces it
    assert basis_from_projector(shrunk).shape == (160, 0)  # as before: eigh, eigenvalues above 0.5
    tilted = P.double() + 1e-2 * torch.eye(160, dtype=torch.float64)  # trace off the rank by 1.6
    assert range_basis(tilted, 1e-4) is None

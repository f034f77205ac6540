"""Projected Cholesky and Woodbury solves against the original's dense solve."""

import pytest
import torch

from alphaedit_fast.solve import ProjectedSolver, dense_update, projected_update, woodbury_absorb, woodbury_update

from .conftest import tolerance


def problem(d_k=96, d_model=24, n=7, r=40, cache_scale=1.0, key_scale=1.0, seed=0, dtype=torch.float64):
    """Random keys/residuals, an orthonormal basis U (d_k, r) and an ill-conditioned PSD cache."""
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=gen, dtype=dtype)  # noqa: E731
    basis = torch.linalg.qr(rand(d_k, r))[0]
    spectrum = torch.logspace(-6, 4, d_k, dtype=dtype) * cache_scale  # condition number 1e10
    q = torch.linalg.qr(rand(d_k, d_k))[0]
    cache = q @ torch.diag(spectrum) @ q.T
    return basis, cache, key_scale * rand(d_k, n), rand(d_model, n)


@pytest.mark.parametrize("n, r", [(7, 40), (60, 40), (1, 96), (30, 1)])
@pytest.mark.parametrize("l2", [10.0, 1e-3])
def test_forms_agree_in_fp64(n, r, l2):
    basis, cache, keys, resid = problem(n=n, r=r)
    dense = dense_update(basis @ basis.T, keys, cache, resid, l2, dtype=torch.float64)
    cache_proj = basis.T @ cache @ basis
    chol = projected_update(basis, cache_proj, keys, resid, l2)
    inv_m = torch.linalg.inv(cache_proj + l2 * torch.eye(r, dtype=torch.float64))
    wood = woodbury_update(basis, inv_m, keys, resid)
    # Backward-stable solves: each answer's error is at most cond(system) times the rounding of
    # its d_k-long sums. The dense d_k x d_k system is the worse conditioned of the forms (the
    # cache's condition number is 1e10; up to ~1e7 with l2 = 1e-3).
    dense_lhs = basis @ basis.T @ (keys @ keys.T + cache) + l2 * torch.eye(basis.shape[0], dtype=torch.float64)
    rtol, _ = tolerance(torch.float64, basis.shape[0])
    rtol *= torch.linalg.cond(dense_lhs).item()
    torch.testing.assert_close(chol, dense, rtol=rtol, atol=rtol * dense.abs().max().item())
    torch.testing.assert_close(wood, dense, rtol=rtol, atol=rtol * dense.abs().max().item())


@pytest.mark.parametrize("l2", [10.0, 1e-2])
def test_fp32_projected_is_at_least_as_accurate_as_dense(l2):
    """On an ill-conditioned cache, fp32 errors against the fp64 answer: the projected
    Cholesky solve is no worse than the original's dense LU solve."""
    basis, cache, keys, resid = problem(key_scale=30.0, cache_scale=10.0)
    truth = dense_update(basis @ basis.T, keys, cache, resid, l2, dtype=torch.float64)
    f32 = [t.float() for t in (basis, cache, keys, resid)]
    dense32 = dense_update(f32[0] @ f32[0].T, f32[2], f32[1], f32[3], l2)
    chol32 = projected_update(f32[0], f32[0].T @ f32[1] @ f32[0], f32[2], f32[3], l2)
    err = lambda x: ((x.double() - truth).norm() / truth.norm()).item()  # noqa: E731
    assert err(chol32) <= max(2 * err(dense32), 1e-6), (err(chol32), err(dense32))
    assert err(chol32) < 1e-3


def test_woodbury_absorb_tracks_the_inverse():
    basis, cache, keys, _ = problem(r=40)
    cp = basis.T @ cache @ basis
    m = cp + 10.0 * torch.eye(40, dtype=torch.float64)
    b = basis.T @ keys
    torch.testing.assert_close(woodbury_absorb(torch.linalg.inv(m), b), torch.linalg.inv(m + b @ b.T))


@pytest.mark.parametrize("method", ["cholesky", "woodbury", "auto"])
def test_solver_over_sequential_batches_matches_dense(method):
    """Three batches: each update and the absorbed cache agree with the dense original form."""
    basis, cache0, _, _ = problem(r=40)
    solver = ProjectedSolver([basis, basis[:, :10]], l2=10.0, method=method, dtype=torch.float64)
    dense_caches = [torch.zeros(96, 96, dtype=torch.float64) for _ in range(2)]
    for batch in range(3):
        _, _, keys, resid = problem(n=5, seed=batch + 1)
        for i, u in enumerate(solver.bases):
            expected = dense_update(u @ u.T, keys, dense_caches[i], resid, 10.0, dtype=torch.float64)
            torch.testing.assert_close(solver.update(i, keys, resid), expected)
        solver.absorb([keys, 2 * keys])
        dense_caches[0] += keys @ keys.T
        dense_caches[1] += 4 * keys @ keys.T
    assert solver.choose(0, 5) == ("cholesky" if method == "cholesky" else "woodbury")


def test_empty_null_space_gives_no_update():
    solver = ProjectedSolver([torch.zeros(16, 0)], l2=10.0)
    assert torch.equal(solver.update(0, torch.randn(16, 3), torch.randn(8, 3)), torch.zeros(16, 8))


@pytest.mark.parametrize("n, r", [(7, 40), (60, 40), (1, 96), (30, 1)])
@pytest.mark.parametrize("l2", [10.0, 1e-3])
def test_zero_cache_form_agrees_with_dense_in_fp64(n, r, l2):
    """The push-through form (n x n system) against the dense d_k x d_k one, C = 0."""
    from alphaedit_fast.solve import zero_cache_update

    basis, _, keys, resid = problem(n=n, r=r)
    P, zero = basis @ basis.T, torch.zeros(basis.shape[0], basis.shape[0], dtype=torch.float64)
    dense = dense_update(P, keys, zero, resid, l2, dtype=torch.float64)
    pushed = zero_cache_update(P, keys, resid, l2, dtype=torch.float64)
    dense_lhs = P @ keys @ keys.T + l2 * torch.eye(basis.shape[0], dtype=torch.float64)
    rtol = tolerance(torch.float64, basis.shape[0])[0] * torch.linalg.cond(dense_lhs).item()
    torch.testing.assert_close(pushed, dense, rtol=rtol, atol=rtol * dense.abs().max().item())


def test_dense_solver_uses_the_zero_cache_form_only_when_asked_and_c_is_zero(monkeypatch):
    from alphaedit_fast import solve

    basis, cache, keys, resid = problem()
    P = torch.stack([basis @ basis.T] * 2).float()
    caches = torch.stack([torch.zeros_like(cache), cache]).float()
    used = []
    real = solve.zero_cache_update
    monkeypatch.setattr(solve, "zero_cache_update", lambda *a, **k: used.append(1) or real(*a, **k))
    for original_form, expected in ((True, 0), (False, 1)):
        used.clear()
        solver = solve.DenseSolver(P, caches, 10.0, original_form=original_form)
        for index in range(2):
            solver.update(index, keys.float(), resid.float())
        assert len(used) == expected  # only the zero-cache layer, only when not asked for the original's form

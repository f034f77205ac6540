"""One layer's solve at GPT-2-small width (d_k = 3072), 100 edits, half the keys' space null."""

import pytest
import torch

from alphaedit_fast.bench import random_bases
from alphaedit_fast.solve import ProjectedSolver, dense_update

D_K, D_MODEL, N = 3072, 768, 100


@pytest.fixture(scope="module")
def problem():
    gen = torch.Generator().manual_seed(0)
    keys, resid = torch.randn(D_K, N, generator=gen), torch.randn(D_MODEL, N, generator=gen)
    x = torch.randn(D_K // 2, D_K, generator=gen)
    basis = random_bases(1, D_K, "cpu")[0]
    return basis, x.T @ x / D_K, keys, resid


def test_dense_original(benchmark, problem):
    basis, cache, keys, resid = problem
    P = basis @ basis.T
    benchmark(dense_update, P, keys, cache, resid, 10.0)


@pytest.mark.parametrize("method", ["cholesky", "woodbury"])
def test_projected(benchmark, problem, method):
    basis, cache, keys, resid = problem
    solver = ProjectedSolver([basis], 10.0, method, cache_proj=[basis.T @ cache @ basis])
    solver.update(0, keys, resid)  # Woodbury builds (Cp + l2 I)^-1 once, then keeps it up to date
    benchmark(solver.update, 0, keys, resid)

"""The hot ops on the CPU, per backend (PyTorch reference vs the compiled extension)."""

import pytest
import torch

from alphaedit_fast import ops

ROWS, SEQ, D, SEGMENTS = 600, 32, 14336 // 4, 100


@pytest.fixture(scope="module")
def tensors():
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(ROWS, SEQ, D, generator=gen).to(torch.bfloat16)
    positions = torch.randint(0, SEQ, (ROWS,), generator=gen)
    segments = torch.arange(ROWS) // (ROWS // SEGMENTS)
    return hidden, positions, segments, torch.rand(ROWS, generator=gen), torch.randn(SEGMENTS, D, generator=gen)


@pytest.fixture(params=["torch", "ext"])
def backend(request, monkeypatch):
    if request.param == "ext" and ops._C is None:
        pytest.skip("compiled extension not built")
    monkeypatch.setenv("ALPHAEDIT_BACKEND", request.param)
    return request.param


def test_gather_segment_mean(benchmark, tensors, backend):
    hidden, positions, segments, weights, _ = tensors
    benchmark(ops.gather_segment_mean, hidden, positions, segments, weights, SEGMENTS)


def test_add_at_positions(benchmark, tensors, backend):
    hidden, positions, segments, _, delta = tensors
    benchmark(ops.add_at_positions, hidden, positions, segments, delta)

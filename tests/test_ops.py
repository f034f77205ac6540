"""The public ops: dispatch, custom-op registration (opcheck), gradients, the torch backend."""

import pytest
import torch

from alphaedit_fast import ops
from alphaedit_fast.ops import (
    BackendError,
    add_at_positions,
    add_at_positions_ref,
    backend_for,
    gather_segment_mean,
    gather_segment_mean_ref,
    second_moment_update_,
)

from .conftest import gather_tolerance, tolerance


def gather_inputs(B=5, T=4, D=7, P=1, n_segments=3, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, D, generator=gen).to(dtype)
    positions = torch.randint(0, T, (B, P) if P > 1 else (B,), generator=gen)
    segments = torch.randint(0, n_segments, (B,), generator=gen)
    weights = torch.rand(B, generator=gen)
    return hidden, positions, segments, weights, n_segments


def brute_force_gather(hidden, positions, segments, weights, n_segments):
    out = torch.zeros(n_segments, hidden.shape[-1], dtype=torch.float64)
    for b in range(hidden.shape[0]):
        pos = positions[b].reshape(-1)
        out[segments[b]] += weights[b].double() * hidden[b, pos].double().mean(0)
    return out


@pytest.mark.parametrize("P", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_gather_reference_is_the_definition(P, dtype):
    args = gather_inputs(B=9, D=129, P=P, dtype=dtype)
    out = gather_segment_mean_ref(*args)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    rtol, atol = gather_tolerance(*args)
    torch.testing.assert_close(out.double(), brute_force_gather(*args), rtol=rtol, atol=atol)


def test_gather_empty_and_unused_segments():
    hidden, positions, segments, weights, _ = gather_inputs(B=0)
    assert torch.equal(gather_segment_mean(hidden, positions, segments, weights, 4), torch.zeros(4, 7))
    hidden, positions, _, weights, _ = gather_inputs(B=4)
    out = gather_segment_mean(hidden, positions, torch.full((4,), 2), weights, 4)
    assert torch.equal(out[[0, 1, 3]], torch.zeros(3, 7)) and out[2].abs().sum() > 0


def test_add_at_positions_definition_and_gradient():
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(4, 5, 3, dtype=torch.float64, generator=gen)
    positions = torch.tensor([0, 4, 4, 2])
    rows_to_request = torch.tensor([1, 0, 1, 1])  # request 1 owns three rows
    delta = torch.randn(2, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    out = add_at_positions(hidden, positions, rows_to_request, delta)
    expected = hidden.clone()
    for b in range(4):
        expected[b, positions[b]] += delta[rows_to_request[b]].detach()
    torch.testing.assert_close(out.detach(), expected)
    assert torch.autograd.gradcheck(lambda d: add_at_positions(hidden, positions, rows_to_request, d), (delta,))
    hidden_leaf = hidden.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda h, d: add_at_positions(h, positions, rows_to_request, d),
                                    (hidden_leaf, delta))


def test_add_at_positions_bf16_sums_in_fp32():
    hidden = torch.randn(3, 4, 8).to(torch.bfloat16)
    delta = torch.randn(2, 8)
    out = add_at_positions(hidden, torch.tensor([1, 2, 3]), torch.tensor([0, 1, 0]), delta)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out[0, 1], (hidden[0, 1].float() + delta[0]).to(torch.bfloat16))
    assert torch.equal(out[0, 0], hidden[0, 0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_second_moment_update(dtype):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(20000, 5, generator=gen).to(dtype)  # more rows than one chunk
    acc = torch.eye(5)
    assert second_moment_update_(acc, x) is acc
    exact = torch.eye(5, dtype=torch.float64) + x.double().T @ x.double()
    # 20,000 products summed in fp32 (bf16 products are exact in fp32), in an order that depends on
    # the CPU and BLAS. The error bound is relative to sum|x_i x_j|, not to the off-diagonal sums,
    # which cancel down to ~sqrt(20,000).
    magnitude = (x.double().abs().T @ x.double().abs()).max().item()
    rtol, atol = tolerance(torch.float32, x.shape[0], scale=magnitude)
    torch.testing.assert_close(acc.double(), exact, rtol=rtol, atol=atol)


def test_opcheck():
    hidden, positions, segments, weights, n = gather_inputs()
    torch.library.opcheck(ops._gather_segment_mean, (hidden, positions, segments, weights, n))
    delta = torch.randn(3, 7, requires_grad=True)
    torch.library.opcheck(ops._add_at_positions, (hidden, positions[:5], segments, delta))
    torch.library.opcheck(ops._second_moment_update_, (torch.zeros(7, 7), torch.randn(6, 7)))


def test_backend_switch(monkeypatch):
    hidden = torch.zeros(1, 1, 4)
    monkeypatch.setenv("ALPHAEDIT_BACKEND", "torch")
    assert backend_for(hidden) == "torch"
    monkeypatch.setenv("ALPHAEDIT_BACKEND", "nonsense")
    with pytest.raises(BackendError, match="expected one of"):
        backend_for(hidden)
    monkeypatch.setenv("ALPHAEDIT_BACKEND", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(BackendError, match="triton"):
        backend_for(hidden)  # a CPU tensor outside the interpreter: the requested backend cannot run
    monkeypatch.setenv("ALPHAEDIT_BACKEND", "auto")
    assert backend_for(hidden.double()) == "torch"  # kernels take fp32/bf16/fp16 only
    assert backend_for(hidden) in ("ext", "torch")


@pytest.mark.parametrize("backend", ["torch", "ext"])
def test_every_cpu_backend_agrees(backend, monkeypatch):
    if backend == "ext" and ops._C is None:
        pytest.skip("compiled extension not built")
    monkeypatch.setenv("ALPHAEDIT_BACKEND", backend)
    for dtype in (torch.float32, torch.bfloat16):
        args = gather_inputs(B=6, D=33, P=2, dtype=dtype)
        rtol, atol = gather_tolerance(*args)
        torch.testing.assert_close(gather_segment_mean(*args), gather_segment_mean_ref(*args), rtol=rtol, atol=atol)
        hidden, positions, segments, _, n = gather_inputs(B=6, D=33, dtype=dtype)
        delta = torch.randn(n, 33)
        assert torch.equal(add_at_positions(hidden, positions, segments, delta),
                           add_at_positions_ref(hidden, positions, segments, delta))

"""The Triton kernels against their PyTorch references (ops/ref.py).

Without a GPU they run on CPU tensors under the Triton interpreter (TRITON_INTERPRET=1, set here
before Triton is imported); with one, compiled on CUDA tensors. Shapes are kept small so the
interpreter stays fast.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

from alphaedit_fast.kernels import gather  # noqa: E402
from alphaedit_fast.kernels.gather import add_at_positions_triton, gather_segment_mean_triton  # noqa: E402
from alphaedit_fast.ops.ref import add_at_positions_ref, gather_segment_mean_ref  # noqa: E402

from .conftest import gather_tolerance  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# The gather accumulates in fp32 in both kernel and reference, from the same (rounded) inputs:
# only the fp32 summation order differs, whatever hidden's dtype (conftest.gather_tolerance).

if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no GPU and TRITON_INTERPRET is not 1", allow_module_level=True)
if DEVICE == "cpu" and not gather._INTERPRET:
    raise RuntimeError("alphaedit_fast.kernels.gather was imported before TRITON_INTERPRET=1 was set "
                       "(set it in conftest.py)")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def gather_case(B, T, D, P, n_segments, dtype, seed=0, segment_ids=None):
    """hidden (B, T, D), positions (B, P) (P=None: (B,)), segment_ids, weights; on DEVICE."""
    g = _gen(seed)
    hidden = torch.randn(B, T, D, generator=g).to(dtype)
    shape = (B,) if P is None else (B, P)
    positions = torch.randint(0, T, shape, generator=g)
    if segment_ids is None:
        segment_ids = torch.randint(0, n_segments, (B,), generator=g)
    weights = torch.rand(B, generator=g) + 0.5
    return [t.to(DEVICE) for t in (hidden, positions, torch.as_tensor(segment_ids), weights)] + [n_segments]


def check_gather(hidden, positions, segment_ids, weights, n_segments):
    out = gather_segment_mean_triton(hidden, positions, segment_ids, weights, n_segments)
    ref = gather_segment_mean_ref(hidden, positions, segment_ids, weights, n_segments)
    assert out.dtype == torch.float32 and out.shape == (n_segments, hidden.shape[-1])
    rtol, atol = gather_tolerance(hidden, positions, segment_ids, weights, n_segments)
    torch.testing.assert_close(out, ref, rtol=rtol, atol=atol)
    return out


def check_add(hidden, positions, row_to_request, delta):
    out = add_at_positions_triton(hidden, positions, row_to_request, delta)
    ref = add_at_positions_ref(hidden, positions, row_to_request, delta)
    assert out.dtype == hidden.dtype and out.shape == hidden.shape and out.is_contiguous()
    assert torch.equal(out, ref)  # both cast the same fp32 sum (round to nearest even)
    return out


# ---- gather_segment_mean -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D", [1, 3, 129])
def test_gather_matches_ref(dtype, D):
    # 5 segments for 6 rows: segment 3 has no rows, and some have several.
    args = gather_case(B=6, T=5, D=D, P=3, n_segments=5, dtype=dtype, segment_ids=[0, 2, 0, 4, 2, 0])
    out = check_gather(*args)
    assert torch.all(out[[1, 3]] == 0)  # segments without rows


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gather_wide_rows(dtype):
    check_gather(*gather_case(B=2, T=3, D=4097, P=2, n_segments=2, dtype=dtype, segment_ids=[1, 1]))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gather_one_position_per_row(dtype):
    args = gather_case(B=5, T=4, D=33, P=None, n_segments=3, dtype=dtype)
    assert args[1].shape == (5,)
    check_gather(*args)


def test_gather_repeated_positions_and_single_segment():
    hidden, _, _, weights, _ = gather_case(B=4, T=5, D=20, P=3, n_segments=1, dtype=torch.float32)
    positions = torch.tensor([[1, 1, 3], [0, 0, 0], [4, 2, 4], [2, 3, 2]], device=DEVICE)
    check_gather(hidden, positions, torch.zeros(4, dtype=torch.long, device=DEVICE), weights, 1)


def test_gather_negative_positions_wrap_like_torch():
    hidden, _, segments, weights, n = gather_case(B=3, T=4, D=9, P=2, n_segments=2, dtype=torch.float32)
    positions = torch.tensor([[-1, 0], [-4, 3], [2, -2]], device=DEVICE)
    check_gather(hidden, positions, segments, weights, n)


def test_gather_empty_batch():
    hidden = torch.randn(0, 4, 7, device=DEVICE)
    empty = torch.zeros(0, dtype=torch.long, device=DEVICE)
    out = check_gather(hidden, empty[:, None].expand(0, 2), empty, torch.zeros(0, device=DEVICE), 3)
    assert torch.all(out == 0)
    assert gather_segment_mean_triton(hidden, empty, empty, torch.zeros(0, device=DEVICE), 0).shape == (0, 7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gather_non_contiguous_hidden(dtype):
    g = _gen(3)
    base = torch.randn(6, 70, 3, generator=g).to(dtype).to(DEVICE)  # (T, D, B)
    hidden = base.permute(2, 0, 1)[..., ::2]  # (B=3, T=6, D=35), no unit stride anywhere
    assert not hidden.is_contiguous() and hidden.stride(-1) != 1
    positions = torch.randint(0, 6, (3, 2), generator=g).to(DEVICE)
    check_gather(hidden, positions, torch.tensor([1, 0, 1], device=DEVICE), torch.rand(3, generator=g).to(DEVICE), 2)


def test_gather_deterministic():
    args = gather_case(B=6, T=5, D=40, P=2, n_segments=2, dtype=torch.float32, seed=5)
    assert torch.equal(gather_segment_mean_triton(*args), gather_segment_mean_triton(*args))


def test_gather_rejects_segment_out_of_range():
    hidden, positions, _, weights, _ = gather_case(B=3, T=4, D=5, P=1, n_segments=2, dtype=torch.float32)
    with pytest.raises(ValueError, match="segment_ids"):
        gather_segment_mean_triton(hidden, positions, torch.tensor([0, 2, 1], device=DEVICE), weights, 2)


# ---- add_at_positions ----------------------------------------------------------------------------


def add_case(B, T, D, N, dtype, seed=0):
    g = _gen(seed)
    hidden = torch.randn(B, T, D, generator=g).to(dtype)
    positions = torch.randint(0, T, (B,), generator=g)
    row_to_request = torch.randint(0, N, (B,), generator=g)  # several rows share a request
    delta = torch.randn(N, D, generator=g)
    return [t.to(DEVICE) for t in (hidden, positions, row_to_request, delta)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D", [1, 3, 129])
def test_add_matches_ref(dtype, D):
    hidden, positions, rows, delta = add_case(B=6, T=5, D=D, N=3, dtype=dtype)
    out = check_add(hidden, positions, rows, delta)
    untouched = torch.ones(6, 5, dtype=torch.bool, device=DEVICE)
    untouched[torch.arange(6, device=DEVICE), positions] = False
    assert torch.equal(out[untouched], hidden[untouched])  # everything else is copied
    assert hidden.data_ptr() != out.data_ptr()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_add_wide_rows(dtype):
    check_add(*add_case(B=2, T=3, D=4097, N=2, dtype=dtype, seed=1))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_add_rounds_to_nearest_even(dtype):
    # fp32 sums exactly half-way between two representable values (ties), and inf/nan.
    eps = torch.finfo(dtype).eps  # spacing at 1.0
    hidden = torch.tensor([[[1.0, 1.0 + eps, -1.0, 1.0, 2.0, 1.0, 0.0]]], dtype=dtype, device=DEVICE)
    delta = torch.tensor([[eps / 2, eps / 2, -eps / 2, eps * 0.75, float("inf"), float("nan"), 1e-30]],
                         device=DEVICE)
    zero = torch.zeros(1, dtype=torch.long, device=DEVICE)
    out = add_at_positions_triton(hidden, zero, zero, delta)
    ref = add_at_positions_ref(hidden, zero, zero, delta)
    torch.testing.assert_close(out, ref, rtol=0, atol=0, equal_nan=True)
    assert out[0, 0, 0] == 1.0 and out[0, 0, 1] == 1.0 + 2 * eps  # ties go to the even neighbour


def test_add_negative_positions_wrap_like_torch():
    hidden, _, rows, delta = add_case(B=3, T=4, D=6, N=2, dtype=torch.float32)
    check_add(hidden, torch.tensor([-1, 2, -4], device=DEVICE), rows, delta)


def test_add_empty_batch():
    hidden = torch.randn(0, 4, 7, device=DEVICE)
    empty = torch.zeros(0, dtype=torch.long, device=DEVICE)
    out = check_add(hidden, empty, empty, torch.randn(2, 7, device=DEVICE))
    assert out.shape == (0, 4, 7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_add_non_contiguous_hidden(dtype):
    g = _gen(4)
    base = torch.randn(5, 2 * 21, 4, generator=g).to(dtype).to(DEVICE)  # (T, D, B)
    hidden = base.permute(2, 0, 1)[..., 1::2]  # (B=4, T=5, D=21)
    assert not hidden.is_contiguous()
    positions = torch.randint(0, 5, (4,), generator=g).to(DEVICE)
    check_add(hidden, positions, torch.tensor([0, 1, 1, 0], device=DEVICE), torch.randn(2, 21, generator=g).to(DEVICE))

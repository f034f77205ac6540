"""The compiled extension alphaedit_fast._C against the references (CPU), and the CUDA sources' compile."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from alphaedit_fast.ops.ref import add_at_positions_ref, gather_segment_mean_ref

from .conftest import gather_tolerance

ROOT = Path(__file__).resolve().parents[1]
FLOAT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DIMS = [1, 3, 129, 4097]


@pytest.fixture(scope="module")
def C():
    try:
        from alphaedit_fast import _C
    except ImportError as exc:
        pytest.skip(f"alphaedit_fast._C is not built ({exc}); `make install` builds it when a compiler exists")
    return _C


def gather_case(B=6, T=5, D=7, P=1, n_segments=3, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, D, generator=gen).to(dtype)
    positions = torch.randint(0, T, (B, P), generator=gen)
    segments = torch.randint(0, n_segments, (B,), generator=gen) if n_segments else torch.zeros(B, dtype=torch.long)
    weights = torch.rand(B, generator=gen) + 0.1
    return hidden, positions, segments, weights, n_segments


def assert_gather_matches(C, hidden, positions, segments, weights, n_segments):
    out = C.gather_segment_mean(hidden, positions, segments, weights, n_segments)
    ref = gather_segment_mean_ref(hidden, positions, segments, weights, n_segments)
    assert out.dtype == ref.dtype and out.shape == ref.shape and out.is_contiguous()
    rtol, atol = gather_tolerance(hidden, positions, segments, weights, n_segments)
    torch.testing.assert_close(out, ref, rtol=rtol, atol=atol)
    return out


def add_case(B=6, T=5, D=7, N=3, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, D, generator=gen).to(dtype)
    positions = torch.randint(0, T, (B,), generator=gen)
    rows_to_request = torch.randint(0, N, (B,), generator=gen)
    delta = torch.randn(N, D, generator=gen)
    return hidden, positions, rows_to_request, delta


def assert_add_matches(C, hidden, positions, rows_to_request, delta):
    before = hidden.clone()
    out = C.add_at_positions(hidden, positions, rows_to_request, delta)
    ref = add_at_positions_ref(hidden, positions, rows_to_request, delta)
    assert out.dtype == hidden.dtype and out.shape == hidden.shape and out.is_contiguous()
    assert torch.equal(out, ref), (out - ref).abs().max()
    assert torch.equal(hidden, before)  # a copy: the input is left alone
    return out


def test_has_cuda_is_a_bool(C):
    assert isinstance(C.has_cuda(), bool)


# --- gather_segment_mean ----------------------------------------------------------------------


@pytest.mark.parametrize("D", DIMS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("P", [1, 3])
def test_gather_matches_ref(C, dtype, D, P):
    assert_gather_matches(C, *gather_case(B=11, T=6, D=D, P=P, n_segments=4, dtype=dtype))


def test_gather_float64_accumulates_in_float64(C):
    out = assert_gather_matches(C, *gather_case(B=9, D=33, P=2, dtype=torch.float64))
    assert out.dtype == torch.float64


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_gather_empty_batch(C, dtype):
    hidden = torch.randn(0, 5, 9).to(dtype)
    empty = torch.zeros(0, dtype=torch.long)
    out = C.gather_segment_mean(hidden, empty.reshape(0, 1), empty, torch.zeros(0), 4)
    assert torch.equal(out, torch.zeros(4, 9))
    assert C.gather_segment_mean(hidden, empty.reshape(0, 1), empty, torch.zeros(0), 0).shape == (0, 9)


@pytest.mark.parametrize("D", [3, 4097])
def test_gather_single_segment(C, D):
    hidden, positions, _, weights, _ = gather_case(B=40, D=D, P=2)
    assert_gather_matches(C, hidden, positions, torch.zeros(40, dtype=torch.long), weights, 1)


@pytest.mark.parametrize("D", [3, 129])
def test_gather_segments_without_rows(C, D):
    hidden, positions, _, weights, _ = gather_case(B=8, D=D, P=2)
    segments = torch.tensor([1, 4, 4, 1, 6, 1, 4, 6])
    out = assert_gather_matches(C, hidden, positions, segments, weights, 8)
    assert torch.equal(out[[0, 2, 3, 5, 7]], torch.zeros(5, D))
    assert (out[[1, 4, 6]].abs().sum(1) > 0).all()


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_gather_repeated_positions(C, dtype):
    hidden, _, segments, weights, n = gather_case(B=4, T=6, D=129, dtype=dtype)
    positions = torch.tensor([[2, 2, 2], [1, 1, 5], [0, 5, 0], [3, 3, 3]])
    assert_gather_matches(C, hidden, positions, segments, weights, n)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("view", ["transposed", "strided_d", "sliced_t", "expanded"])
def test_gather_non_contiguous_hidden(C, dtype, view):
    gen = torch.Generator().manual_seed(3)
    B, T, D = 7, 6, 129
    if view == "transposed":  # stride along D is T
        hidden = torch.randn(B, D, T, generator=gen).to(dtype).transpose(1, 2)
    elif view == "strided_d":  # every other element along D
        hidden = torch.randn(B, T, 2 * D, generator=gen).to(dtype)[..., ::2]
    elif view == "sliced_t":  # a window of the sequence
        hidden = torch.randn(B, T + 4, D, generator=gen).to(dtype)[:, 2 : T + 2]
    else:  # one sequence seen B times (stride 0 along B)
        hidden = torch.randn(1, T, D, generator=gen).to(dtype).expand(B, T, D)
    assert hidden.shape == (B, T, D) and not hidden.is_contiguous()
    positions = torch.randint(0, T, (B, 2), generator=gen)
    segments = torch.randint(0, 3, (B,), generator=gen)
    assert_gather_matches(C, hidden, positions, segments, torch.rand(B, generator=gen), 3)


def test_gather_negative_positions_wrap_like_python_indexing(C):
    hidden, _, segments, weights, n = gather_case(B=5, T=6, D=17)
    positions = torch.tensor([[-1, 0], [-6, 5], [2, -3], [-2, -2], [4, 1]])
    assert_gather_matches(C, hidden, positions, segments, weights, n)


def test_gather_takes_1d_positions(C):
    hidden, positions, segments, weights, n = gather_case(B=6, D=10)
    out = C.gather_segment_mean(hidden, positions[:, 0], segments, weights, n)
    torch.testing.assert_close(out, gather_segment_mean_ref(hidden, positions, segments, weights, n))


def test_gather_is_deterministic_and_thread_count_independent(C):
    hidden, positions, segments, weights, n = gather_case(B=96, T=8, D=4097, P=2, n_segments=5, dtype=torch.bfloat16)
    threads = torch.get_num_threads()
    try:
        first = C.gather_segment_mean(hidden, positions, segments, weights, n)
        torch.set_num_threads(1)
        serial = C.gather_segment_mean(hidden, positions, segments, weights, n)
    finally:
        torch.set_num_threads(threads)
    again = C.gather_segment_mean(hidden, positions, segments, weights, n)
    assert torch.equal(first, serial) and torch.equal(first, again)


def test_gather_does_not_record_autograd(C):
    hidden, positions, segments, weights, n = gather_case()
    out = C.gather_segment_mean(hidden.requires_grad_(), positions, segments, weights, n)
    assert not out.requires_grad


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: a.update(positions=a["positions"] + 10), "out of range"),
        (lambda a: a.update(positions=a["positions"] - 20), "out of range"),
        (lambda a: a.update(segments=a["segments"] + 3), "out of range"),
        (lambda a: a.update(segments=a["segments"] - 5), "out of range"),
        (lambda a: a.update(positions=a["positions"].int()), "int64"),
        (lambda a: a.update(segments=a["segments"][:-1]), "shape"),
        (lambda a: a.update(weights=a["weights"][:2]), "shape"),
        (lambda a: a.update(hidden=a["hidden"][0]), "3-D"),
        (lambda a: a.update(hidden=a["hidden"].int()), "float"),
        (lambda a: a.update(positions=a["positions"][:, :0]), "at least one position"),
        (lambda a: a.update(n=0), "n_segments"),
        (lambda a: a.update(n=-1), "n_segments"),
    ],
)
def test_gather_rejects_bad_input(C, change, message):
    hidden, positions, segments, weights, n = gather_case(B=5, T=6, D=4)
    args = dict(hidden=hidden, positions=positions, segments=segments, weights=weights, n=n)
    change(args)
    with pytest.raises(RuntimeError, match=message):
        C.gather_segment_mean(args["hidden"], args["positions"], args["segments"], args["weights"], args["n"])


# --- add_at_positions -------------------------------------------------------------------------


@pytest.mark.parametrize("D", DIMS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES + [torch.float64])
def test_add_matches_ref_exactly(C, dtype, D):
    assert_add_matches(C, *add_case(B=9, T=5, D=D, N=4, dtype=dtype))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_add_large_batch_is_parallel_safe(C, dtype):  # B * D >= 2**19: the OpenMP path
    assert_add_matches(C, *add_case(B=130, T=3, D=4096, N=5, dtype=dtype))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_add_empty_batch(C, dtype):
    hidden = torch.randn(0, 4, 3).to(dtype)
    empty = torch.zeros(0, dtype=torch.long)
    out = C.add_at_positions(hidden, empty, empty, torch.randn(2, 3))
    assert out.shape == (0, 4, 3) and out.dtype == dtype


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("view", ["transposed", "strided_d", "sliced_t"])
def test_add_non_contiguous_hidden(C, dtype, view):
    gen = torch.Generator().manual_seed(4)
    B, T, D = 6, 5, 129
    if view == "transposed":
        hidden = torch.randn(B, D, T, generator=gen).to(dtype).transpose(1, 2)
    elif view == "strided_d":
        hidden = torch.randn(B, T, 2 * D, generator=gen).to(dtype)[..., ::2]
    else:
        hidden = torch.randn(B, T + 3, D, generator=gen).to(dtype)[:, 1 : T + 1]
    assert not hidden.is_contiguous()
    positions = torch.randint(0, T, (B,), generator=gen)
    assert_add_matches(C, hidden, positions, torch.randint(0, 3, (B,), generator=gen), torch.randn(3, D, generator=gen))


def test_add_shared_requests_and_negative_positions(C):
    hidden, _, _, delta = add_case(B=5, T=6, D=33, N=2, dtype=torch.bfloat16)
    assert_add_matches(C, hidden, torch.tensor([-1, 0, 5, -6, 3]), torch.tensor([1, 1, 0, 1, 1]), delta)


def test_add_rounds_like_torch_casts(C):
    # values whose fp32 sums sit near bf16/fp16 rounding boundaries (ties to even)
    D = 64
    base = torch.linspace(-3, 3, D)
    for dtype in (torch.bfloat16, torch.float16):
        hidden = base.to(dtype).reshape(1, 1, D).repeat(2, 3, 1)
        delta = torch.full((1, D), 2.0 ** -9) * torch.arange(D).remainder(5)
        assert_add_matches(C, hidden, torch.tensor([0, 2]), torch.tensor([0, 0]), delta)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: a.update(positions=a["positions"] + 10), "out of range"),
        (lambda a: a.update(rows=a["rows"] + 5), "out of range"),
        (lambda a: a.update(rows=a["rows"] - 5), "out of range"),
        (lambda a: a.update(positions=a["positions"][:, None]), "shape"),
        (lambda a: a.update(delta=a["delta"][:, :2]), "shape"),
        (lambda a: a.update(delta=a["delta"].long()), "floating point"),
        (lambda a: a.update(rows=a["rows"].int()), "int64"),
    ],
)
def test_add_rejects_bad_input(C, change, message):
    hidden, positions, rows, delta = add_case(B=5, T=6, D=4)
    args = dict(hidden=hidden, positions=positions, rows=rows, delta=delta)
    change(args)
    with pytest.raises(RuntimeError, match=message):
        C.add_at_positions(args["hidden"], args["positions"], args["rows"], args["delta"])


# --- the CUDA kernels (a GPU and a CUDA build of _C) -------------------------------------------


@pytest.fixture(scope="module")
def C_cuda(C):
    if not torch.cuda.is_available() or not C.has_cuda():
        pytest.skip("needs a GPU and alphaedit_fast._C built with CUDA")
    return C


@pytest.mark.parametrize("D", DIMS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("P", [1, 3])
def test_cuda_gather_matches_ref(C_cuda, dtype, D, P):
    args = [a.cuda() if torch.is_tensor(a) else a for a in gather_case(B=37, T=6, D=D, P=P, n_segments=5, dtype=dtype)]
    out = assert_gather_matches(C_cuda, *args)
    assert torch.equal(out, C_cuda.gather_segment_mean(*args))  # deterministic


@pytest.mark.parametrize("case", ["empty", "single_segment", "unused_segments", "non_contiguous", "many_rows"])
def test_cuda_gather_edge_cases(C_cuda, case):
    if case == "empty":
        hidden = torch.randn(0, 4, 9, device="cuda")
        empty = torch.zeros(0, dtype=torch.long, device="cuda")
        out = C_cuda.gather_segment_mean(hidden, empty.reshape(0, 1), empty, torch.zeros(0, device="cuda"), 3)
        assert torch.equal(out, torch.zeros(3, 9, device="cuda"))
        return
    if case == "many_rows":  # more rows than one CSR tile (1024) and than one block's warps take at once
        hidden, positions, segments, weights, n = gather_case(B=3000, T=4, D=257, P=1, n_segments=3)
    else:
        hidden, positions, segments, weights, n = gather_case(B=40, T=6, D=4097, P=2, n_segments=6,
                                                              dtype=torch.bfloat16)
    if case == "single_segment":
        segments, n = torch.zeros_like(segments), 1
    elif case == "unused_segments":
        segments = segments * 2 + 1
        n = 2 * n + 1
    elif case == "non_contiguous":
        hidden = hidden.transpose(0, 1).contiguous().transpose(0, 1)
    args = [a.cuda() if torch.is_tensor(a) else a for a in (hidden, positions, segments, weights, n)]
    assert_gather_matches(C_cuda, *args)


@pytest.mark.parametrize("D", DIMS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_cuda_add_matches_ref_exactly(C_cuda, dtype, D):
    assert_add_matches(C_cuda, *[a.cuda() for a in add_case(B=9, T=5, D=D, N=4, dtype=dtype)])


# --- the CUDA sources -------------------------------------------------------------------------


def find_nvcc():
    return shutil.which("nvcc") or next(
        (p for p in ("/usr/local/cuda/bin/nvcc",) if os.access(p, os.X_OK)), None)


def test_cuda_sources_compile_for_sm90(tmp_path):
    """csrc/ops_cuda.cu builds standalone (no torch headers) for Hopper; needs nvcc, not a GPU or _C."""
    nvcc = find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (PATH, /usr/local/cuda/bin)")
    cmd = [nvcc, "-c", "-arch=sm_90", "-O3", "-std=c++17", str(ROOT / "csrc" / "ops_cuda.cu"),
           "-o", str(tmp_path / "ops_cuda.o")]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    if proc.returncode != 0:
        print(proc.stderr)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stderr}"
    assert (tmp_path / "ops_cuda.o").stat().st_size > 0

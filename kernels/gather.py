"""Triton kernels for the two gather/scatter hot ops of an edit.

Each op is a private ``@triton.jit`` kernel ``_name_kernel`` and its launcher ``name_triton``; the
definitions they reproduce are ``gather_segment_mean_ref`` and ``add_at_positions_ref`` in
``alphaedit_fast.ops.ref``.

* ``gather_segment_mean_triton``: out[s] = sum over rows b of segment s of weights[b] * mean_p
  hidden[b, positions[b, p]]. Deterministic: the launcher sorts rows by segment (stable) and builds
  CSR offsets, and one program owns one (segment, D-block) tile, so there are no atomics and the
  result does not depend on scheduling.
* ``add_at_positions_triton``: a contiguous copy of hidden with hidden[b, positions[b]] +=
  delta[row_to_request[b]], the sum taken in fp32 and cast back to hidden's dtype.

``hidden`` may be fp32, bf16 or fp16 and need not be contiguous: the kernels take its strides.
Negative positions wrap around (position + T) as in PyTorch indexing; positions outside [-T, T)
are not checked (that would need a device sync). Block sizes are autotuned on D, except under the
Triton interpreter (``TRITON_INTERPRET=1``), where a single config is used.

This module imports Triton; the rest of the library imports it lazily, only when Triton exists.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

__all__ = ["gather_segment_mean_triton", "add_at_positions_triton"]

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

if _INTERPRET:  # autotuning in the interpreter is slow and meaningless
    _CONFIGS = [triton.Config({"BLOCK_D": 128}, num_warps=4)]
else:
    _CONFIGS = [
        triton.Config({"BLOCK_D": 128}, num_warps=2),
        triton.Config({"BLOCK_D": 256}, num_warps=2),
        triton.Config({"BLOCK_D": 256}, num_warps=4),
        triton.Config({"BLOCK_D": 512}, num_warps=4),
        triton.Config({"BLOCK_D": 1024}, num_warps=4),
        triton.Config({"BLOCK_D": 1024}, num_warps=8),
    ]


@triton.autotune(configs=_CONFIGS, key=["D"])
@triton.jit
def _gather_segment_mean_kernel(
    hidden_ptr,  # (B, T, D) fp32/bf16/fp16, strided
    pos_ptr,  # (B, P) int64, contiguous
    order_ptr,  # (B,) int64: rows sorted by segment (stable)
    offsets_ptr,  # (n_segments + 1,) int64: CSR offsets into order
    weight_ptr,  # (B,) fp32
    out_ptr,  # (n_segments, D) fp32, contiguous
    T,
    P,
    D,
    stride_hb,
    stride_ht,
    stride_hd,
    BLOCK_D: tl.constexpr,
):
    """One program: out[s, d-block] = sum_{b in segment s} w[b] * mean_p hidden[b, pos[b, p], d-block]."""
    seg = tl.program_id(0)
    pid_d = tl.program_id(1)
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = d < D
    d_off = d.to(tl.int64) * stride_hd
    start = tl.load(offsets_ptr + seg)
    end = tl.load(offsets_ptr + seg + 1)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    # While loops, not `for i in range(start, end)`: the Triton 3.6 interpreter cannot take
    # tensor-valued range bounds (runtime ints are tensors there) under NumPy >= 2.4
    # (triton-lang/triton#9171); compiled, both forms are runtime loops.
    i = start
    while i < end:
        b = tl.load(order_ptr + i)
        w = tl.load(weight_ptr + b)
        row = tl.zeros([BLOCK_D], dtype=tl.float32)
        p = 0
        while p < P:
            pos = tl.load(pos_ptr + b * P + p)
            pos = tl.where(pos < 0, pos + T, pos)
            x = tl.load(hidden_ptr + b * stride_hb + pos * stride_ht + d_off, mask=mask, other=0.0)
            row += x.to(tl.float32)
            p += 1
        acc += (row / P) * w
        i += 1
    tl.store(out_ptr + seg.to(tl.int64) * D + d, acc, mask=mask)


def gather_segment_mean_triton(hidden: torch.Tensor, positions: torch.Tensor, segment_ids: torch.Tensor,
                               weights: torch.Tensor, n_segments: int) -> torch.Tensor:
    """Weighted per-segment sum of per-row position means, as ``gather_segment_mean_ref``.

    hidden: (B, T, D) fp32/bf16/fp16 (any strides); positions: (B,) or (B, P) int;
    segment_ids: (B,) int in [0, n_segments); weights: (B,) float -> (n_segments, D) fp32.
    Segments with no rows (and an empty batch) give zeros.
    """
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be (B, T, D), got shape {tuple(hidden.shape)}")
    B, T, D = hidden.shape
    device = hidden.device
    out = torch.empty(n_segments, D, dtype=torch.float32, device=device)
    if B == 0 or n_segments == 0 or D == 0:
        return out.zero_()
    pos = positions.reshape(B, -1).to(device=device, dtype=torch.int64).contiguous()
    seg = segment_ids.reshape(B).to(device=device, dtype=torch.int64)
    w = weights.reshape(B).to(device=device, dtype=torch.float32).contiguous()
    counts = torch.bincount(seg, minlength=n_segments)
    if counts.numel() != n_segments:
        raise ValueError(f"segment_ids must lie in [0, {n_segments}), got max {counts.numel() - 1}")
    offsets = torch.zeros(n_segments + 1, dtype=torch.int64, device=device)
    torch.cumsum(counts, 0, out=offsets[1:])
    order = torch.argsort(seg, stable=True)

    def grid(meta):
        return (n_segments, triton.cdiv(D, meta["BLOCK_D"]))

    _gather_segment_mean_kernel[grid](
        hidden, pos, order, offsets, w, out, T, pos.shape[1], D,
        hidden.stride(0), hidden.stride(1), hidden.stride(2),
    )
    return out


@triton.jit
def _to_dtype_rtne(y, dtype: tl.constexpr):
    """Cast fp32 y to dtype rounding to nearest even, bit-exact with PyTorch's casts.

    bf16 is rounded by hand (as c10 does): the interpreter truncates fp32 -> bf16, and the
    manual form is what the hardware's cvt.rn.bf16.f32 computes anyway.
    """
    if dtype == tl.bfloat16:
        bits = y.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(y != y, 0x7FC0, rounded)  # NaN stays a (quiet) NaN
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return y.to(dtype)


@triton.autotune(configs=_CONFIGS, key=["D"])
@triton.jit
def _add_at_positions_kernel(
    hidden_ptr,  # (B, T, D) fp32/bf16/fp16, strided (read only)
    out_ptr,  # (B, T, D) same dtype, contiguous copy of hidden
    pos_ptr,  # (B,) int64
    req_ptr,  # (B,) int64: row -> request
    delta_ptr,  # (N, D) fp32, contiguous
    T,
    D,
    stride_hb,
    stride_ht,
    stride_hd,
    BLOCK_D: tl.constexpr,
):
    """One program: out[b, pos[b], d-block] = (hidden[b, pos[b], d-block] + delta[req[b], d-block]) in fp32."""
    b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = d < D
    pos = tl.load(pos_ptr + b)
    pos = tl.where(pos < 0, pos + T, pos)
    r = tl.load(req_ptr + b)
    x = tl.load(hidden_ptr + b * stride_hb + pos * stride_ht + d.to(tl.int64) * stride_hd, mask=mask, other=0.0)
    dv = tl.load(delta_ptr + r * D + d, mask=mask, other=0.0)
    y = x.to(tl.float32) + dv
    tl.store(out_ptr + (b * T + pos) * D + d, _to_dtype_rtne(y, out_ptr.dtype.element_ty), mask=mask)


def add_at_positions_triton(hidden: torch.Tensor, positions: torch.Tensor, row_to_request: torch.Tensor,
                            delta: torch.Tensor) -> torch.Tensor:
    """Copy of hidden with hidden[b, positions[b]] += delta[row_to_request[b]], as ``add_at_positions_ref``.

    hidden: (B, T, D) fp32/bf16/fp16 (any strides); positions, row_to_request: (B,) int;
    delta: (N, D) float -> (B, T, D) in hidden's dtype. The sum is taken in fp32. Not differentiable.
    """
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be (B, T, D), got shape {tuple(hidden.shape)}")
    B, T, D = hidden.shape
    device = hidden.device
    out = hidden.clone(memory_format=torch.contiguous_format)
    if B == 0 or D == 0:
        return out
    pos = positions.reshape(B).to(device=device, dtype=torch.int64).contiguous()
    req = row_to_request.reshape(B).to(device=device, dtype=torch.int64).contiguous()
    dl = delta.to(device=device, dtype=torch.float32).contiguous()
    if dl.dim() != 2 or dl.shape[1] != D:
        raise ValueError(f"delta must be (N, {D}), got shape {tuple(delta.shape)}")

    def grid(meta):
        return (B, triton.cdiv(D, meta["BLOCK_D"]))

    # The kernel reads hidden and writes out, so reruns (autotuning) are idempotent.
    _add_at_positions_kernel[grid](
        hidden, out, pos, req, dl, T, D, hidden.stride(0), hidden.stride(1), hidden.stride(2),
    )
    return out

"""Hot ops of editing, registered as `alphaedit::*` custom ops, with one backend switch.

`ALPHAEDIT_BACKEND=auto|triton|ext|torch`: `auto` takes Triton for CUDA tensors (else the
compiled extension's CUDA kernels), the extension's OpenMP kernels for CPU tensors, and falls
back quietly to PyTorch when a backend is missing; a backend named explicitly that cannot run
raises `BackendError`. Every op has a PyTorch reference `name_ref` (ops/ref.py).
"""

from __future__ import annotations

import functools
import os

import torch

from ..errors import AlphaEditError
from ..extension import _C
from .ref import add_at_positions_ref, gather_segment_mean_ref, second_moment_update_ref_

BACKENDS = ("auto", "triton", "ext", "torch")
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class BackendError(AlphaEditError, RuntimeError):
    """The backend named in ALPHAEDIT_BACKEND cannot run this op on these tensors."""


@functools.cache
def _triton_gather():
    try:
        from ..kernels import gather
    except ImportError:  # triton missing
        return None
    return gather


def _triton_usable(device: torch.device) -> bool:
    return _triton_gather() is not None and (device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")


def _ext_usable(device: torch.device) -> bool:
    return _C is not None and (device.type == "cpu" or (device.type == "cuda" and _C.has_cuda()))


def backend_for(hidden: torch.Tensor) -> str:
    """The backend that runs an op on `hidden`, from ALPHAEDIT_BACKEND and what is installed."""
    setting = os.environ.get("ALPHAEDIT_BACKEND", "auto")
    if setting not in BACKENDS:
        raise BackendError(f"ALPHAEDIT_BACKEND={setting!r}; expected one of {BACKENDS}")
    device = hidden.device
    if setting == "torch":
        return "torch"
    if setting != "auto":
        usable = _triton_usable(device) if setting == "triton" else _ext_usable(device)
        if not usable:
            why = ("triton is not installed or the tensor is not on a GPU" if setting == "triton"
                   else "the compiled extension alphaedit_fast._C is not built for this device")
            raise BackendError(f"ALPHAEDIT_BACKEND={setting} cannot run on {device.type} tensors here ({why}); "
                               "use auto or torch")
        if hidden.dtype not in KERNEL_DTYPES:
            raise BackendError(f"the {setting} kernels take {KERNEL_DTYPES}, got {hidden.dtype}")
        return setting
    if hidden.dtype not in KERNEL_DTYPES:
        return "torch"
    if device.type == "cuda" and _triton_usable(device):
        return "triton"
    return "ext" if _ext_usable(device) else "torch"


@torch.library.custom_op("alphaedit::gather_segment_mean", mutates_args=())
def _gather_segment_mean(hidden: torch.Tensor, positions: torch.Tensor, segment_ids: torch.Tensor,
                         weights: torch.Tensor, n_segments: int) -> torch.Tensor:
    backend = backend_for(hidden)
    positions = positions if positions.ndim == 2 else positions[:, None]
    if backend == "triton":
        return _triton_gather().gather_segment_mean_triton(hidden, positions, segment_ids, weights, n_segments)
    if backend == "ext":
        return _C.gather_segment_mean(hidden, positions, segment_ids, weights, n_segments)
    return gather_segment_mean_ref(hidden, positions, segment_ids, weights, n_segments)


@_gather_segment_mean.register_fake
def _(hidden, positions, segment_ids, weights, n_segments):
    return hidden.new_empty((n_segments, hidden.shape[-1]), dtype=torch.promote_types(hidden.dtype, torch.float32))


def gather_segment_mean(hidden: torch.Tensor, positions: torch.Tensor, segment_ids: torch.Tensor,
                        weights: torch.Tensor, n_segments: int) -> torch.Tensor:
    """out[s] = sum over rows b of segment s of weights[b] * mean_p hidden[b, positions[b, p]].

    hidden: (B, T, D) fp32/bf16/fp16; positions: (B,) or (B, P) int64; segment_ids: (B,) int64;
    weights: (B,) fp32 -> (n_segments, D) fp32. compute_ks's gather and its two-level template
    average in one pass (weights = 1 / (groups * group size)).
    """
    return _gather_segment_mean(hidden, positions, segment_ids, weights.float(), n_segments)


@torch.library.custom_op("alphaedit::add_at_positions", mutates_args=())
def _add_at_positions(hidden: torch.Tensor, positions: torch.Tensor, row_to_request: torch.Tensor,
                      delta: torch.Tensor) -> torch.Tensor:
    backend = backend_for(hidden)
    if backend == "triton":
        return _triton_gather().add_at_positions_triton(hidden, positions, row_to_request, delta)
    if backend == "ext":
        return _C.add_at_positions(hidden, positions, row_to_request, delta)
    return add_at_positions_ref(hidden, positions, row_to_request, delta)


@_add_at_positions.register_fake
def _(hidden, positions, row_to_request, delta):
    return torch.empty_like(hidden, memory_format=torch.contiguous_format)


def _add_at_positions_setup(ctx, inputs, output):
    _, positions, row_to_request, delta = inputs
    ctx.save_for_backward(positions, row_to_request)
    ctx.n_requests, ctx.delta_dtype = delta.shape[0], delta.dtype


def _add_at_positions_backward(ctx, grad):
    positions, row_to_request = ctx.saved_tensors
    ones = torch.ones(positions.shape[0], dtype=torch.float32, device=grad.device)
    grad_delta = _gather_segment_mean(grad, positions, row_to_request, ones, ctx.n_requests)
    return grad, None, None, grad_delta.to(ctx.delta_dtype)


_add_at_positions.register_autograd(_add_at_positions_backward, setup_context=_add_at_positions_setup)


def add_at_positions(hidden: torch.Tensor, positions: torch.Tensor, row_to_request: torch.Tensor,
                     delta: torch.Tensor) -> torch.Tensor:
    """A copy of hidden (B, T, D) with hidden[b, positions[b]] += delta[row_to_request[b]].

    positions, row_to_request: (B,) int64; delta: (N, D) fp32, summed in fp32 and cast to
    hidden's dtype. The backward sums the gradient of each request's positions into its row
    of delta (and passes the gradient of hidden through unchanged).
    """
    return _add_at_positions(hidden, positions, row_to_request, delta)


@torch.library.custom_op("alphaedit::second_moment_update_", mutates_args=("acc",))
def _second_moment_update_(acc: torch.Tensor, x: torch.Tensor) -> None:
    if x.device.type == "cuda" and x.dtype in (torch.bfloat16, torch.float16) and acc.dtype == torch.float32:
        acc.add_(torch.mm(x.T, x, out_dtype=torch.float32))  # cuBLAS accumulates in fp32: no fp32 copy of x
        return
    for start in range(0, x.shape[0], 8192):  # bound the fp32 copy of a bf16/fp16 chunk
        second_moment_update_ref_(acc, x[start : start + 8192])


@_second_moment_update_.register_fake
def _(acc, x):
    return None


def second_moment_update_(acc: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """acc (D, D) fp32 += x^T x for rows x (N, D) of any float dtype (BLAS/cuBLAS); returns acc."""
    _second_moment_update_(acc, x)
    return acc


__all__ = [
    "BACKENDS",
    "BackendError",
    "add_at_positions",
    "add_at_positions_ref",
    "backend_for",
    "gather_segment_mean",
    "gather_segment_mean_ref",
    "second_moment_update_",
    "second_moment_update_ref_",
]

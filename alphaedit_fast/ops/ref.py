"""PyTorch references of the hot ops: the definitions every backend is tested against."""

from __future__ import annotations

import torch


def gather_segment_mean_ref(hidden: torch.Tensor, positions: torch.Tensor, segment_ids: torch.Tensor,
                            weights: torch.Tensor, n_segments: int) -> torch.Tensor:
    """out[s] = sum over rows b with segment_ids[b] == s of weights[b] * mean_p hidden[b, positions[b, p]].

    hidden: (B, T, D) fp32/bf16/fp16; positions: (B,) or (B, P) int64; segment_ids: (B,) int64
    in [0, n_segments); weights: (B,) fp32 -> (n_segments, D) fp32, accumulated in fp32
    (fp64 in and out for fp64 input).
    """
    acc = torch.promote_types(hidden.dtype, torch.float32)
    pos = positions if positions.ndim == 2 else positions[:, None]
    rows = torch.arange(hidden.shape[0], device=hidden.device)[:, None]
    picked = hidden[rows, pos].to(acc).mean(1)  # (B, D)
    out = torch.zeros(n_segments, hidden.shape[-1], dtype=acc, device=hidden.device)
    return out.index_add_(0, segment_ids, picked * weights.to(acc)[:, None])


def add_at_positions_ref(hidden: torch.Tensor, positions: torch.Tensor, row_to_request: torch.Tensor,
                         delta: torch.Tensor) -> torch.Tensor:
    """A copy of hidden (B, T, D) with hidden[b, positions[b]] += delta[row_to_request[b]].

    positions, row_to_request: (B,) int64; delta: (N, D) fp32. The sum is taken in fp32 (fp64
    for fp64 input) and cast to hidden's dtype.
    """
    acc = torch.promote_types(hidden.dtype, torch.float32)
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    edited = (hidden[rows, positions].to(acc) + delta[row_to_request].to(acc)).to(hidden.dtype)
    return hidden.index_put((rows, positions), edited)


def second_moment_update_ref_(acc: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """acc (D, D) += x^T x for rows x (N, D) of any float dtype, in acc's dtype; returns acc."""
    xf = x.to(acc.dtype)
    return acc.addmm_(xf.T, xf)

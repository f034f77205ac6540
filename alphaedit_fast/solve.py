"""The per-layer solve of DESIGN step 4."""

from __future__ import annotations

import torch


def dense_update(P: torch.Tensor, keys: torch.Tensor, cache: torch.Tensor, resid: torch.Tensor,
                 l2: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Delta = (P (K K^T + C) + l2 I)^-1 P K R^T, the original's dense form.

    P, cache: (d_k, d_k); keys: (d_k, n); resid: (d_model, n) -> (d_k, d_model) in `dtype`.
    """
    P, keys, cache, resid = (t.to(dtype) for t in (P, keys, cache, resid))
    eye = torch.eye(keys.shape[0], dtype=dtype, device=keys.device)
    return torch.linalg.solve(P @ (keys @ keys.T + cache) + l2 * eye, P @ keys @ resid.T)

"""The per-layer solve of DESIGN step 4, in three exact forms, and the per-layer state it needs.

With P = U U^T (U: d_k x r, orthonormal) the solution of the original's dense system
    (P (K K^T + C) + l2 I) Delta = P K R^T
lies in range(P): Delta = U X with the symmetric positive-definite r x r system
    (U^T (K K^T + C) U + l2 I) X = U^T K R^T.
Only Cp = U^T C U is ever needed, so the cache is kept projected (r x r). With fewer keys than
null-space dimensions, Woodbury turns the r x r solve into an n x n one given M^-1 = (Cp + l2 I)^-1.
"""

from __future__ import annotations

import torch

from .errors import NonFiniteError, ShapeError

SOLVERS = ("auto", "dense", "cholesky", "woodbury")


def dense_update(P: torch.Tensor, keys: torch.Tensor, cache: torch.Tensor, resid: torch.Tensor,
                 l2: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Delta = (P (K K^T + C) + l2 I)^-1 P K R^T, the original's dense form.

    P, cache: (d_k, d_k); keys: (d_k, n); resid: (d_model, n) -> (d_k, d_model) in `dtype`.
    """
    P, keys, cache, resid = (t.to(dtype) for t in (P, keys, cache, resid))
    eye = torch.eye(keys.shape[0], dtype=dtype, device=keys.device)
    return torch.linalg.solve(P @ (keys @ keys.T + cache) + l2 * eye, P @ keys @ resid.T)


def zero_cache_update(P: torch.Tensor, keys: torch.Tensor, resid: torch.Tensor, l2: float,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """`dense_update` when C = 0, with n x n work instead of d_k x d_k: by the push-through
    identity (P K K^T + l2 I)^-1 P K = P K (K^T P K + l2 I)^-1, exact for l2 > 0 (K^T P K is
    positive semi-definite, P being an orthogonal projector).

    P: (d_k, d_k); keys: (d_k, n); resid: (d_model, n) -> (d_k, d_model) in `dtype`.
    """
    P, keys, resid = (t.to(dtype) for t in (P, keys, resid))
    projected = P @ keys
    system = keys.T @ projected + l2 * torch.eye(keys.shape[1], dtype=dtype, device=keys.device)
    return projected @ torch.linalg.solve(system, resid.T)


def _cholesky(matrix: torch.Tensor, what: str) -> torch.Tensor:
    factor, info = torch.linalg.cholesky_ex(matrix)
    if int(info) != 0:
        raise NonFiniteError(f"{what} is not positive definite (non-finite keys or a negative L2?)")
    return factor


def projected_update(basis: torch.Tensor, cache_proj: torch.Tensor, keys: torch.Tensor, resid: torch.Tensor,
                     l2: float) -> torch.Tensor:
    """Delta = U (Cp + B B^T + l2 I)^-1 B R^T with B = U^T K, by Cholesky.

    basis U: (d_k, r); cache_proj Cp: (r, r); keys: (d_k, n); resid: (d_model, n), all in one
    dtype -> (d_k, d_model).
    """
    projected_keys = basis.T @ keys
    system = cache_proj + projected_keys @ projected_keys.T
    system.diagonal().add_(l2)
    factor = _cholesky(system, "the projected system U^T (K K^T + C) U + l2 I")
    # (U S^-1 B) R^T: n right-hand sides and a rank-n product instead of d_model of each
    return (basis @ torch.cholesky_solve(projected_keys, factor)) @ resid.T


def woodbury_update(basis: torch.Tensor, inv_m: torch.Tensor, keys: torch.Tensor, resid: torch.Tensor) -> torch.Tensor:
    """The same Delta from M^-1 = (Cp + l2 I)^-1 (r, r): U M^-1 B (I_n + B^T M^-1 B)^-1 R^T.

    O(r^2 n + n^3) instead of O(r^3): worth it when n keys << r null-space dimensions. The
    r x n part runs in inv_m's dtype (fp64 keeps the maintained inverse accurate), the
    d_k-sized products in the basis dtype.
    """
    projected_keys = (basis.T @ keys).to(inv_m.dtype)
    m_inv_b = inv_m @ projected_keys
    small = projected_keys.T @ m_inv_b
    small.diagonal().add_(1.0)
    factor = _cholesky(small, "the Woodbury system I + B^T M^-1 B")
    solved = (m_inv_b @ torch.cholesky_inverse(factor)).to(basis.dtype)
    return (basis @ solved) @ resid.T


def woodbury_absorb(inv_m: torch.Tensor, projected_keys: torch.Tensor) -> torch.Tensor:
    """(M + B B^T)^-1 from M^-1 (r, r) and B (r, n), in O(r^2 n)."""
    m_inv_b = inv_m @ projected_keys
    small = projected_keys.T @ m_inv_b
    small.diagonal().add_(1.0)
    factor = _cholesky(small, "the Woodbury system I + B^T M^-1 B")
    return inv_m - m_inv_b @ torch.cholesky_solve(m_inv_b.T, factor)


class DenseSolver:
    """The original's solve on dense P and cache_c (len(layers), d_k, d_k); the cache update is
    returned as a new tensor (`new_cache`), never written into the caller's. Unless
    `original_form`, a layer whose cache is zero (a first batch) is solved by `zero_cache_update`."""

    def __init__(self, P: torch.Tensor, cache_c: torch.Tensor, l2: float, original_form: bool = True):
        self.P, self.cache_c, self.l2, self.original_form = P, cache_c, l2, original_form
        self.new_cache: torch.Tensor | None = None

    def update(self, index: int, keys: torch.Tensor, resid: torch.Tensor) -> torch.Tensor:
        device = keys.device
        if not self.original_form and self.l2 > 0 and not self.cache_c[index].any():
            return zero_cache_update(self.P[index].to(device), keys, resid, self.l2)
        return dense_update(self.P[index].to(device), keys, self.cache_c[index].to(device), resid, self.l2)

    def absorb(self, keys_per_layer: list[torch.Tensor]) -> None:
        new_cache = self.cache_c.clone()
        for i, keys in enumerate(keys_per_layer):
            new_cache[i] += (keys @ keys.T).to(new_cache.device, new_cache.dtype)
        self.new_cache = new_cache


class FactoredDenseSolver(DenseSolver):
    """Dense P and cache_c in and out (the original API), solved in the null space: with
    P = U U^T, only U^T C U (r, r) enters the solve, never the d_k x d_k system."""

    def __init__(self, bases: list[torch.Tensor], P: torch.Tensor, cache_c: torch.Tensor, l2: float):
        super().__init__(P, cache_c, l2)
        self.bases = bases

    def update(self, index: int, keys: torch.Tensor, resid: torch.Tensor) -> torch.Tensor:
        basis = self.bases[index].to(keys.device, torch.float32)
        if basis.shape[1] == 0:
            return keys.new_zeros(keys.shape[0], resid.shape[0])
        cache = self.cache_c[index].to(keys.device, torch.float32)
        return projected_update(basis, basis.T @ cache @ basis, keys.float(), resid.float(), self.l2)


class ProjectedSolver:
    """Per-layer factored projector U (d_k, r) and projected cache Cp (r, r), kept on each
    layer's device; solves by Cholesky or Woodbury (`method`, "auto" picks by n vs r)."""

    def __init__(self, bases: list[torch.Tensor], l2: float, method: str = "auto",
                 dtype: torch.dtype = torch.float32, cache_proj: list[torch.Tensor] | None = None):
        if method not in SOLVERS or method == "dense":
            raise ValueError(f"method must be one of auto, cholesky, woodbury; got {method!r}")
        # row-major throughout (QR gives column-major bases, a Woodbury update a transposed inverse):
        # a BLAS picks its kernel by layout, and a checkpoint's tensors must compute as the originals did
        self.bases = [u.to(dtype).contiguous() for u in bases]
        self.cache_proj = cache_proj or [u.new_zeros(u.shape[1], u.shape[1]) for u in self.bases]
        for u, cp in zip(self.bases, self.cache_proj):
            if cp.shape != (u.shape[1], u.shape[1]):
                raise ShapeError(f"projected cache must be (r, r) = {(u.shape[1],) * 2}, got {tuple(cp.shape)}")
        self.l2, self.method, self.dtype = l2, method, dtype
        self._inv_m: list[torch.Tensor | None] = [None] * len(self.bases)  # (Cp + l2 I)^-1 in fp64

    def choose(self, index: int, n_keys: int) -> str:
        if self.method != "auto":
            return self.method
        return "woodbury" if 4 * n_keys < self.bases[index].shape[1] else "cholesky"

    def _inverse(self, index: int) -> torch.Tensor:
        if self._inv_m[index] is None:
            m = self.cache_proj[index].to(torch.float64)
            m.diagonal().add_(self.l2)
            self._inv_m[index] = torch.cholesky_inverse(_cholesky(m, "Cp + l2 I")).contiguous()
        return self._inv_m[index]

    def update(self, index: int, keys: torch.Tensor, resid: torch.Tensor) -> torch.Tensor:
        basis = self.bases[index]
        if basis.shape[1] == 0:
            return keys.new_zeros(keys.shape[0], resid.shape[0])
        keys, resid = keys.to(self.dtype), resid.to(self.dtype)
        if self.choose(index, keys.shape[1]) == "woodbury":
            return woodbury_update(basis, self._inverse(index), keys, resid)
        return projected_update(basis, self.cache_proj[index], keys, resid, self.l2)

    def absorb(self, keys_per_layer: list[torch.Tensor]) -> None:
        """Cp += (U^T K)(U^T K)^T for each layer; the maintained inverses follow by Woodbury.
        All new state is computed before any is stored."""
        projected = [u.T @ k.to(u.dtype) for u, k in zip(self.bases, keys_per_layer)]
        new_cache = [cp + b @ b.T for cp, b in zip(self.cache_proj, projected)]
        new_inv = [None if inv is None else woodbury_absorb(inv, b.to(inv.dtype)).contiguous()
                   for inv, b in zip(self._inv_m, projected)]
        self.cache_proj, self._inv_m = new_cache, new_inv

    def state_tensors(self, layers: list[int]) -> dict[str, torch.Tensor]:
        """Everything later updates depend on, by name: each layer's projected cache
        `layer.{l}.cache_proj` (r, r) and, where one is maintained, `layer.{l}.inverse` (r, r) fp64
        (updated by Woodbury, not recomputed: a fresh Cholesky inverse differs at rounding level)."""
        out = {}
        for layer, cache, inverse in zip(layers, self.cache_proj, self._inv_m):
            out[f"layer.{layer}.cache_proj"] = cache
            if inverse is not None:
                out[f"layer.{layer}.inverse"] = inverse
        return out

    def load_state_tensors(self, layers: list[int], tensors: dict[str, torch.Tensor]) -> None:
        """Put back what `state_tensors` returned (on each layer's device, in the solver's dtypes)."""
        for i, (layer, basis) in enumerate(zip(layers, self.bases)):
            cache = tensors[f"layer.{layer}.cache_proj"]
            if cache.shape != (basis.shape[1], basis.shape[1]):
                raise ShapeError(f"projected cache of layer {layer} must be {(basis.shape[1],) * 2}, "
                                 f"got {tuple(cache.shape)}")
            self.cache_proj[i] = cache.to(basis.device, basis.dtype)
            inverse = tensors.get(f"layer.{layer}.inverse")
            self._inv_m[i] = None if inverse is None else inverse.to(basis.device, torch.float64)

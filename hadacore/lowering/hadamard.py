"""Native (non-Triton) Hadamard transform: the CPU implementation of ``hadacore::hadamard``.

Kronecker-factored: ``H_n = (H_m kron H_{f1} kron ... kron H_{fr})^T`` with small
power-of-two factors, so each factor is one BLAS matmul along one axis of the row.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor

from hadacore.hadamard import hadamard_base, hadamard_factors, sylvester

_MAX_FACTOR = 64


@functools.lru_cache(maxsize=64)
def _factor_matrix(kind: str, size: int, dtype: torch.dtype, device: str) -> Tensor:
    if kind == "base":  # applied from the left: y_i = sum_j H_m[i, j] x_j  ->  x @ H_m^T
        return hadamard_base(size).t().to(dtype=dtype, device=device).contiguous()
    return sylvester(size, dtype).to(device)


def _pow2_factors(p: int) -> list[int]:
    out = []
    while p > 1:
        f = min(p, _MAX_FACTOR)
        out.append(f)
        p //= f
    return out


def hadamard_native(x: Tensor, scale: float = 1.0, signs: Optional[Tensor] = None, perm: Optional[Tensor] = None) -> Tensor:
    n = x.shape[-1]
    m, p = hadamard_factors(n)
    if x.numel() == 0:
        return torch.empty(x.shape, dtype=x.dtype, device=x.device)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = x.reshape(-1, n).to(acc)
    if signs is not None:
        y = y * signs.to(acc)
    factors = ([("base", m)] if m > 1 else []) + [("pow2", f) for f in _pow2_factors(p)]
    dims = [f for _, f in factors]
    y = y.reshape(-1, *dims)
    for axis, (kind, f) in enumerate(factors, start=1):
        h = _factor_matrix(kind, f, acc, str(x.device))
        y = torch.matmul(y.movedim(axis, -1), h).movedim(-1, axis)
    y = y.reshape(-1, n)
    if scale != 1.0:
        y = y * scale
    if perm is not None:
        y = y[:, perm.long()]
    return y.to(x.dtype).reshape(x.shape)

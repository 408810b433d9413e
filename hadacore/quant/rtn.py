"""Round-to-nearest (RTN) quantization into GPTQ tensors.

The grid is GPTQ's: asymmetric ranges include 0 (``xmin <= 0 <= xmax``); symmetric uses
``scale = 2 * amax / maxq`` with zero ``(maxq + 1) / 2`` (8 for 4 bits), so stored
symmetric checkpoints carry zero 8, as every GPTQ loader expects.
"""

from __future__ import annotations

import torch

from hadacore.quant.format import default_g_idx, pack_gptq

__all__ = ["quant_grid", "quantize_rtn", "rtn_gptq_tensors"]


def quant_grid(w: torch.Tensor, bits: int = 4, sym: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, zero)`` per row of ``w [R, C]`` (fp32 scale, integer-valued fp32 zero)."""
    maxq = (1 << bits) - 1
    w = w.float()
    xmin = w.amin(dim=1).clamp(max=0)
    xmax = w.amax(dim=1).clamp(min=0)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = -xmax
    flat = (xmin == 0) & (xmax == 0)  # an all-zero row: any grid is exact; use [-1, 1]
    xmin = torch.where(flat, -1.0, xmin)
    xmax = torch.where(flat, 1.0, xmax)
    scale = (xmax - xmin) / maxq
    if sym:
        zero = torch.full_like(scale, (maxq + 1) // 2)
    else:
        zero = torch.round(-xmin / scale)
    return scale, zero


def quantize_rtn(
    w: torch.Tensor, bits: int = 4, group_size: int = 128, sym: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(intweight [N, K] int32, scales [G, N] fp32, zeros [G, N] int32)`` for ``w [N, K]``."""
    if w.dim() != 2:
        raise ValueError(f"weight must be [N, K], got {tuple(w.shape)}")
    n, k = w.shape
    gs = k if group_size == -1 else group_size
    if gs <= 0 or k % gs:
        raise ValueError(f"group_size {group_size} does not divide the input size {k}")
    maxq = (1 << bits) - 1
    groups = w.float().reshape(n, k // gs, gs).transpose(0, 1).reshape(-1, gs)  # [G*N, gs]
    scale, zero = quant_grid(groups, bits, sym)
    q = torch.clamp(torch.round(groups / scale[:, None]) + zero[:, None], 0, maxq)
    intweight = q.reshape(k // gs, n, gs).transpose(0, 1).reshape(n, k).to(torch.int32)
    return intweight, scale.reshape(k // gs, n), zero.reshape(k // gs, n).to(torch.int32)


def rtn_gptq_tensors(
    w: torch.Tensor, bits: int = 4, group_size: int = 128, sym: bool = True, scale_dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """RTN-quantize ``w [N, K]`` straight into GPTQ v1 tensors (scales in ``scale_dtype``, default w's)."""
    intweight, scales, zeros = quantize_rtn(w, bits, group_size, sym)
    g_idx = default_g_idx(w.shape[1], group_size, device=w.device)
    return pack_gptq(intweight, scales.to(scale_dtype or w.dtype), zeros, g_idx, bits)

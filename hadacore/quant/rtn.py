"""Round-to-nearest (RTN) quantization into GPTQ tensors.

The grid is GPTQ's: asymmetric ranges include 0 (``xmin <= 0 <= xmax``); symmetric uses
``scale = 2 * amax / maxq`` with zero ``(maxq + 1) / 2`` (8 for 4 bits), so stored
symmetric checkpoints carry zero 8, as every GPTQ loader expects. An asymmetric range
whose zero would round to 0 (it starts within half a step of 0) gets zero 1 and the step
``xmax / (maxq - 1)`` instead: GPTQ v1 stores ``zero - 1`` and cannot hold 0.

Every element of ``dequant(quant(w))`` is within half a step of ``w`` (with the step
actually stored: the integers are rounded on the stored scale's grid), unless ``clip``
(weight-clipping search) is on: then a row's range may shrink, clipping its extremes,
whenever that lowers the row's total error.
"""

from __future__ import annotations

import torch

from hadacore.formats.gptq import default_g_idx, pack_gptq

__all__ = ["quant_grid", "quantize_rtn", "rtn_gptq_tensors"]


# Clip search as GPTQ's reference Quantizer with ``mse=True`` (and QuaRot's ``w_clip``):
# shrink factors 1, 0.99, ..., 0.81, error norm 2.4.
CLIP_GRID = 100
CLIP_MAXSHRINK = 0.2
CLIP_NORM = 2.4


def _range_grid(xmin: torch.Tensor, xmax: torch.Tensor, maxq: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, zero)`` for ranges with ``xmin <= 0 <= xmax`` (symmetric: ``xmin = -xmax``)."""
    flat = (xmin == 0) & (xmax == 0)  # an all-zero row: any grid is exact; use [-1, 1]
    xmin = torch.where(flat, -1.0, xmin)
    xmax = torch.where(flat, 1.0, xmax)
    scale = (xmax - xmin) / maxq
    if sym:
        zero = torch.full_like(scale, (maxq + 1) // 2)
    else:
        zero = torch.round(-xmin / scale)
        at0 = zero == 0  # then xmax > 0 and xmin > -scale / 2 >= -new scale
        scale = torch.where(at0, xmax / (maxq - 1), scale)
        zero = torch.where(at0, torch.ones_like(zero), zero)
    return scale, zero


def quant_grid(
    w: torch.Tensor, bits: int = 4, sym: bool = True, *, clip: bool = False,
    scale_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, zero)`` per row of ``w [R, C]`` (fp32 scale, integer-valued fp32 zero).

    ``clip=True`` searches, per row, the range ``(p * xmin, p * xmax)`` over shrink factors
    ``p = 1, 0.99, ..., 0.81`` that minimizes ``sum |dequant(quant(w)) - w| ** 2.4``
    (GPTQ's ``mse=True``): outliers are clipped when that lowers the row's total error.
    ``p = 1`` is a candidate, so the chosen grid's error is never above the plain one's.
    Candidates are scored with the scale rounded to ``scale_dtype``, the one stored.
    """
    maxq = (1 << bits) - 1
    w = w.float()
    xmin = w.amin(dim=1).clamp(max=0)
    xmax = w.amax(dim=1).clamp(min=0)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = -xmax
    if not clip:
        return _range_grid(xmin, xmax, maxq, sym)
    best_err = best_scale = best_zero = None
    for i in range(int(CLIP_MAXSHRINK * CLIP_GRID)):
        p = 1 - i / CLIP_GRID
        scale, zero = _range_grid(p * xmin, p * xmax, maxq, sym)
        scale = scale.to(scale_dtype).float()
        q = torch.clamp(torch.round(w / scale[:, None]) + zero[:, None], 0, maxq)
        err = (scale[:, None] * (q - zero[:, None]) - w).abs_().pow_(CLIP_NORM).sum(dim=1)
        if best_err is None:
            best_err, best_scale, best_zero = err, scale, zero
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_scale = torch.where(better, scale, best_scale)
            best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


def quantize_rtn(
    w: torch.Tensor, bits: int = 4, group_size: int = 128, sym: bool = True,
    scale_dtype: torch.dtype = torch.float32, clip: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(intweight [N, K] int32, scales [G, N] in scale_dtype, zeros [G, N] int32)`` for ``w [N, K]``.

    The scales are rounded to ``scale_dtype`` before the weights are, so the integers
    sit on the grid that is stored. ``clip``: per-group clip search (:func:`quant_grid`).
    """
    if w.dim() != 2:
        raise ValueError(f"weight must be [N, K], got {tuple(w.shape)}")
    n, k = w.shape
    gs = k if group_size == -1 else group_size
    if gs <= 0 or k % gs:
        raise ValueError(f"group_size {group_size} does not divide the input size {k}")
    maxq = (1 << bits) - 1
    groups = w.float().reshape(n, k // gs, gs).transpose(0, 1).reshape(-1, gs)  # [G*N, gs]
    scale, zero = quant_grid(groups, bits, sym, clip=clip, scale_dtype=scale_dtype)
    scale = scale.to(scale_dtype)
    q = torch.clamp(torch.round(groups / scale.float()[:, None]) + zero[:, None], 0, maxq)
    intweight = q.reshape(k // gs, n, gs).transpose(0, 1).reshape(n, k).to(torch.int32)
    return intweight, scale.reshape(k // gs, n), zero.reshape(k // gs, n).to(torch.int32)


def rtn_gptq_tensors(
    w: torch.Tensor, bits: int = 4, group_size: int = 128, sym: bool = True, scale_dtype: torch.dtype | None = None,
    clip: bool = False,
) -> dict[str, torch.Tensor]:
    """RTN-quantize ``w [N, K]`` straight into GPTQ v1 tensors (scales in ``scale_dtype``, default w's; ``clip``: clip search)."""
    intweight, scales, zeros = quantize_rtn(w, bits, group_size, sym, scale_dtype or w.dtype, clip)
    g_idx = default_g_idx(w.shape[1], group_size, device=w.device)
    return pack_gptq(intweight, scales, zeros, g_idx, bits)

"""FP8 attention with R3: the ``hadacore::fp8_attention`` op, its CPU emulation, and the
quantization math the Triton kernel shares.

What the op computes (``q [B, Hq, S, D]``, ``k``/``v`` ``[B, Hkv, S_kv, D]`` after RoPE,
``Hq`` a multiple of ``Hkv``: GQA, query head ``h`` reads KV head ``h // (Hq // Hkv)``):

1. **R3** (``rotate=True``): ``q <- q H_D / sqrt(D)``, ``k <- k H_D / sqrt(D)`` along D with
   ``hadacore.hadamard_matrix(D)``, in fp32. Exact for the scores because the rotation is
   orthogonal, ``(qR)(kR)^T = q k^T``; it spreads outlier channels over all of D, so a
   per-head FP8 scale is no longer set by a few huge channels.
2. **FP8 Q and K** (``quantize=True``): per (batch, head) dynamic scale
   ``s = amax(|x|) / 448`` over that head's ``[S, D]`` slice, ``x8 = float8_e4m3fn(x / s)``
   (round to nearest even, saturating at +-448). These are the FP8 tensors.
3. ``scores = (q8 @ k8^T) * (s_q * s_k * scale)``: FP8 x FP8 products, fp32 accumulation,
   the scales applied to the fp32 scores. ``scale`` defaults to ``1/sqrt(D)`` as in SDPA.
4. Optional causal mask with SDPA's (top-left) alignment: query ``i`` sees keys ``j <= i``;
   or SDPA's explicit ``attn_mask`` (boolean or additive, broadcastable to
   ``[B, Hq, S, S_kv]``). A row with no visible key outputs 0, as SDPA on CPU does.
5. Softmax in fp32; ``P @ V`` with **V in the input dtype (not FP8)** -- P rounded to
   V's dtype for the dot on CUDA, fp32 accumulation. Output ``[B, Hq, S, D]`` in q's dtype.

So only Q and K are FP8 (the ``QK^T`` GEMM); V, P, the softmax and all accumulators are
16-bit or fp32.

Devices: CPU (and anything not CUDA) runs :func:`fp8_attention_emulated` -- the same
rotation and real ``float8_e4m3fn`` round trips, then exact fp32 attention on the
dequantized values -- so accuracy can be measured anywhere. CUDA runs the Triton kernels in
:mod:`hadacore.kernels.triton.fp8_attention`: a fused R3 + quantize kernel that produces the same
scales and FP8 codes (up to a rare one-step difference where the rotation's fp32 sum,
ordered differently, sits on a rounding boundary; :func:`prepare_qk` itself on GPUs
without e4m3 support), then a flash-attention kernel with FP8 ``tl.dot`` on sm89+.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from hadacore.kernels.checks import check_attention_args
from hadacore.kernels.cpu.hadamard import hadamard_native

__all__ = ["FP8_DTYPE", "FP8_MAX", "fp8_attention_emulated", "prepare_qk", "quantize_fp8_per_head", "r3_rotate"]

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def r3_rotate(x: Tensor) -> Tensor:
    """R3 in fp32: ``x.float() @ hadamard_matrix(D) / sqrt(D)`` along the last dim (orthonormal)."""
    d = x.shape[-1]
    return hadamard_native(x.float(), 1.0 / math.sqrt(d))


def quantize_fp8_per_head(x: Tensor) -> tuple[Tensor, Tensor]:
    """``x [B, H, S, D]`` -> ``(x8, s)``: ``x8 = e4m3(x / s)`` and ``s = amax_{S,D}(|x|) / 448`` fp32 ``[B, H]``.

    Dynamic, one scale per (batch, head). ``x8 * s[..., None, None]`` dequantizes. An
    all-zero head gets the smallest normal scale (quantizes to zeros, never NaN).
    """
    xf = x.float()
    amax = xf.abs().amax(dim=(-2, -1))
    scale = (amax / FP8_MAX).clamp(min=torch.finfo(torch.float32).tiny)
    # |x| <= amax <= 448 * scale, so the clamp only guards against rounding at the boundary.
    x8 = (xf / scale[..., None, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return x8, scale


def prepare_qk(q: Tensor, k: Tensor, *, rotate: bool, quantize: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Steps 1-2 of the op: ``(q_op, k_op, q_scale, k_scale)`` with ``q ~= q_op * q_scale[..., None, None]``.

    ``quantize=True``: ``q_op``/``k_op`` are ``float8_e4m3fn`` and the scales per-head fp32.
    ``quantize=False``: unit scales and the inputs as they are (fp32 when rotated: the
    rotation is computed in fp32 and not rounded back).
    """
    if rotate:
        q, k = r3_rotate(q), r3_rotate(k)
    if quantize:
        q8, sq = quantize_fp8_per_head(q)
        k8, sk = quantize_fp8_per_head(k)
        return q8, k8, sq, sk
    ones_q = torch.ones(q.shape[:2], dtype=torch.float32, device=q.device)
    ones_k = torch.ones(k.shape[:2], dtype=torch.float32, device=k.device)
    return q, k, ones_q, ones_k


def fp8_attention_emulated(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    is_causal: bool = False,
    scale: Optional[float] = None,
    rotate: bool = True,
    quantize: bool = True,
    attn_mask: Optional[Tensor] = None,
) -> Tensor:
    """The CPU implementation of ``hadacore::fp8_attention`` (semantics: module docstring).

    Rotation and FP8 round trips are real (``float8_e4m3fn`` casts); the attention itself is
    ``F.scaled_dot_product_attention`` in fp32 on the dequantized Q/K and fp32 V.
    """
    group = check_attention_args(q, k, v, rotate, attn_mask, is_causal)
    out_dtype = q.dtype
    q_op, k_op, sq, sk = prepare_qk(q, k, rotate=rotate, quantize=quantize)
    qf = q_op.float() * sq[..., None, None]
    kf = k_op.float() * sk[..., None, None]
    # enable_gqa: query head h reads KV head h // group, without materialising repeated K/V
    if attn_mask is not None and attn_mask.dtype != torch.bool:
        attn_mask = attn_mask.float()
    out = F.scaled_dot_product_attention(
        qf, kf, v.float(), attn_mask=attn_mask, is_causal=is_causal, scale=scale, enable_gqa=group > 1
    )
    return out.to(out_dtype)

"""The one place that defines every ``hadacore::*`` custom op: schema, fake impl, device
dispatch, and the public wrappers.

Every op is functional (returns a fresh tensor, never aliases or mutates its inputs):
an in-place Hadamard op whose fake impl returned its input produced garbage under
torch.compile + CUDA graphs elsewhere. CPU and other non-CUDA devices run the native
torch kernels of :mod:`hadacore.kernels.cpu`; CUDA runs the Triton kernels of
:mod:`hadacore.kernels.triton` (imported on first use: importing Triton kernels is slow).

==========================  ===========================================================
``hadamard``                ``(scale * (x * signs) @ H_n)[..., perm]`` along the last dim
``gptq_dequantize``         GPTQ tensors -> ``W [N, K]`` (the unfused numerical reference)
``w4a16_gemm``              ``x @ dequant(W).T + bias`` from raw GPTQ tensors
``w4a16_gemm_cpu``          the same on a weight prepared once for CPU (int4 / bf16 by M)
``fp8_attention``           SDPA with R3 and per-head FP8 e4m3 Q/K
``fp8_qdq``                 R3 + per-head FP8 quantize-dequantize (emulation in graphs)
==========================  ===========================================================
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from hadacore.formats.gptq import check_gptq_tensors, check_gptq_values, dequantize_gptq
from hadacore.kernels.checks import check_attention_args, check_hadamard_args, check_perm_values, check_prepared_args
from hadacore.kernels.cpu.hadamard import hadamard_native, hadamard_transposed
from hadacore.kernels.cpu.w4a16 import w4a16_gemm_native, w4a16_gemm_prepared
from hadacore.kernels.fp8 import FP8_DTYPE, FP8_MAX, fp8_attention_emulated

__all__ = ["hadamard_transform", "block_hadamard_transform", "w4a16_matmul", "fp8_attention"]

# --------------------------------------------------------------------------- hadamard


@torch.library.custom_op("hadacore::hadamard", mutates_args=())
def hadamard(x: Tensor, scale: float = 1.0, signs: Optional[Tensor] = None, perm: Optional[Tensor] = None) -> Tensor:
    """``out = (scale * (x * signs) @ hadamard_matrix(n))[..., perm]`` along the last dim.

    ``signs`` (optional, [n], +-1) are applied to the input columns (randomised
    Hadamard); ``perm`` (optional, [n]) gathers output columns. fp32 accumulation,
    one rounding to ``x.dtype``.
    """
    check_perm_values(perm, check_hadamard_args(x, signs, perm))
    return hadamard_native(x, scale, signs, perm)


@hadamard.register_kernel("cuda")
def _hadamard_cuda(x: Tensor, scale: float = 1.0, signs: Optional[Tensor] = None, perm: Optional[Tensor] = None) -> Tensor:
    from hadacore.kernels.triton.hadamard import hadamard_triton

    check_perm_values(perm, check_hadamard_args(x, signs, perm))
    if x.dtype == torch.float64:  # tensor cores have no fp64 path; the factored matmuls do
        return hadamard_native(x, scale, signs, perm)
    return hadamard_triton(x, scale, signs=signs, perm=perm)


@hadamard.register_fake
def _hadamard_fake(x: Tensor, scale: float = 1.0, signs: Optional[Tensor] = None, perm: Optional[Tensor] = None) -> Tensor:
    check_hadamard_args(x, signs, perm)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _hadamard_setup(ctx, inputs, output):
    _, ctx.scale, signs, perm = inputs
    ctx.save_for_backward(signs, perm)


def _hadamard_backward(ctx, grad):
    """``y = (s (x * signs) H)[..., perm]``: ``dx = s ((dy scattered back through perm) H^T) * signs``."""
    signs, perm = ctx.saved_tensors
    if perm is not None:
        grad = torch.zeros_like(grad).index_add_(-1, perm.to(torch.int64), grad)
    dx = hadamard_transposed(grad, ctx.scale)
    if signs is not None:
        dx = dx * signs.to(dx.dtype)
    return dx, None, None, None


# Differentiable (learned rotations train through the online R4): the adjoint is the transposed transform.
hadamard.register_autograd(_hadamard_backward, setup_context=_hadamard_setup)


def hadamard_transform(x: Tensor, scale: float = 1.0) -> Tensor:
    """``scale * x @ H_n`` along the last dim, ``H_n = hadacore.hadamard_matrix(n)`` (entries +-1).

    Supported n: ``2**k`` (k <= 15) and ``m * 2**k`` for m in ``HADAMARD_BASES`` (QuaRot's
    orders and the Paley orders up to 1024; ``hadacore.hadamard`` says which m for which n).
    Returns a new contiguous tensor of x's dtype; any input strides are honoured.
    """
    return hadamard(x, float(scale))


def block_hadamard_transform(
    x: Tensor, block: int, scale: Optional[float] = None, perm: Optional[Tensor] = None
) -> Tensor:
    """``(scale * x @ (I_{K/block} (x) H_block))[..., perm]`` along the last dim (K = x.shape[-1]).

    The block-diagonal (shard-local) online Hadamard: R4 of a checkpoint planned for tensor
    parallelism rotates each row-parallel shard's slice on its own. ``scale`` defaults to
    ``1/sqrt(block)`` (orthonormal). With ``block == K`` this is exactly one
    ``hadacore::hadamard(x, scale, None, perm)`` call, the permutation fused into the store;
    otherwise the op runs on the ``(..., K/block, block)`` view and ``perm`` is a gather.
    """
    k = x.shape[-1]
    if block <= 0 or k % block:
        raise ValueError(f"Hadamard block {block} must be a positive divisor of the last dim {k}")
    scale = 1.0 / math.sqrt(block) if scale is None else float(scale)
    if block == k:
        return hadamard(x, scale, None, perm)
    y = hadamard(x.unflatten(-1, (k // block, block)), scale, None, None).flatten(-2)
    return y if perm is None else y.index_select(-1, perm)


# --------------------------------------------------------------------------- W4A16


@torch.library.custom_op("hadacore::gptq_dequantize", mutates_args=())
def gptq_dequantize(
    qweight: Tensor, qzeros: Tensor, scales: Tensor, g_idx: Optional[Tensor], group_size: int, bits: int = 4
) -> Tensor:
    """``W [N, K]`` in the scales' dtype from GPTQ v1 tensors (the unfused reference)."""
    return dequantize_gptq(qweight, qzeros, scales, g_idx, group_size, bits)


@gptq_dequantize.register_fake
def _gptq_dequantize_fake(qweight, qzeros, scales, g_idx, group_size, bits=4):
    n, k, _ = check_gptq_tensors(qweight, qzeros, scales, g_idx, group_size, bits=bits)
    return scales.new_empty((n, k))


@torch.library.custom_op("hadacore::w4a16_gemm", mutates_args=())
def w4a16_gemm(
    x: Tensor,
    qweight: Tensor,
    qzeros: Tensor,
    scales: Tensor,
    g_idx: Optional[Tensor],
    bias: Optional[Tensor],
    group_size: int,
    split_k: int = 0,
    deterministic: bool = False,
) -> Tensor:
    """``x @ dequant(W).T + bias`` in x's dtype. ``split_k=0`` means automatic."""
    check_gptq_tensors(qweight, qzeros, scales, g_idx, group_size, x=x, bias=bias)
    return w4a16_gemm_native(x, qweight, qzeros, scales, g_idx, bias, group_size)


@w4a16_gemm.register_kernel("cuda")
def _w4a16_gemm_cuda(x, qweight, qzeros, scales, g_idx, bias, group_size, split_k=0, deterministic=False):
    from hadacore.kernels.triton.w4a16 import w4a16_matmul_triton

    _, _, groups = check_gptq_tensors(qweight, qzeros, scales, g_idx, group_size, x=x, bias=bias)
    if g_idx is not None:  # on the device, no host sync (safe inside CUDA graphs); CPU checks in dequantize
        torch._assert_async(((g_idx >= 0) & (g_idx < groups)).all(), f"w4a16_gemm: g_idx values must lie in [0, {groups})")
    return w4a16_matmul_triton(
        x, qweight, qzeros, scales, g_idx, group_size=group_size, bias=bias,
        split_k=split_k or "auto", deterministic=deterministic,
    )


@w4a16_gemm.register_fake
def _w4a16_gemm_fake(x, qweight, qzeros, scales, g_idx, bias, group_size, split_k=0, deterministic=False):
    n, _, _ = check_gptq_tensors(qweight, qzeros, scales, g_idx, group_size, x=x, bias=bias)
    return x.new_empty((*x.shape[:-1], n))


@torch.library.custom_op("hadacore::w4a16_gemm_cpu", mutates_args=(), device_types="cpu")
def w4a16_gemm_cpu(
    x: Tensor,
    packed: Optional[Tensor],
    scales_and_zeros: Optional[Tensor],
    weight: Optional[Tensor],
    perm: Optional[Tensor],
    bias: Optional[Tensor],
    group_size: int,
    out_features: int,
    int4_max_m: int,
) -> Tensor:
    """W4A16 GEMM on a weight prepared once (``hadacore.kernels.cpu.w4a16.prepare_w4a16_cpu``).

    What the compiler emits on CPU, with the prepared tensors as graph constants: the
    int4 kernel for M <= ``int4_max_m`` (or when no dense weight is kept), bf16 BLAS on
    the dense weight above it. Computes in bf16 whatever x's dtype (16-bit activations
    are the W4A16 contract); returns x's dtype.
    """
    check_prepared_args(x, packed, scales_and_zeros, weight, perm, bias, group_size, out_features)
    return w4a16_gemm_prepared(x, packed, scales_and_zeros, weight, perm, bias, group_size, out_features, int4_max_m)


@w4a16_gemm_cpu.register_fake
def _w4a16_gemm_cpu_fake(x, packed, scales_and_zeros, weight, perm, bias, group_size, out_features, int4_max_m):
    check_prepared_args(x, packed, scales_and_zeros, weight, perm, bias, group_size, out_features)
    return x.new_empty((*x.shape[:-1], out_features))


def w4a16_matmul(
    x: Tensor,
    qweight: Tensor,
    qzeros: Tensor,
    scales: Tensor,
    g_idx: Optional[Tensor] = None,
    *,
    group_size: int,
    bias: Optional[Tensor] = None,
    split_k: int | str = "auto",
    deterministic: bool = False,
) -> Tensor:
    """``x [..., K] -> [..., N]``: exactly ``x @ dequant(W).T (+ bias)`` up to accumulation order.

    ``split_k``: ``"auto"`` or a positive int (CUDA); ``deterministic=True`` makes the
    SplitK reduction a fixed-order one so repeated runs are bitwise equal.
    """
    if split_k == "auto":
        split_k = 0
    elif isinstance(split_k, bool) or not isinstance(split_k, int) or split_k < 1:
        raise ValueError(f"split_k must be 'auto' or a positive int, got {split_k!r}")
    if not torch.compiler.is_compiling():  # values are data: traced graphs check them in the op
        check_gptq_values(qweight, qzeros, scales, g_idx, group_size, name="w4a16_matmul")
    return w4a16_gemm(x, qweight, qzeros, scales, g_idx, bias, group_size, split_k, deterministic)


# --------------------------------------------------------------------------- FP8 attention


@torch.library.custom_op("hadacore::fp8_attention", mutates_args=())
def _fp8_attention_op(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    is_causal: bool = False,
    scale: Optional[float] = None,
    rotate: bool = True,
    quantize: bool = True,
    attn_mask: Optional[Tensor] = None,
) -> Tensor:
    """Attention with R3 and FP8 Q/K; ``[B, Hq, S, D]`` in q's dtype (:mod:`hadacore.kernels.fp8`)."""
    return fp8_attention_emulated(q, k, v, is_causal, scale, rotate, quantize, attn_mask)


@_fp8_attention_op.register_kernel("cuda")
def _fp8_attention_cuda(q, k, v, is_causal=False, scale=None, rotate=True, quantize=True, attn_mask=None):
    from hadacore.kernels.triton.fp8_attention import fp8_attention_triton

    return fp8_attention_triton(
        q, k, v, is_causal=is_causal, scale=scale, rotate=rotate, quantize=quantize, attn_mask=attn_mask
    )


@_fp8_attention_op.register_fake
def _fp8_attention_fake(q, k, v, is_causal=False, scale=None, rotate=True, quantize=True, attn_mask=None):
    check_attention_args(q, k, v, rotate, attn_mask, is_causal)
    return q.new_empty(q.shape)  # contiguous, like both real implementations


def fp8_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    is_causal: bool = False,
    scale: Optional[float] = None,
    rotate: bool = True,
    quantize: bool = True,
    attn_mask: Optional[Tensor] = None,
) -> Tensor:
    """``SDPA(q, k, v)`` with R3 (``rotate``) and FP8 e4m3 Q/K (``quantize``), via ``hadacore::fp8_attention``.

    ``q [B, Hq, S, D]``, ``k``/``v`` ``[B, Hkv, S_kv, D]`` (GQA when ``Hkv < Hq``), fp16/bf16/
    fp32; ``scale`` defaults to ``1/sqrt(D)``; ``is_causal`` and ``attn_mask`` (bool: attend
    where true, or additive in q's dtype; broadcastable to ``[B, Hq, S, S_kv]``) as in SDPA;
    a row with nothing to attend to gives 0. Returns a new contiguous ``[B, Hq, S, D]``
    tensor of q's dtype. Only the ``Q K^T`` product is FP8.
    """
    return torch.ops.hadacore.fp8_attention(q, k, v, is_causal, scale, rotate, quantize, attn_mask)


@torch.library.custom_op("hadacore::fp8_qdq", mutates_args=())
def fp8_qdq(x: Tensor, hadamard_scale: float = 0.0) -> Tensor:
    """Per-head FP8 (e4m3) quantize-dequantize of attention inputs ``x [..., S, D]``.

    One scale per head (``amax`` over the last two dims / 448). With ``hadamard_scale != 0``
    the rows are first rotated, ``hadamard(x, hadamard_scale)`` along D (R3 fused with the
    quantization). Computed in fp32, returned in x's dtype: the emulation of FP8 attention.
    """
    if x.dim() < 2:
        raise ValueError(f"fp8_qdq needs [..., S, D], got shape {tuple(x.shape)}")
    y = x.float()
    if hadamard_scale != 0.0:
        check_hadamard_args(x, None, None)
        y = hadamard_native(y, hadamard_scale)
    amax = y.abs().amax(dim=(-2, -1), keepdim=True).clamp(min=1e-12)
    scale = amax / FP8_MAX
    q = (y / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return (q.float() * scale).to(x.dtype)


@fp8_qdq.register_fake
def _fp8_qdq_fake(x: Tensor, hadamard_scale: float = 0.0) -> Tensor:
    if x.dim() < 2:
        raise ValueError(f"fp8_qdq needs [..., S, D], got shape {tuple(x.shape)}")
    if hadamard_scale != 0.0:
        check_hadamard_args(x, None, None)
    return torch.empty_like(x, memory_format=torch.contiguous_format)

"""``hadacore::*`` custom ops: schemas, fake impls, device dispatch, public wrappers.

Every op is functional (returns a fresh tensor, never aliases or mutates its inputs):
an in-place Hadamard op whose fake impl returned its input produced garbage under
torch.compile + CUDA graphs elsewhere. CPU and other non-CUDA devices run native
torch code from ``hadacore.lowering``; CUDA runs the Triton kernels in
``hadacore.kernels``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from hadacore.hadamard import hadamard_factors
from hadacore.quant.format import check_gptq_tensors, check_gptq_values, dequantize_gptq

__all__ = ["hadamard_transform", "block_hadamard_transform", "w4a16_matmul"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# --------------------------------------------------------------------------- hadamard


def check_hadamard_args(x: Tensor, signs: Optional[Tensor], perm: Optional[Tensor]) -> int:
    """Validate a Hadamard call (metadata only, so fake tensors pass through); return n."""
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"hadamard_transform needs a floating-point tensor, got {x.dtype}")
    if x.dim() == 0:
        raise ValueError("hadamard_transform needs at least one dimension")
    n = x.shape[-1]
    hadamard_factors(int(n))
    if signs is not None and (signs.shape != (n,) or signs.device != x.device):
        raise ValueError(f"signs must be a [{n}] tensor on {x.device}, got {tuple(signs.shape)} on {signs.device}")
    if perm is not None and (perm.shape != (n,) or perm.dtype.is_floating_point or perm.dtype == torch.bool
                             or perm.is_complex() or perm.device != x.device):
        raise ValueError(f"perm must be an integer [{n}] tensor on {x.device}, got {perm.dtype} "
                         f"{tuple(perm.shape)} on {perm.device}")
    return n


def check_perm_values(perm: Optional[Tensor], n: int) -> None:
    """Every ``perm`` index must lie in ``[0, n)``: a negative one would silently wrap around
    on some paths and an index past the end would read out of bounds on others. CPU raises
    ``ValueError``; CUDA asserts on the device (no host sync, so it is safe inside CUDA graphs)."""
    if perm is None or perm.numel() == 0:
        return
    if perm.device.type == "cuda":
        torch._assert_async(((perm >= 0) & (perm < n)).all(), f"hadacore::hadamard: perm values must lie in [0, {n})")
        return
    lo, hi = int(perm.min()), int(perm.max())
    if lo < 0 or hi >= n:
        raise ValueError(f"perm has values in [{lo}, {hi}]; they must lie in [0, {n})")


@torch.library.custom_op("hadacore::hadamard", mutates_args=())
def hadamard(x: Tensor, scale: float = 1.0, signs: Optional[Tensor] = None, perm: Optional[Tensor] = None) -> Tensor:
    """``out = (scale * (x * signs) @ hadamard_matrix(n))[..., perm]`` along the last dim.

    ``signs`` (optional, [n], +-1) are applied to the input columns (randomised
    Hadamard); ``perm`` (optional, [n]) gathers output columns. fp32 accumulation,
    one rounding to ``x.dtype``.
    """
    from hadacore.lowering.hadamard import hadamard_native

    check_perm_values(perm, check_hadamard_args(x, signs, perm))
    return hadamard_native(x, scale, signs, perm)


@hadamard.register_kernel("cuda")
def _hadamard_cuda(x: Tensor, scale: float = 1.0, signs: Optional[Tensor] = None, perm: Optional[Tensor] = None) -> Tensor:
    from hadacore.kernels.hadamard import hadamard_triton
    from hadacore.lowering.hadamard import hadamard_native

    check_perm_values(perm, check_hadamard_args(x, signs, perm))
    if x.dtype == torch.float64:  # tensor cores have no fp64 path; the factored matmuls do
        return hadamard_native(x, scale, signs, perm)
    return hadamard_triton(x, scale, signs=signs, perm=perm)


@hadamard.register_fake
def _hadamard_fake(x: Tensor, scale: float = 1.0, signs: Optional[Tensor] = None, perm: Optional[Tensor] = None) -> Tensor:
    check_hadamard_args(x, signs, perm)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def hadamard_transform(x: Tensor, scale: float = 1.0) -> Tensor:
    """``scale * x @ H_n`` along the last dim, ``H_n = hadacore.hadamard_matrix(n)`` (entries +-1).

    Supported n: ``2**k`` (k <= 15) and ``m * 2**k`` for m in ``HADAMARD_BASES``.
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
    from hadacore.lowering.w4a16 import w4a16_gemm_native

    check_gptq_tensors(qweight, qzeros, scales, g_idx, group_size, x=x, bias=bias)
    return w4a16_gemm_native(x, qweight, qzeros, scales, g_idx, bias, group_size)


@w4a16_gemm.register_kernel("cuda")
def _w4a16_gemm_cuda(x, qweight, qzeros, scales, g_idx, bias, group_size, split_k=0, deterministic=False):
    from hadacore.kernels.w4a16 import w4a16_matmul_triton

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
    """W4A16 GEMM on a weight prepared once (``hadacore.lowering.w4a16.prepare_w4a16_cpu``).

    What the compiler emits on CPU, with the prepared tensors as graph constants: the
    int4 kernel for M <= ``int4_max_m`` (or when no dense weight is kept), bf16 BLAS on
    the dense weight above it. Computes in bf16 whatever x's dtype (16-bit activations
    are the W4A16 contract); returns x's dtype.
    """
    from hadacore.lowering.w4a16 import check_prepared_args, w4a16_gemm_prepared

    check_prepared_args(x, packed, scales_and_zeros, weight, perm, bias, group_size, out_features)
    return w4a16_gemm_prepared(x, packed, scales_and_zeros, weight, perm, bias, group_size, out_features, int4_max_m)


@w4a16_gemm_cpu.register_fake
def _w4a16_gemm_cpu_fake(x, packed, scales_and_zeros, weight, perm, bias, group_size, out_features, int4_max_m):
    from hadacore.lowering.w4a16 import check_prepared_args

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


# --------------------------------------------------------------------------- compiler-only ops
# Ops the torch.compile backend (hadacore.backend) inserts; not part of the public API.

_FP8_E4M3_MAX = 448.0


@torch.library.custom_op("hadacore::fp8_qdq", mutates_args=())
def fp8_qdq(x: Tensor, hadamard_scale: float = 0.0) -> Tensor:
    """Per-head FP8 (e4m3) quantize-dequantize of attention inputs ``x [..., S, D]``.

    One scale per head (``amax`` over the last two dims / 448). With ``hadamard_scale != 0``
    the rows are first rotated, ``hadamard(x, hadamard_scale)`` along D (R3 fused with the
    quantization). Computed in fp32, returned in x's dtype: the emulation of FP8 attention.
    """
    from hadacore.lowering.hadamard import hadamard_native

    if x.dim() < 2:
        raise ValueError(f"fp8_qdq needs [..., S, D], got shape {tuple(x.shape)}")
    y = x.float()
    if hadamard_scale != 0.0:
        check_hadamard_args(x, None, None)
        y = hadamard_native(y, hadamard_scale)
    amax = y.abs().amax(dim=(-2, -1), keepdim=True).clamp(min=1e-12)
    scale = amax / _FP8_E4M3_MAX
    q = (y / scale).clamp(-_FP8_E4M3_MAX, _FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    return (q.float() * scale).to(x.dtype)


@fp8_qdq.register_fake
def _fp8_qdq_fake(x: Tensor, hadamard_scale: float = 0.0) -> Tensor:
    if x.dim() < 2:
        raise ValueError(f"fp8_qdq needs [..., S, D], got shape {tuple(x.shape)}")
    if hadamard_scale != 0.0:
        check_hadamard_args(x, None, None)
    return torch.empty_like(x, memory_format=torch.contiguous_format)

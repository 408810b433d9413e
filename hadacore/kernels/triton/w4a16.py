"""Triton W4A16 GEMM: ``y = x @ dequant(W).T (+ bias)`` for GPTQ v1 4-bit weights.

Tensors are exactly those of :mod:`hadacore.formats.gptq` (v1 "gptq"): ``qweight``
int32 ``[K/8, N]`` packed along K, ``qzeros`` int32 ``[G, N/8]`` packed along N and
stored as zero - 1 (read back as field + 1, unmasked, like every v1 reader), ``scales
[G, N]``, ``g_idx [K]``. ``W[n, k] = (q[n, k] - zero[g, n]) * scale[g, n]`` with
``g = g_idx[k]``.

Kernels (launch configurations come from :mod:`hadacore.kernels.triton.w4a16_configs`):

- ``_w4a16_splitk_kernel``: grid (M-tiles x N-tiles, SPLIT_K). Program ``pid_k`` owns
  one contiguous, group-aligned K range, so it loads each of its groups' scales/zeros
  once (the SplitK paper's kernel strides K-blocks ``pid_k, pid_k + SPLIT_K, ...``
  instead, touching every group from every program). fp32 partials go either into a
  zero-initialised fp32 buffer with relaxed atomics (fast, order-dependent rounding)
  or, with ``deterministic=True``, into a ``[SPLIT_K, M, N]`` buffer that
  ``_w4a16_splitk_reduce_kernel`` sums in a fixed order (bitwise repeatable).
- ``_w4a16_dp_kernel``: data-parallel tiles for large M: grid (M-tiles x N-tiles,
  swizzled for L2 reuse), full K loop, bias and cast fused into the single store.
- ``_w4a16_gemv_kernel``: M = 1 (any M works, one row per program): grid
  (M x N-tiles, SPLIT_K); the product is a broadcast multiply and a reduction over K
  in fp32 (no ``tl.dot``, whose 16-row minimum would waste 15/16 of the work); its
  partials are reduced like SplitK's.
- ``_w4a16_splitk_reduce_kernel``: sums ``[S, M, N]`` fp32 partials in order s = 0..S-1
  and casts to the output dtype (S = 1 is the cast after atomic accumulation).

Weight loads: each K-block reads its ``[BLOCK_K/8, BLOCK_N]`` packed int32 words once and
unpacks them in registers (a broadcast shift and a row-major reshape), rather than the
SplitK paper's ``[BLOCK_K, BLOCK_N]`` load of every word 8 times: on sm_90 that cut the
16x32x128 SplitK tile from 255 to 110 registers and 45 KB to 17 KB of shared memory, and
removed the 128x128x64 data-parallel tile's register spills.

Group layouts (the ``GROUP_MODE`` constexpr; which one runs is decided per call):

- ``PER_CHANNEL`` (``group_size == -1``): one scale row, loaded once per program.
- ``CONTIGUOUS`` (``g_idx`` is None or equals ``k // group_size``, and BLOCK_K divides
  the group size): scales/zeros loaded once per group, K-blocks of a group unrolled.
- ``COMPUTED`` (contiguous groups but BLOCK_K does not divide the group size): the
  group of each k is ``k // group_size``, looked up per element. Exact, slower.
- ``GATHERED`` (any other ``g_idx``, e.g. an unsorted act-order checkpoint): the group
  of each k is read from ``g_idx`` and scales/zeros are gathered per element. Exact,
  slower. The fast act-order path sorts the weight by group once
  (:func:`hadacore.quant.act_order.sort_by_group`) and gathers x's columns before the
  call, so ``CONTIGUOUS`` runs.

Numerics: the dequantized weight ``(q - zero) * scale`` is computed in fp32 (exact:
a small integer times a <= 24-bit-mantissa scale). For ``tl.dot`` it is then rounded
once to x's dtype: exact for fp32, and for fp16 equal to what dequantizing into fp16
gives; for bf16 ``(q - zero) * scale`` generally needs more than bf16's 8 mantissa
bits, so the weight tile rounds (relative error <= 2**-9 per element) exactly as
``dequantize(W).to(bfloat16)`` would. fp32 x uses ``input_precision="ieee"`` (no
TF32). The GEMV kernel multiplies the fp32 weight by x upcast to fp32 (no weight
rounding at all). Accumulation is fp32 everywhere, and the output is rounded once.

Interpreter note: under ``TRITON_INTERPRET=1`` a bf16 ``tl.dot`` multiplies raw bit
patterns (triton-lang/triton#11584, "not supported yet"), so there, and only there,
bf16 tiles are upcast to fp32 for an ieee dot: the weight is still rounded to bf16
first and bf16 products are exact in fp32, so the result equals a bf16 tensor-core
dot up to accumulation order. The interpreter also rounds fp32 -> bf16 by truncation
(the GPU rounds to nearest even): a <= 1 ulp difference on CPU only.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from hadacore.kernels.triton.w4a16_configs import select_w4a16_config, split_k_ranges
from hadacore.formats.gptq import check_gptq_tensors, default_g_idx

__all__ = ["w4a16_matmul_triton", "group_mode"]

logger = logging.getLogger(__name__)

# GROUP_MODE values (see the module docstring).
PER_CHANNEL, CONTIGUOUS, COMPUTED, GATHERED = 0, 1, 2, 3
# Output-side modes of the GEMV kernel.
_DIRECT, _ATOMIC, _PARTIALS = 0, 1, 2
_REDUCE_BLOCK = 1024


# --------------------------------------------------------------------------- helpers


@triton.jit
def _group_params(scales_ptr, qzeros_ptr, g, offs_n, mask, stride_sg, stride_sn, stride_zg, stride_zn):
    """fp32 ``(scale, zero)`` of group(s) ``g`` for columns ``offs_n``.

    ``g`` is a scalar (results ``[1, BLOCK_N]``) or ``[BLOCK_K, 1]`` (``[BLOCK_K, BLOCK_N]``).
    """
    n = offs_n[None, :]
    scale = tl.load(scales_ptr + g * stride_sg + n * stride_sn, mask=mask, other=0.0).to(tl.float32)
    packed = tl.load(qzeros_ptr + g * stride_zg + (n // 8) * stride_zn, mask=mask, other=0)
    zero = ((packed >> ((n % 8) * 4)) & 0xF) + 1  # v1 stores zero - 1; no mask after the +1 (zero in [1, 16])
    return scale, zero.to(tl.float32)


@triton.jit
def _k_mask(offs_k, K, EVEN_K: tl.constexpr):
    if EVEN_K:
        mask_k = tl.full(offs_k.shape, 1, tl.int1)
    else:
        mask_k = offs_k < K
    return mask_k


@triton.jit
def _accumulate_block(
    acc, k0, K, scale, zero, x_ptr, qweight_ptr, offs_m, offs_n, mask_m, mask_n,
    stride_xm, stride_xk, stride_qk, stride_qn,
    BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, USE_DOT: tl.constexpr,
    FP32_DOT: tl.constexpr,
):
    """``acc += x[offs_m, cols(k)] @ W^T[k, offs_n]`` for the K-block ``k0 .. k0 + BLOCK_K``."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    mask_k = _k_mask(offs_k, K, EVEN_K)
    # Each int32 word is loaded once ([BLOCK_K/8, BLOCK_N]) and unpacked in registers:
    # row k = 8 * word + i sits at bits 4i..4i+3, which is exactly the row-major reshape.
    offs_w = k0 // 8 + tl.arange(0, BLOCK_K // 8)
    mask_w = _k_mask(offs_w * 8, K, EVEN_K)  # K is a multiple of 8: a word is all in or all out
    packed = tl.load(
        qweight_ptr + offs_w[:, None] * stride_qk + offs_n[None, :] * stride_qn,
        mask=mask_w[:, None] & mask_n[None, :], other=0,
    )
    q = (packed[:, None, :] >> (tl.arange(0, 8) * 4)[None, :, None]) & 0xF
    q = tl.reshape(q, (BLOCK_K, offs_n.shape[0]))
    w = (q.to(tl.float32) - zero) * scale  # [BLOCK_K, BLOCK_N], exact in fp32
    cols = offs_k
    rows = offs_m.to(tl.int64) * stride_xm
    if USE_DOT:
        a = tl.load(x_ptr + rows[:, None] + cols[None, :] * stride_xk, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w = w.to(a.dtype)  # the one rounding of the weight (none for fp32)
        if FP32_DOT:
            acc = tl.dot(a.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, w, acc)
    else:
        a = tl.load(x_ptr + rows[None, :] + cols[:, None] * stride_xk, mask=mask_k[:, None] & mask_m[None, :], other=0.0)
        acc += tl.sum(a.to(tl.float32) * w, axis=0, keep_dims=True)  # a: [BLOCK_K, 1]
    return acc


@triton.jit
def _accumulate(
    acc, x_ptr, qweight_ptr, scales_ptr, qzeros_ptr, g_idx_ptr,
    offs_m, offs_n, mask_m, mask_n, K, k_start, k_end,
    stride_xm, stride_xk, stride_qk, stride_qn, stride_sg, stride_sn, stride_zg, stride_zn,
    GROUP_SIZE: tl.constexpr, GROUP_MODE: tl.constexpr, BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr, USE_DOT: tl.constexpr, FP32_DOT: tl.constexpr,
):
    """Accumulate the K range ``[k_start, k_end)`` into ``acc`` (fp32)."""
    if GROUP_MODE == 1:  # CONTIGUOUS: k_start is group-aligned; one scale/zero load per group
        for k0 in range(k_start, k_end, GROUP_SIZE):
            scale, zero = _group_params(
                scales_ptr, qzeros_ptr, k0 // GROUP_SIZE, offs_n, mask_n[None, :], stride_sg, stride_sn, stride_zg, stride_zn
            )
            for kk in tl.static_range(0, GROUP_SIZE, BLOCK_K):
                acc = _accumulate_block(
                    acc, k0 + kk, K, scale, zero, x_ptr, qweight_ptr,
                    offs_m, offs_n, mask_m, mask_n, stride_xm, stride_xk, stride_qk, stride_qn,
                    BLOCK_K, True, USE_DOT, FP32_DOT,
                )
    else:
        if GROUP_MODE == 0:  # PER_CHANNEL: a single scale row
            scale0, zero0 = _group_params(
                scales_ptr, qzeros_ptr, 0, offs_n, mask_n[None, :], stride_sg, stride_sn, stride_zg, stride_zn
            )
        for k0 in range(k_start, k_end, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = _k_mask(offs_k, K, EVEN_K)
            if GROUP_MODE == 0:
                scale, zero = scale0, zero0
            elif GROUP_MODE == 2:  # COMPUTED: g = k // group_size per element
                scale, zero = _group_params(
                    scales_ptr, qzeros_ptr, (offs_k // GROUP_SIZE)[:, None], offs_n,
                    mask_k[:, None] & mask_n[None, :], stride_sg, stride_sn, stride_zg, stride_zn,
                )
            else:  # GATHERED: g = g_idx[k] per element
                g = tl.load(g_idx_ptr + offs_k, mask=mask_k, other=0)
                scale, zero = _group_params(
                    scales_ptr, qzeros_ptr, g[:, None], offs_n,
                    mask_k[:, None] & mask_n[None, :], stride_sg, stride_sn, stride_zg, stride_zn,
                )
            acc = _accumulate_block(
                acc, k0, K, scale, zero, x_ptr, qweight_ptr,
                offs_m, offs_n, mask_m, mask_n, stride_xm, stride_xk, stride_qk, stride_qn,
                BLOCK_K, EVEN_K, USE_DOT, FP32_DOT,
            )
    return acc


@triton.jit
def _tile_ids(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) with GROUP_M M-tiles swept per N-tile (L2 reuse of the weight tiles)."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * num_pid_n
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    return pid_m, pid_n


@triton.jit
def _store_output(acc, out_ptr, bias_ptr, offs_m, offs_n, mask_m, mask_n, stride_om, stride_on, HAS_BIAS: tl.constexpr):
    """Final store: + bias (fp32), one rounding to the output dtype."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _store_partial(
    acc, part_ptr, bias_ptr, pid_k, offs_m, offs_n, mask_m, mask_n, stride_pk, stride_pm, stride_pn,
    HAS_BIAS: tl.constexpr, DETERMINISTIC: tl.constexpr,
):
    """One split's fp32 partial: atomically added, or stored to its own slice. Split 0 adds the bias."""
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        acc += tl.where(pid_k == 0, bias, 0.0)[None, :]
    ptrs = part_ptr + pid_k.to(tl.int64) * stride_pk + offs_m.to(tl.int64)[:, None] * stride_pm + offs_n[None, :] * stride_pn
    mask = mask_m[:, None] & mask_n[None, :]
    if DETERMINISTIC:
        tl.store(ptrs, acc, mask=mask)
    else:
        tl.atomic_add(ptrs, acc, mask=mask, sem="relaxed")


# --------------------------------------------------------------------------- kernels


@triton.jit
def _w4a16_splitk_kernel(
    x_ptr, qweight_ptr, scales_ptr, qzeros_ptr, g_idx_ptr, bias_ptr, part_ptr,
    M, N, K, k_per_split,
    stride_xm, stride_xk, stride_qk, stride_qn, stride_sg, stride_sn, stride_zg, stride_zn,
    stride_pk, stride_pm, stride_pn,
    GROUP_SIZE: tl.constexpr, GROUP_MODE: tl.constexpr, HAS_BIAS: tl.constexpr,
    EVEN_K: tl.constexpr, FP32_DOT: tl.constexpr, DETERMINISTIC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m, pid_n = _tile_ids(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, 1)
    pid_k = tl.program_id(1)
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = _accumulate(
        acc, x_ptr, qweight_ptr, scales_ptr, qzeros_ptr, g_idx_ptr, offs_m, offs_n, mask_m, mask_n,
        K, k_start, k_end, stride_xm, stride_xk, stride_qk, stride_qn, stride_sg, stride_sn, stride_zg, stride_zn,
        GROUP_SIZE, GROUP_MODE, BLOCK_K, EVEN_K, True, FP32_DOT,
    )
    _store_partial(
        acc, part_ptr, bias_ptr, pid_k, offs_m, offs_n, mask_m, mask_n, stride_pk, stride_pm, stride_pn,
        HAS_BIAS, DETERMINISTIC,
    )


@triton.jit
def _w4a16_dp_kernel(
    x_ptr, qweight_ptr, scales_ptr, qzeros_ptr, g_idx_ptr, bias_ptr, out_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_qk, stride_qn, stride_sg, stride_sn, stride_zg, stride_zn, stride_om, stride_on,
    GROUP_SIZE: tl.constexpr, GROUP_MODE: tl.constexpr, HAS_BIAS: tl.constexpr,
    EVEN_K: tl.constexpr, FP32_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _tile_ids(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = _accumulate(
        acc, x_ptr, qweight_ptr, scales_ptr, qzeros_ptr, g_idx_ptr, offs_m, offs_n, mask_m, mask_n,
        K, 0, K, stride_xm, stride_xk, stride_qk, stride_qn, stride_sg, stride_sn, stride_zg, stride_zn,
        GROUP_SIZE, GROUP_MODE, BLOCK_K, EVEN_K, True, FP32_DOT,
    )
    _store_output(acc, out_ptr, bias_ptr, offs_m, offs_n, mask_m, mask_n, stride_om, stride_on, HAS_BIAS)


@triton.jit
def _w4a16_gemv_kernel(
    x_ptr, qweight_ptr, scales_ptr, qzeros_ptr, g_idx_ptr, bias_ptr, out_ptr,
    M, N, K, k_per_split,
    stride_xm, stride_xk, stride_qk, stride_qn, stride_sg, stride_sn, stride_zg, stride_zn,
    stride_ok, stride_om, stride_on,
    GROUP_SIZE: tl.constexpr, GROUP_MODE: tl.constexpr, HAS_BIAS: tl.constexpr,
    EVEN_K: tl.constexpr, REDUCE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One row per program. ``out_ptr``: the output (REDUCE 0) or the fp32 partials (1, 2)."""
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pid = tl.program_id(0)
    pid_m = pid // num_pid_n
    pid_n = pid % num_pid_n
    pid_k = tl.program_id(1)
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    offs_m = pid_m + tl.arange(0, 1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros((1, BLOCK_N), dtype=tl.float32)
    acc = _accumulate(
        acc, x_ptr, qweight_ptr, scales_ptr, qzeros_ptr, g_idx_ptr, offs_m, offs_n, mask_m, mask_n,
        K, k_start, k_end, stride_xm, stride_xk, stride_qk, stride_qn, stride_sg, stride_sn, stride_zg, stride_zn,
        GROUP_SIZE, GROUP_MODE, BLOCK_K, EVEN_K, False, False,
    )
    if REDUCE == 0:
        _store_output(acc, out_ptr, bias_ptr, offs_m, offs_n, mask_m, mask_n, stride_om, stride_on, HAS_BIAS)
    else:
        _store_partial(
            acc, out_ptr, bias_ptr, pid_k, offs_m, offs_n, mask_m, mask_n, stride_ok, stride_om, stride_on,
            HAS_BIAS, REDUCE == 2,
        )


@triton.jit
def _w4a16_splitk_reduce_kernel(part_ptr, out_ptr, MN, N, SPLIT_K, stride_pk, stride_om, stride_on, BLOCK: tl.constexpr):
    """``out = sum_s part[s]`` over contiguous ``[SPLIT_K, M, N]`` fp32, in order s = 0, 1, ..."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    ptrs = part_ptr + offs
    acc = tl.load(ptrs, mask=mask, other=0.0)
    for _ in range(1, SPLIT_K):
        ptrs += stride_pk  # pointer steps: no int32 overflow of s * stride
        acc += tl.load(ptrs, mask=mask, other=0.0)
    m = offs // N
    n = offs % N
    tl.store(out_ptr + m * stride_om + n * stride_on, acc.to(out_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------- host side

_INTERPRETED = not isinstance(_w4a16_dp_kernel, triton.runtime.JITFunction)


def _tensor_version(t: Tensor) -> Optional[int]:
    try:
        return t._version
    except RuntimeError:  # inference tensors have no version counter
        return None


def group_mode(g_idx: Optional[Tensor], k: int, group_size: int) -> int:
    """``PER_CHANNEL``, ``CONTIGUOUS`` (g_idx None or ``k // group_size``) or ``GATHERED``.

    Comparing g_idx with the default layout reads the tensor (a device sync on CUDA);
    the answer is cached on the tensor and reused while its version is unchanged, so
    steady-state calls (and CUDA-graph capture after one warm-up call) never sync.
    Pass ``g_idx=None`` for plain checkpoints to skip the check altogether.
    """
    if group_size == -1:
        return PER_CHANNEL
    if g_idx is None:
        return CONTIGUOUS
    version = _tensor_version(g_idx)
    cached = getattr(g_idx, "_hadacore_group_mode", None)
    if version is not None and cached is not None and cached[0] == (version, k, group_size):
        return cached[1]
    expected = default_g_idx(k, group_size, device=g_idx.device).to(g_idx.dtype)
    mode = CONTIGUOUS if torch.equal(g_idx, expected) else GATHERED
    if version is not None:
        try:
            g_idx._hadacore_group_mode = ((version, k, group_size), mode)
        except (AttributeError, RuntimeError):
            pass  # a tensor type that takes no attributes: just recompute next time
    return mode


def _check_device(x: Tensor) -> None:
    if x.device.type == "cuda":
        return
    if x.device.type == "cpu" and _INTERPRETED:
        return
    raise RuntimeError(
        f"w4a16_matmul_triton runs on CUDA tensors, or on CPU tensors when TRITON_INTERPRET=1 was set before "
        f"hadacore.kernels.triton.w4a16 was imported; got a {x.device.type} tensor"
        + ("" if _INTERPRETED else " without the interpreter")
        + ". hadacore.w4a16_matmul has a native CPU implementation."
    )


def _prepare_out(out: Optional[Tensor], shape: tuple, x: Tensor) -> Tensor:
    if out is None:
        return torch.empty(shape, dtype=x.dtype, device=x.device)
    if tuple(out.shape) != shape or out.dtype != x.dtype or out.device != x.device or not out.is_contiguous():
        raise ValueError(
            f"out must be a contiguous {x.dtype} tensor of shape {shape} on {x.device}, got "
            f"{out.dtype} {tuple(out.shape)} on {out.device} (contiguous={out.is_contiguous()})"
        )
    return out


def w4a16_matmul_triton(
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
    config: Optional[dict] = None,
    out: Optional[Tensor] = None,
) -> Tensor:
    """``x [..., K] -> [..., N]`` in x's dtype: ``x @ dequant(W).T (+ bias)``, fp32 accumulation.

    GPTQ v1 4-bit tensors as in :mod:`hadacore.formats.gptq`. ``g_idx``: the group of
    each stored K row; None or ``k // group_size`` runs the contiguous-group path, any
    other value the per-k gathered path (see the module docstring). Act-order weights are
    fastest sorted by group first (:func:`hadacore.quant.act_order.sort_by_group`) with
    ``x[..., perm]`` gathered by the caller: then the contiguous path runs.
    ``split_k``: ``"auto"`` or a positive int (1 = no split). ``deterministic``: reduce
    SplitK partials in a fixed order (bitwise repeatable) instead of with atomics.
    ``config``: dict of :class:`~hadacore.kernels.triton.w4a16_configs.W4A16Config` fields
    overriding the heuristic. ``out``: optional contiguous output tensor.
    """
    n, k, _ = check_gptq_tensors(qweight, qzeros, scales, g_idx, group_size, x=x, bias=bias)
    _check_device(x)
    out = _prepare_out(out, (*x.shape[:-1], n), x)
    x2 = x.reshape(-1, k)
    out2 = out.view(-1, n)
    m = x2.shape[0]
    if m == 0 or n == 0:
        return out
    if k == 0:
        out2.copy_(bias.expand(m, n) if bias is not None else torch.zeros((), dtype=x.dtype, device=x.device).expand(m, n))
        return out

    mode = group_mode(g_idx, k, group_size)
    cfg = select_w4a16_config(
        m, n, k, group_size, x.dtype, x.device, act_order=mode == GATHERED, split_k=split_k, config=config
    )
    if mode == CONTIGUOUS and group_size % cfg.block_k:
        mode = COMPUTED
    split, k_per_split = split_k_ranges(k, cfg.split_k, group_size if mode == CONTIGUOUS else cfg.block_k)
    if logger.isEnabledFor(logging.DEBUG):
        logger.debug("w4a16 M=%d N=%d K=%d gs=%d mode=%d split=%d %s", m, n, k, group_size, mode, split, cfg)

    fp32_dot = x.dtype == torch.float32 or (_INTERPRETED and x.dtype == torch.bfloat16)
    common = dict(
        GROUP_SIZE=group_size if mode in (CONTIGUOUS, COMPUTED) else 1,
        GROUP_MODE=mode,
        HAS_BIAS=bias is not None,
        EVEN_K=k % cfg.block_k == 0,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    tensors = (
        x2, qweight, scales, qzeros,
        g_idx if g_idx is not None else qweight,  # dummies are never read (constexpr-disabled)
        bias if bias is not None else scales,
    )
    strides = (*x2.stride(), *qweight.stride(), *scales.stride(), *qzeros.stride())

    n_tiles = triton.cdiv(n, cfg.block_n)
    if cfg.kernel == "dp" or (cfg.kernel == "splitk" and split == 1):
        grid = (triton.cdiv(m, cfg.block_m) * n_tiles,)
        _w4a16_dp_kernel[grid](
            *tensors, out2, m, n, k, *strides, *out2.stride(),
            FP32_DOT=fp32_dot, BLOCK_M=cfg.block_m, GROUP_M=cfg.group_m, **common,
        )
        return out

    if cfg.kernel == "gemv" and split == 1:
        _w4a16_gemv_kernel[(m * n_tiles, 1)](
            *tensors, out2, m, n, k, k_per_split, *strides, 0, *out2.stride(), REDUCE=_DIRECT, **common
        )
        return out

    # Split K: fp32 partials, then (unless they already are the output) one fixed-order cast pass.
    if deterministic:
        part = torch.empty((split, m, n), dtype=torch.float32, device=x.device)
    elif out2.dtype == torch.float32:
        part = out2.zero_().unsqueeze(0)  # atomics straight into the fp32 output
    else:
        part = torch.zeros((1, m, n), dtype=torch.float32, device=x.device)
    part_strides = (part.stride(0) if deterministic else 0, part.stride(1), part.stride(2))
    if cfg.kernel == "gemv":
        _w4a16_gemv_kernel[(m * n_tiles, split)](
            *tensors, part, m, n, k, k_per_split, *strides, *part_strides,
            REDUCE=_PARTIALS if deterministic else _ATOMIC, **common,
        )
    else:
        _w4a16_splitk_kernel[(triton.cdiv(m, cfg.block_m) * n_tiles, split)](
            *tensors, part, m, n, k, k_per_split, *strides, *part_strides,
            FP32_DOT=fp32_dot, DETERMINISTIC=deterministic, BLOCK_M=cfg.block_m, **common,
        )
    if part.data_ptr() != out2.data_ptr():
        _w4a16_splitk_reduce_kernel[(triton.cdiv(m * n, _REDUCE_BLOCK),)](
            part, out2, m * n, n, part.shape[0], part.stride(0), *out2.stride(), BLOCK=_REDUCE_BLOCK, num_warps=4
        )
    return out


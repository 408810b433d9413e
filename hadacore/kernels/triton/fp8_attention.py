"""Triton FP8 attention (flash-attention forward) for ``hadacore::fp8_attention``.

One program owns ``BLOCK_M`` query rows of one (batch, query head) and streams the KV
sequence in ``BLOCK_N`` blocks with the online softmax (running row max ``m``, running
sum ``l``, rescaled fp32 accumulator), as in Triton's fused-attention tutorial:

* ``S = Q8 @ K8^T``: FP8 e4m3 operands (``tl.dot`` on FP8 tensor cores, sm89+), fp32
  accumulation; the per-head dequantization scales ``s_q * s_k``, the softmax scale and
  ``log2(e)`` are folded into one scalar that multiplies the fp32 scores (``exp2`` softmax).
* causal masking with SDPA's top-left alignment (query ``i`` sees keys ``j <= i``); the KV
  loop stops at the diagonal block, so masked-out blocks are never loaded;
* ``O += P @ V`` with V in its input dtype (16-bit; P rounded to it), fp32 accumulation;
* GQA by index: query head ``h`` reads KV head ``h // GROUP`` (no repeated K/V in memory);
* any ``S``/``S_kv`` (masked tails) and any ``D`` up to 256 (padded to a power of two in
  registers, masked in memory); any strides.

Q and K reach it through ``_r3_fp8_quant_kernel`` (R3 as one ``tl.dot`` with H_D, per-head
amax by atomic max, then an exact round-to-nearest-even e4m3 store), or through torch ops
(:func:`hadacore.kernels.fp8.prepare_qk`) where the GPU cannot store e4m3.

Operands of other dtypes take the same kernel: 16-bit Q/K (``quantize=False``, or FP8
values widened exactly to fp16 on GPUs without FP8 dots) and fp32 (``ieee`` dots, never
tf32). The Triton interpreter (``TRITON_INTERPRET=1``, triton 3.9) runs FP8 dots exactly
but reads bf16 dot operands as raw bits, so under it bf16 dot operands are widened to fp32.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from hadacore.kernels.fp8 import check_attention_args, prepare_qk

__all__ = ["attention_fwd_triton", "fp8_attention_triton", "r3_quantize_fp8_triton", "supports_fp8_dot"]

_LOG2E = 1.4426950408889634


@triton.jit
def _load_tile(ptrs, row_ok, d_ok, ROW_MASK: tl.constexpr, EVEN_D: tl.constexpr):
    """Load a [rows, BLOCK_D] tile, masking only what can be out of range (0 there)."""
    if ROW_MASK:
        if EVEN_D:
            return tl.load(ptrs, mask=row_ok[:, None], other=0.0)
        return tl.load(ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if EVEN_D:
        return tl.load(ptrs)
    return tl.load(ptrs, mask=d_ok[None, :], other=0.0)


@triton.jit
def _attention_kv_loop(
    acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_kd, stride_vs, stride_vd,
    mask_base, stride_mm, stride_mn, m_ok,
    offs_m, offs_n0, offs_d, d_ok, lo, hi, S_KV, s_qk,
    BLOCK_N: tl.constexpr, MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, EVEN_D: tl.constexpr,
    MASK_KIND: tl.constexpr, QK_F32: tl.constexpr, PV_F32: tl.constexpr,
):
    """Online softmax over the KV blocks starting at ``lo, lo + BLOCK_N, ... < hi``.

    ``MASKED=False`` is the hot loop: every key of every block is in range and visible to
    every query row, so there is no mask and no -inf guard.
    """
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        n_ok = offs_n < S_KV
        k = _load_tile(k_base + offs_n[:, None] * stride_ks + offs_d[None, :] * stride_kd, n_ok, d_ok, MASKED, EVEN_D)
        if QK_F32:
            s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = s * s_qk
        if MASKED:
            valid = n_ok[None, :]
            if IS_CAUSAL:
                valid = valid & (offs_n[None, :] <= offs_m[:, None])
            if MASK_KIND != 0:
                mptrs = mask_base + offs_m[:, None] * stride_mm + offs_n[None, :] * stride_mn
                mval = tl.load(mptrs, mask=m_ok[:, None] & n_ok[None, :], other=0)
                if MASK_KIND == 1:  # boolean: attend where true
                    valid = valid & (mval != 0)
                else:  # additive, in the natural-log domain like SDPA: to log2 with the scores
                    s = s + mval.to(tl.float32) * 1.4426950408889634
            s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        if MASKED:  # a row with no visible key yet keeps m = -inf: subtract 0 (no inf - inf)
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_sub = m_new
        p = tl.math.exp2(s - m_sub[:, None])
        alpha = tl.math.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_tile(v_base + offs_n[:, None] * stride_vs + offs_d[None, :] * stride_vd, n_ok, d_ok, MASKED, EVEN_D)
        acc = acc * alpha[:, None]
        if PV_F32:
            acc = tl.dot(p, v.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attention_fwd_kernel(
    Q, K, V, Out, QScale, KScale, Mask,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_ob, stride_oh, stride_os, stride_od,
    stride_mb, stride_mh, stride_mm, stride_mn,
    HQ, HKV, S_Q, S_KV, D, GROUP, qk_scale_log2,
    IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
    QK_F32: tl.constexpr, PV_F32: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // HQ
    hq = pid_bh % HQ
    hkv = hq // GROUP
    # One fp32 scalar turns the FP8 integer-ish scores into log2-domain logits.
    s_qk = tl.load(QScale + pid_bh) * tl.load(KScale + b * HKV + hkv) * qk_scale_log2

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < S_Q
    d_ok = offs_d < D

    b64 = b.to(tl.int64)
    q_base = Q + b64 * stride_qb + hq.to(tl.int64) * stride_qh
    k_base = K + b64 * stride_kb + hkv.to(tl.int64) * stride_kh
    v_base = V + b64 * stride_vb + hkv.to(tl.int64) * stride_vh
    o_base = Out + b64 * stride_ob + hq.to(tl.int64) * stride_oh
    mask_base = Mask + b64 * stride_mb + hq.to(tl.int64) * stride_mh  # MASK_KIND 0: unused

    q = _load_tile(q_base + offs_m[:, None] * stride_qs + offs_d[None, :] * stride_qd, m_ok, d_ok, True, EVEN_D)
    if QK_F32:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # Blocks [0, lo): every key in range and (causal) at or before this tile's first query
    # row: no masks. Blocks [lo, hi): the diagonal and the S_KV tail, masked. Causal tiles
    # never touch keys past their last query row.
    if IS_CAUSAL:
        hi = tl.minimum(S_KV, (pid_m + 1) * BLOCK_M)
        lo = tl.minimum(pid_m * BLOCK_M + 1, S_KV) // BLOCK_N * BLOCK_N
    elif MASK_KIND != 0:  # an explicit mask: every block is a masked block
        hi = S_KV
        lo = 0
    else:
        hi = S_KV
        lo = S_KV // BLOCK_N * BLOCK_N
    acc, l_i, m_i = _attention_kv_loop(
        acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_kd, stride_vs, stride_vd,
        mask_base, stride_mm, stride_mn, m_ok,
        offs_m, offs_n0, offs_d, d_ok, 0, lo, S_KV, s_qk,
        BLOCK_N, False, IS_CAUSAL, EVEN_D, MASK_KIND, QK_F32, PV_F32,
    )
    acc, l_i, m_i = _attention_kv_loop(
        acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_kd, stride_vs, stride_vd,
        mask_base, stride_mm, stride_mn, m_ok,
        offs_m, offs_n0, offs_d, d_ok, lo, hi, S_KV, s_qk,
        BLOCK_N, True, IS_CAUSAL, EVEN_D, MASK_KIND, QK_F32, PV_F32,
    )

    # A row no key may attend to (only possible with an explicit mask) is 0, as in SDPA.
    out = tl.where(l_i[:, None] > 0, acc / l_i[:, None], 0.0)
    tl.store(o_base + offs_m[:, None] * stride_os + offs_d[None, :] * stride_od,
             out.to(Out.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])


@triton.jit
def _round_to_e4m3(y):
    """Round fp32 ``y`` (|y| <= 448) to the nearest e4m3 value, ties to even, in fp32.

    The later cast of an exactly representable value is then exact everywhere. (The triton
    3.9 interpreter's own fp32 -> e4m3 cast drops the carry when rounding crosses a binade,
    127.1 -> 64, and flushes subnormals wrongly; hardware ``cvt.rn`` is right, and this
    gives the same codes as both it and torch.)
    """
    bits = y.to(tl.int32, bitcast=True)
    e = tl.maximum(((bits >> 23) & 0xFF) - 127, -6)  # e4m3 subnormals share 2^-6's step
    inv_step = ((127 + 3 - e) << 23).to(tl.float32, bitcast=True)  # 2^(3 - e), exact
    step = ((127 - 3 + e) << 23).to(tl.float32, bitcast=True)
    v = tl.abs(y) * inv_step  # < 16: the 4 significant bits of e4m3 in the integer part
    r = (v + 8388608.0) - 8388608.0  # + 2^23 - 2^23: round to an integer, ties to even
    return tl.where(y < 0, -r, r) * step


@triton.jit
def _r3_fp8_quant_kernel(
    X, Hmat, Amax, Scale, Y,
    stride_xb, stride_xh, stride_xs, stride_xd,
    HEADS, S, D, rot_scale,
    QUANTIZE: tl.constexpr, ROTATE: tl.constexpr, H_FROM_BITS: tl.constexpr, DOT_F32: tl.constexpr,
    EVEN_D: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """R3 + per-head FP8 quantization of ``x [B, H, S, D]``, in two launches over one grid.

    ``QUANTIZE=False``: ``Amax[b, h] = max |x R|`` (atomic max over the S tiles).
    ``QUANTIZE=True``: ``Y = e4m3(clamp((x R) / Scale[b, h]))``, Y contiguous.
    ``x R = (x @ H_D) * rot_scale``: one ``tl.dot`` with the +-1 matrix H_D (zero-padded to
    BLOCK_D), exact products in x's own dtype and fp32 accumulation; the second launch
    recomputes it rather than reading an fp32 copy (x is 2 bytes, the copy would be 4).
    ``H_FROM_BITS`` (D a power of two): Sylvester's ``H[i, j] = (-1)^popcount(i & j)`` is
    built in registers instead of loaded from ``Hmat``.
    """
    pid_bh = tl.program_id(0)
    pid_s = tl.program_id(1)
    b = pid_bh // HEADS
    h = pid_bh % HEADS
    offs_s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = offs_s < S
    d_ok = offs_d < D
    base = X + b.to(tl.int64) * stride_xb + h.to(tl.int64) * stride_xh
    x = _load_tile(base + offs_s[:, None] * stride_xs + offs_d[None, :] * stride_xd, s_ok, d_ok, True, EVEN_D)
    if ROTATE:
        if H_FROM_BITS:
            v = offs_d[:, None] & offs_d[None, :]
            v = v ^ (v >> 8)
            v = v ^ (v >> 4)
            v = v ^ (v >> 2)
            v = v ^ (v >> 1)
            hm = (1 - 2 * (v & 1)).to(tl.float32 if DOT_F32 else X.dtype.element_ty)
        else:
            hm = tl.load(Hmat + offs_d[:, None] * BLOCK_D + offs_d[None, :])
        if DOT_F32:
            y = tl.dot(x.to(tl.float32), hm.to(tl.float32), input_precision="ieee")
        else:
            y = tl.dot(x, hm)
        y = y * rot_scale
    else:
        y = x.to(tl.float32)
    if QUANTIZE:
        scale = tl.load(Scale + pid_bh)
        # IEEE division (div_rn), as torch's x / s: the same FP8 codes as the emulation.
        y8 = _round_to_e4m3(tl.clamp(tl.math.div_rn(y, scale), -448.0, 448.0)).to(Y.dtype.element_ty)
        out = Y + pid_bh.to(tl.int64) * S * D + offs_s[:, None] * D + offs_d[None, :]
        tl.store(out, y8, mask=s_ok[:, None] & d_ok[None, :])
    else:
        tl.atomic_max(Amax + pid_bh, tl.max(tl.max(tl.abs(y), 1), 0))


_HMAT_CACHE: dict[tuple[int, int, torch.dtype, torch.device], Tensor] = {}


def _padded_hadamard(d: int, block_d: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``hadamard_matrix(d)`` (entries +-1, exact in any float dtype), zero-padded to block_d."""
    key = (d, block_d, dtype, device)
    if key not in _HMAT_CACHE:
        from hadacore.hadamard import hadamard_matrix

        hm = torch.zeros(block_d, block_d, dtype=dtype, device=device)
        hm[:d, :d] = hadamard_matrix(d).to(dtype)
        _HMAT_CACHE[key] = hm
    return _HMAT_CACHE[key]


def r3_quantize_fp8_triton(x: Tensor, *, rotate: bool) -> tuple[Tensor, Tensor]:
    """Triton version of ``quantize_fp8_per_head(r3_rotate(x) if rotate else x)``.

    ``x [B, H, S, D]`` fp16/bf16/fp32, any strides, ``D <= 256``. Returns ``(x8, scale)``:
    contiguous float8_e4m3fn ``[B, H, S, D]`` and fp32 ``[B, H]`` with ``x R ~= x8 * scale``.
    The rotation's fp32 accumulation order differs from the native Hadamard's, so an
    element can land one e4m3 step away from the emulation's when it sits on a rounding
    boundary; the scales agree to fp32 rounding. Needs FP8 conversions: sm89+, or the
    interpreter.
    """
    bsz, heads, s, d = x.shape
    if d > 256:
        raise ValueError(f"r3_quantize_fp8_triton: head_dim {d} > 256 is not supported")
    y = torch.empty((bsz, heads, s, d), dtype=torch.float8_e4m3fn, device=x.device)
    amax = torch.zeros((bsz, heads), dtype=torch.float32, device=x.device)
    if x.numel() == 0:
        return y, amax.clamp_(min=torch.finfo(torch.float32).tiny)
    interp = _interpreting()
    block_d = _pow2_at_least(d, 16)
    dot_f32 = x.dtype == torch.float32 or (interp and x.dtype == torch.bfloat16)
    h_from_bits = rotate and block_d == d  # a power of two >= 16: Sylvester, no matrix load
    hm = amax if not rotate or h_from_bits else _padded_hadamard(d, block_d, torch.float32 if dot_f32 else x.dtype, x.device)
    block_s = 16 if interp else (32 if dot_f32 or block_d > 128 else 64)
    grid = (bsz * heads, triton.cdiv(s, block_s))
    common = dict(ROTATE=rotate, H_FROM_BITS=h_from_bits, DOT_F32=dot_f32, EVEN_D=block_d == d,
                  BLOCK_S=block_s, BLOCK_D=block_d, num_warps=4)
    args = (*x.stride(), heads, s, d, 1.0 / math.sqrt(d) if rotate else 1.0)
    _r3_fp8_quant_kernel[grid](x, hm, amax, amax, y, *args, QUANTIZE=False, **common)
    scale = (amax / 448.0).clamp_(min=torch.finfo(torch.float32).tiny)
    _r3_fp8_quant_kernel[grid](x, hm, amax, scale, y, *args, QUANTIZE=True, **common)
    return y, scale


def _interpreting() -> bool:
    return not isinstance(_attention_fwd_kernel, triton.runtime.jit.JITFunction)


def supports_fp8_dot(device: torch.device) -> bool:
    """FP8 ``tl.dot``: CUDA sm89+ (Ada, Hopper, Blackwell), and the interpreter."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 9)
    return _interpreting()


def _pow2_at_least(v: int, lo: int) -> int:
    return max(lo, 1 << max(0, (v - 1).bit_length()))


def attention_fwd_triton(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_scale: Tensor,
    k_scale: Tensor,
    *,
    is_causal: bool,
    scale: float,
    out_dtype: torch.dtype,
    block_m: Optional[int] = None,
    block_n: Optional[int] = None,
    out: Optional[Tensor] = None,
    attn_mask: Optional[Tensor] = None,
) -> Tensor:
    """``softmax((q * q_scale) (k * k_scale)^T * scale [causal]) @ v`` with the Triton kernel.

    ``q [B, Hq, S, D]`` and ``k [B, Hkv, S_kv, D]`` of one dtype (float8_e4m3fn, fp16, bf16
    or fp32), ``q_scale [B, Hq]`` / ``k_scale [B, Hkv]`` fp32, ``v [B, Hkv, S_kv, D]``
    fp16/bf16/fp32. Returns a new contiguous ``[B, Hq, S, D]`` tensor of ``out_dtype``.
    ``block_m``/``block_n`` override the tile sizes (powers of two >= 16); ``out`` (optional)
    is a contiguous tensor of that shape and dtype to write into. ``attn_mask`` (optional,
    not with ``is_causal``): SDPA's, boolean (attend where true) or additive float,
    broadcastable to ``[B, Hq, S, S_kv]``.
    """
    bsz, hq, s_q, d = q.shape
    hkv, s_kv = k.shape[1], k.shape[2]
    if q.dtype != k.dtype:
        raise TypeError(f"attention_fwd_triton: q and k must share a dtype, got {q.dtype} and {k.dtype}")
    if d > 256:
        raise ValueError(f"attention_fwd_triton: head_dim {d} > 256 is not supported")
    shape = (bsz, hq, s_q, d)
    if out is None:
        out = torch.empty(shape, dtype=out_dtype, device=q.device)
    elif tuple(out.shape) != shape or out.dtype != out_dtype or out.device != q.device or not out.is_contiguous():
        raise ValueError(
            f"attention_fwd_triton: out must be a contiguous {out_dtype} tensor of shape {shape} on {q.device}, "
            f"got {out.dtype} {tuple(out.shape)} on {out.device}"
        )
    if out.numel() == 0:
        return out
    q_scale = q_scale.to(torch.float32).contiguous()
    k_scale = k_scale.to(torch.float32).contiguous()

    interp = _interpreting()
    qk_f32 = q.dtype == torch.float32 or (interp and q.dtype == torch.bfloat16)
    pv_f32 = v.dtype == torch.float32 or (interp and v.dtype == torch.bfloat16)
    # FP8 tensor-core dots need K >= 32; fp32 dots hold more registers: smaller M tiles.
    block_d = _pow2_at_least(d, 32 if q.dtype == torch.float8_e4m3fn else 16)
    if interp:
        bm, bn, warps, stages = 16, 16, 4, 1
    elif qk_f32 or pv_f32 or block_d > 128:
        bm, bn, warps, stages = 64, 32, 4, 2
    else:
        bm, bn, warps, stages = 128, 64, 8, 3
    bm, bn = block_m or bm, block_n or bn
    for name, blk in (("block_m", bm), ("block_n", bn)):
        if blk < 16 or blk & (blk - 1):
            raise ValueError(f"attention_fwd_triton: {name} must be a power of two >= 16, got {blk}")

    if attn_mask is None:
        mask, mask_kind, mask_strides = q_scale, 0, (0, 0, 0, 0)
    else:
        if is_causal:
            raise ValueError("attention_fwd_triton: pass either attn_mask or is_causal, not both (as SDPA)")
        # bool -> int8 before broadcasting (a copy of the mask's own size at most)
        mask = (attn_mask.to(torch.int8) if attn_mask.dtype == torch.bool else attn_mask).expand(shape[0], hq, s_q, s_kv)
        mask_kind, mask_strides = (1 if attn_mask.dtype == torch.bool else 2), mask.stride()

    grid = (triton.cdiv(s_q, bm), bsz * hq)
    _attention_fwd_kernel[grid](
        q, k, v, out, q_scale, k_scale, mask,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *mask_strides,
        hq, hkv, s_q, s_kv, d, hq // hkv, float(scale) * _LOG2E,
        IS_CAUSAL=bool(is_causal), MASK_KIND=mask_kind, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d, EVEN_D=block_d == d,
        QK_F32=qk_f32, PV_F32=pv_f32, num_warps=warps, num_stages=stages,
    )
    return out


def fp8_attention_triton(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    is_causal: bool = False,
    scale: Optional[float] = None,
    rotate: bool = True,
    quantize: bool = True,
    fp8_dot: Optional[bool] = None,
    fused_prep: Optional[bool] = None,
    block_m: Optional[int] = None,
    block_n: Optional[int] = None,
    out: Optional[Tensor] = None,
    attn_mask: Optional[Tensor] = None,
) -> Tensor:
    """``hadacore::fp8_attention`` in Triton (semantics: :mod:`hadacore.kernels.fp8`).

    Two steps: R3 + per-head FP8 quantization of Q and K, then one attention kernel.
    ``fused_prep`` (default: with FP8 on a device that converts to it) quantizes with
    :func:`r3_quantize_fp8_triton` (two small launches per tensor, the rotation as one
    ``tl.dot``); otherwise with torch ops (:func:`prepare_qk`, exactly the emulation's).
    ``fp8_dot`` (default: when the device supports it) feeds the FP8 tensors to ``tl.dot``;
    ``False`` widens the same FP8 values to fp16 (exact) for 16-bit dots -- identical
    products, for GPUs before sm89. Runs on CUDA tensors, and on CPU tensors when
    ``TRITON_INTERPRET=1``.
    """
    check_attention_args(q, k, v, rotate, attn_mask, is_causal)
    d = q.shape[-1]
    if fp8_dot is None:
        fp8_dot = supports_fp8_dot(q.device)
    if fused_prep is None:  # the quantize kernel stores e4m3: sm89+ (or the interpreter)
        fused_prep = quantize and supports_fp8_dot(q.device) and d <= 256
    if fused_prep:
        if not quantize:
            raise ValueError("fp8_attention_triton: fused_prep=True needs quantize=True")
        (q_op, sq), (k_op, sk) = r3_quantize_fp8_triton(q, rotate=rotate), r3_quantize_fp8_triton(k, rotate=rotate)
    else:
        q_op, k_op, sq, sk = prepare_qk(q, k, rotate=rotate, quantize=quantize)
    if quantize:
        if not fp8_dot:
            q_op, k_op = q_op.to(torch.float16), k_op.to(torch.float16)
    elif rotate and q.dtype != torch.float32:
        q_op, k_op = q_op.to(q.dtype), k_op.to(q.dtype)  # one rounding of the rotated values
    return attention_fwd_triton(
        q_op, k_op, v, sq, sk,
        is_causal=is_causal, scale=1.0 / math.sqrt(d) if scale is None else scale,
        out_dtype=q.dtype, block_m=block_m, block_n=block_n, out=out, attn_mask=attn_mask,
    )

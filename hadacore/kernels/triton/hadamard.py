"""Triton Hadamard transform: ``out = (scale * (x * signs) @ hadamard_matrix(n))[..., perm]``.

HadaCore's idea (16x16 Hadamard tiles on tensor cores) written in Triton.

Decomposition
-------------
``n = m * p`` with ``p = 2**k`` and ``m`` a base order or 1 (``hadamard_factors``; any
m in ``HADAMARD_BASES``, QuaRot's tables or a Paley construction, up to 1020). A row
is a tensor of "digit" axes, slowest first::

    (M_PAD, 2, .., 2, 16, 16, ..., 16)        p = 2**r_bits * 16**n16,  r_bits < 4

where ``M_PAD`` is ``m`` rounded up to a power of two (>= 16) and only the first ``m``
slices along it are real. Sylvester's ``H_p`` is the Kronecker product of ``H_16`` over
every 16-axis and ``H_2`` over each leftover 2-axis (any grouping of the bits works), and the base
mix is ``H_m`` over the M-axis, so the transform is one small matmul per axis. Each
*stage* views the register tile ``[ROWS, L]`` as ``[ROWS * L / F, F]`` (F = the last
axis), applies the ``F x F`` matrix with one ``tl.dot``, and rotates that axis to the
front (``[ROWS, L/F, F] -> [ROWS, F, L/F]``); after one stage per axis the original
order is back. The stages:

* ``H_16`` along a 16-axis: a ``[R, 16] @ [16, 16]`` dot;
* ``H_2`` along each of the (at most three) leftover 2-axes: a radix-2 butterfly in fp32
  (``tl.split`` / ``tl.join``), not a block-diagonal ``kron(I_{16/r}, H_r)`` tile: that
  tile's zeros meet the data, and ``0 * inf = NaN`` would carry an Inf of one row into its
  tile-mates (other rows, when n < 16); the butterfly is also cheaper (1 add per element);
* ``H_m``: ``[R, M_PAD] @ [M_PAD, M_PAD]`` with ``H_m^T`` zero-padded. The *matrix* is
  padded, never the data: padded slices are loaded as 0 and every real output only
  sums real inputs (the padded matrix columns are 0), so nothing padded leaks into a
  stored value, not even a NaN.

``H_16`` is built in registers from bit parities; ``H_m^T`` comes from
:func:`hadacore.hadamard.hadamard_base` (cached per device). Column-strided input (e.g. a
transposed view) is copied to unit column stride first; any row stride is read in place.

Execution plans (:func:`_plan`; thresholds in :class:`HadamardConfig`)
--------------------------------------------------------------------
* **fused** -- ``M_PAD <= 64`` and ``M_PAD * p <= fused_max`` (16384): one kernel, a
  block of whole rows in registers, every stage, one store. Covers every ``2**k`` up to
  ``2**14`` and e.g. 5120 = 40x128 (M_PAD 64), 14336 = 28x512 (M_PAD 32).
* **two-pass** -- larger rows (``2**15``; 28672 = 28x1024): pass 1 transforms
  contiguous chunks of ``C = min(p, lo_chunk)`` columns into an fp32 scratch buffer;
  pass 2 loads ``[rows, M_PAD * p/C, BB]`` tiles (columns strided by C) and applies the
  remaining power-of-two axes and ``H_m``, then the epilogue.
* **base GEMM** -- ``M_PAD >= 128`` (m = 68 ... 1020: QuaRot's 108, 140, 156, 172 and
  every Paley base, e.g. 11008 = 172x64, 13824 = 108x128, 4864 = 76x64, 29568 = 924x32 with
  M_PAD 1024): ``H_m`` as a real K-looped GEMM ``[rows*p, m] @ H_m^T`` into fp32
  scratch (a 256x256 matrix operand does not belong in one ``tl.dot``; the K loop and the
  grid over output blocks of 64 take any M_PAD), then the power-of-two part on each
  length-p piece (fused or two-pass). Every base order above 60 lands here (the
  smallest non-QuaRot base is 68).

Every plan compiles for sm80 and sm90 without register spills (``tests/test_hadamard_triton.py::
test_compiles_for_real_gpus``); the thresholds are reasoned, not yet tuned on a GPU.

Numerics
--------
Products with +-1 are exact, accumulation is fp32, and the output is rounded once, at
the store (``scale`` is applied in fp32 just before it). The first stage feeds 16-bit
inputs to the tensor cores in their own dtype (exact). Every later stage has an fp32
operand, which must not be rounded to 16 bits (a second rounding, as HadaCore's bf16
path does): ``f32_dot="split"`` (default on sm80+) writes it as the sum of three bf16
pieces (8 + 8 + 8 significant bits = fp32's 24) and runs three bf16 tensor-core dots
with fp32 accumulation; ``f32_dot="ieee"`` uses Triton's exact fp32 dot (FMA units).
Never tf32 (10-bit mantissa). The split keeps infinities (``inf - inf`` is not formed).
Below sm80 bf16 dot operands are widened to fp32 (exact). With ``signs`` the input is
multiplied in fp32 (exact for any sign values) and the first stage is an fp32 stage too.

The Triton interpreter computes ``tl.dot`` on bfloat16 operands on their raw uint16
bit patterns (triton 3.9), so under the interpreter bf16 dot operands are widened to
fp32 first (exact: the products are exact either way); the split is still exercised.
It also rounds fp32 -> bf16 toward zero where a GPU rounds to nearest even, so bf16
outputs differ from a GPU's in the last bit; the tests account for that.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import weakref
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from hadacore.hadamard import hadamard_base, hadamard_factors

__all__ = ["HadamardConfig", "hadamard_triton"]

logger = logging.getLogger(__name__)

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_F32_DOT_MODES = {"ieee": 0, "split": 1}


# --------------------------------------------------------------------------- kernels


@triton.jit
def _h16():
    """Sylvester's ``H_16`` as a [16, 16] fp32 tile: ``H[i, j] = (-1)^popcount(i & j)``."""
    i = tl.arange(0, 16)[:, None]
    j = tl.arange(0, 16)[None, :]
    b = i & j
    parity = (b ^ (b >> 1) ^ (b >> 2) ^ (b >> 3)) & 1
    return 1.0 - 2.0 * parity.to(tl.float32)


@triton.jit
def _dot_exact(a, h, BF16_DOT: tl.constexpr):
    """``a @ h`` in fp32 for a 16-bit ``a`` and ``h`` in {-1, 0, 1}: exact products."""
    if a.dtype == tl.bfloat16:
        if BF16_DOT:
            return tl.dot(a, h.to(tl.bfloat16))
        return tl.dot(a.to(tl.float32), h, input_precision="ieee")  # interpreter workaround
    return tl.dot(a, h.to(a.dtype))


@triton.jit
def _dot_pm1(a, h, F32_DOT: tl.constexpr, BF16_DOT: tl.constexpr):
    """``a @ h`` with fp32 accumulation, ``h`` fp32 with entries in {-1, 0, 1}; never tf32."""
    if a.dtype == tl.float32:
        if F32_DOT == 1:
            # a == hi + mid + lo to fp32 precision; each piece times +-1 is exact in bf16.
            hi = a.to(tl.bfloat16)
            hi32 = hi.to(tl.float32)
            rest = tl.where(hi32 == a, 0.0, a - hi32)  # +-inf: inf - inf would turn into NaN
            mid = rest.to(tl.bfloat16)
            lo = (rest - mid.to(tl.float32)).to(tl.bfloat16)
            acc = _dot_exact(hi, h, BF16_DOT)
            acc += _dot_exact(mid, h, BF16_DOT)
            acc += _dot_exact(lo, h, BF16_DOT)
            return acc
        return tl.dot(a, h, input_precision="ieee")
    return _dot_exact(a, h, BF16_DOT)


@triton.jit
def _rotate(y, ROWS: tl.constexpr, L: tl.constexpr, F: tl.constexpr):
    """[ROWS, L] viewed as [ROWS, L/F, F] -> [ROWS, F, L/F]: the last axis moves to the front."""
    if L != F:
        y = tl.permute(tl.reshape(y, (ROWS, L // F, F)), (0, 2, 1))
    return tl.reshape(y, (ROWS, L))


@triton.jit
def _stage(t, ROWS: tl.constexpr, L: tl.constexpr, F: tl.constexpr, h,
           F32_DOT: tl.constexpr, BF16_DOT: tl.constexpr):
    """Apply ``h`` ([F, F]) along the last axis of ``t`` viewed as [ROWS, L/F, F]; rotate."""
    y = _dot_pm1(tl.reshape(t, (ROWS * L // F, F)), h, F32_DOT, BF16_DOT)
    return _rotate(y, ROWS, L, F)


@triton.jit
def _butterfly(t, ROWS: tl.constexpr, L: tl.constexpr):
    """``H_2`` along the last (size 2) axis of ``t`` viewed as [ROWS, L/2, 2], in fp32; rotate."""
    a, b = tl.split(tl.reshape(t.to(tl.float32), (ROWS * L // 2, 2)))
    return _rotate(tl.join(a + b, a - b), ROWS, L, 2)


@triton.jit
def _transform_rows(t, ROWS: tl.constexpr, L: tl.constexpr, M_PAD: tl.constexpr, R_BITS: tl.constexpr,
                    N16: tl.constexpr, hmt_ptr, F32_DOT: tl.constexpr, BF16_DOT: tl.constexpr):
    """Hadamard over each row of ``t`` [ROWS, L], rows laid out as axes (M_PAD, 2 x R_BITS, 16 x N16)."""
    if N16 > 0:
        h16 = _h16()
        t = _stage(t, ROWS, L, 16, h16, F32_DOT, BF16_DOT)  # peeled: 16-bit in, fp32 out
        for _ in tl.static_range(N16 - 1):
            t = _stage(t, ROWS, L, 16, h16, F32_DOT, BF16_DOT)
    for _ in tl.static_range(R_BITS):
        t = _butterfly(t, ROWS, L)
    if M_PAD > 1:
        k = tl.arange(0, M_PAD)
        hmt = tl.load(hmt_ptr + k[:, None] * M_PAD + k[None, :])
        t = _stage(t, ROWS, L, M_PAD, hmt, F32_DOT, BF16_DOT)
    return t


@triton.jit
def _hadamard_kernel(
    x_ptr, out_ptr, signs_ptr, dest_ptr, hmt_ptr,
    n_rows, n_cols, x_stride_row, x_stride_col, out_stride_row, scale,
    BLOCK_ROWS: tl.constexpr,
    PIECE: tl.constexpr,      # columns per independent piece of a row
    NB: tl.constexpr,         # B-blocks per piece (program_id(1) = piece * NB + block)
    A: tl.constexpr,          # strided axis of the tile (power of two; columns >= n_cols are padding)
    A_STRIDE: tl.constexpr,   # columns between consecutive A slices
    B: tl.constexpr,          # contiguous columns of the tile
    A_M_PAD: tl.constexpr, A_RBITS: tl.constexpr, A_N16: tl.constexpr,  # axes transformed along A
    B_RBITS: tl.constexpr, B_N16: tl.constexpr,                         # axes transformed along B
    HAS_SIGNS: tl.constexpr, HAS_DEST: tl.constexpr, FINAL: tl.constexpr,
    F32_DOT: tl.constexpr, BF16_DOT: tl.constexpr,
):
    """One [BLOCK_ROWS, A, B] tile: load (signs), transform along B then A, store (scale, perm).

    Column of tile element (a, b): ``(pid_c // NB) * PIECE + (pid_c % NB) * B + a * A_STRIDE + b``.
    """
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    rows = pid_r * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    a = tl.arange(0, A)
    b = tl.arange(0, B)
    col = (pid_c // NB) * PIECE + (pid_c % NB) * B + a[:, None] * A_STRIDE + b[None, :]  # [A, B]
    col_ok = col < n_cols  # M-padding (or the last batch of chunks) is loaded as 0, never stored
    mask = (rows < n_rows)[:, None, None] & col_ok[None, :, :]
    rows64 = rows.to(tl.int64)[:, None, None]  # rows * stride may pass 2**31

    t = tl.load(x_ptr + rows64 * x_stride_row + col[None, :, :] * x_stride_col, mask=mask, other=0.0)
    if HAS_SIGNS:
        s = tl.load(signs_ptr + col, mask=col_ok, other=0.0)
        t = t.to(tl.float32) * s.to(tl.float32)[None, :, :]

    if B_RBITS > 0 or B_N16 > 0:
        t = tl.reshape(t, (BLOCK_ROWS * A, B))
        t = _transform_rows(t, BLOCK_ROWS * A, B, 1, B_RBITS, B_N16, hmt_ptr, F32_DOT, BF16_DOT)
        t = tl.reshape(t, (BLOCK_ROWS, A, B))
    if A_M_PAD > 1 or A_RBITS > 0 or A_N16 > 0:
        t = tl.reshape(tl.permute(t, (0, 2, 1)), (BLOCK_ROWS * B, A))
        t = _transform_rows(t, BLOCK_ROWS * B, A, A_M_PAD, A_RBITS, A_N16, hmt_ptr, F32_DOT, BF16_DOT)
        t = tl.permute(tl.reshape(t, (BLOCK_ROWS, B, A)), (0, 2, 1))

    y = t.to(tl.float32)
    if FINAL:
        y = y * scale
    if HAS_DEST:
        dcol = tl.load(dest_ptr + col, mask=col_ok, other=0)
    else:
        dcol = col
    tl.store(out_ptr + rows64 * out_stride_row + dcol[None, :, :], y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _base_mix_kernel(
    x_ptr, out_ptr, signs_ptr, hmt_ptr,
    n_vrows, x_stride_row, x_stride_col,
    P: tl.constexpr, M: tl.constexpr, M_PAD: tl.constexpr,
    BLOCK_V: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_SIGNS: tl.constexpr, F32_DOT: tl.constexpr, BF16_DOT: tl.constexpr,
):
    """``y[r, i*P + q] = sum_j H_m[i, j] x[r, j*P + q]`` as a GEMM ``[rows*P, m] @ H_m^T``.

    Virtual row ``v = r*P + q``; output is fp32, contiguous [rows, m*P].
    """
    pid_v = tl.program_id(0)
    pid_i = tl.program_id(1)
    v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    r = (v // P).to(tl.int64)
    q = v % P
    v_ok = v < n_vrows
    i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    acc = tl.zeros((BLOCK_V, BLOCK_I), dtype=tl.float32)
    for k0 in range(0, M_PAD, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        col = k[None, :] * P + q[:, None]  # [BLOCK_V, BLOCK_K]
        ok = v_ok[:, None] & (k[None, :] < M)
        xk = tl.load(x_ptr + r[:, None] * x_stride_row + col * x_stride_col, mask=ok, other=0.0)
        if HAS_SIGNS:
            s = tl.load(signs_ptr + col, mask=ok, other=0.0)
            xk = xk.to(tl.float32) * s.to(tl.float32)
        h = tl.load(hmt_ptr + k[:, None] * M_PAD + i[None, :])  # zero-padded: exact
        acc += _dot_pm1(xk, h, F32_DOT, BF16_DOT)
    out_col = i[None, :] * P + q[:, None]
    tl.store(out_ptr + r[:, None] * (M * P) + out_col, acc, mask=v_ok[:, None] & (i[None, :] < M))


# --------------------------------------------------------------------------- planning


@dataclasses.dataclass(frozen=True)
class HadamardConfig:
    """Launch thresholds (powers of two). Defaults are reasoned, not yet tuned on a GPU."""

    fused_max: int = 16384     # widest padded row (M_PAD * p) kept in registers in one pass
    fused_max_base: int = 64   # largest M_PAD whose H_m^T is one tl.dot operand
    lo_chunk: int = 4096       # two-pass: contiguous chunk done by the first pass
    tile: int = 4096           # target elements per program
    f32_dot: str = "auto"      # "split" | "ieee" | "auto" (split on sm80+, ieee otherwise)

    def __post_init__(self) -> None:
        for name in ("fused_max", "fused_max_base", "lo_chunk", "tile"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"HadamardConfig.{name} must be a power of two >= 16, got {v}")
        if self.lo_chunk > self.fused_max:
            raise ValueError("HadamardConfig.lo_chunk must not exceed fused_max")
        if self.f32_dot not in ("auto", *_F32_DOT_MODES):
            raise ValueError(f"HadamardConfig.f32_dot must be 'auto', 'split' or 'ieee', got {self.f32_dot!r}")


_DEFAULT_CONFIG = HadamardConfig()


def _log2(v: int) -> int:
    return v.bit_length() - 1


def _digits(size: int) -> tuple[int, int]:
    """A power of two as ``2**r_bits * 16**n16`` with r_bits < 4: returns (r_bits, n16)."""
    k = _log2(size)
    return k % 4, k // 4


def _m_pad(m: int) -> int:
    return 1 if m == 1 else max(16, triton.next_power_of_2(m))


def _pow2_at_least(v: int) -> int:
    return triton.next_power_of_2(max(1, v))


@dataclasses.dataclass(frozen=True)
class _Pass:
    """One launch of ``_hadamard_kernel`` (field names follow its constexpr parameters)."""

    piece: int     # columns per independent piece of a row
    nb: int        # B-blocks per piece
    a: int         # tile's strided axis
    a_stride: int  # columns between A slices
    b: int         # tile's contiguous columns
    a_m_pad: int   # axes transformed along A: M_PAD, 2-axes, 16-axes
    a_rbits: int
    a_n16: int
    b_rbits: int   # axes transformed along B: 2-axes, 16-axes
    b_n16: int

    @property
    def b_stages(self) -> bool:
        return self.b_rbits > 0 or self.b_n16 > 0

    @property
    def a_stages(self) -> bool:
        return self.a_m_pad > 1 or self.a_rbits > 0 or self.a_n16 > 0

    def block_rows(self, rows: int, tile: int) -> int:
        elems = self.a * self.b
        need = 1
        if self.b_stages:  # dots of [BR*A*B/16, 16]
            need = max(need, 256 // elems)
        if self.a_stages:  # dots of [BR*B*A/F, F], F = 16 or M_PAD
            need = max(need, 256 // elems, 16 * max(16, self.a_m_pad) // elems)
        want = min(_pow2_at_least(rows), max(1, tile // elems))
        return max(need, want, 1)


@dataclasses.dataclass(frozen=True)
class _Plan:
    base_gemm: bool   # run _base_mix_kernel first (x -> fp32 scratch)
    passes: tuple[tuple[_Pass, int], ...]  # (pass, programs along the columns)


def _chunk_pass(n: int, c: int, tile: int) -> tuple[_Pass, int]:
    """Transform contiguous chunks of ``c`` columns; ``a`` chunks per program (no A stages)."""
    chunks = n // c
    a = min(triton.next_power_of_2(chunks), max(1, tile // c))
    r_bits, n16 = _digits(c)
    ps = _Pass(piece=a * c, nb=1, a=a, a_stride=c, b=c, a_m_pad=1, a_rbits=0, a_n16=0, b_rbits=r_bits, b_n16=n16)
    return ps, triton.cdiv(chunks, a)


@functools.lru_cache(maxsize=256)
def _plan(m: int, p: int, cfg: HadamardConfig) -> _Plan:
    """Which kernels run, in order, for ``n = m * p`` (see the module docstring)."""
    plan = _make_plan(m, p, cfg)
    logger.debug("hadamard n=%d (m=%d, p=%d): %s", m * p, m, p, plan)
    return plan


def _make_plan(m: int, p: int, cfg: HadamardConfig) -> _Plan:
    n = m * p
    m_pad = _m_pad(m)
    base_gemm = m_pad > cfg.fused_max_base
    mix_m = m_pad if (m > 1 and not base_gemm) else 1  # M axis done inside _hadamard_kernel
    if mix_m > 1 and mix_m * p <= cfg.fused_max:  # fused: tile [BR, M_PAD, p]
        r_bits, n16 = _digits(p)
        fused = _Pass(piece=n, nb=1, a=mix_m, a_stride=p, b=p, a_m_pad=mix_m, a_rbits=0, a_n16=0,
                      b_rbits=r_bits, b_n16=n16)
        return _Plan(base_gemm, ((fused, 1),))
    if mix_m == 1 and p <= cfg.fused_max:  # m == 1, or H_m done by the base GEMM: n/p pieces of p
        return _Plan(base_gemm, (_chunk_pass(n, p, cfg.tile),))
    # two-pass: chunks of C contiguous columns, then the strided rest of p (and the M axis)
    c = min(p, cfg.lo_chunk)
    g = p // c
    a = mix_m * g
    bb = max(1, min(c, cfg.tile // a))
    hi_rbits, hi_n16 = _digits(g)
    piece = n if mix_m > 1 else p
    hi = _Pass(piece=piece, nb=c // bb, a=a, a_stride=c, b=bb, a_m_pad=mix_m, a_rbits=hi_rbits, a_n16=hi_n16,
               b_rbits=0, b_n16=0)
    return _Plan(base_gemm, (_chunk_pass(n, c, cfg.tile), (hi, (n // piece) * hi.nb)))


# --------------------------------------------------------------------------- host side


@functools.lru_cache(maxsize=64)
def _base_matrix_t(m: int, device: torch.device) -> Tensor:
    """fp32 ``H_m^T`` zero-padded to [M_PAD, M_PAD] (``y = x @ H_m^T`` mixes the m pieces)."""
    mp = _m_pad(m)
    hmt = torch.zeros(mp, mp, dtype=torch.float32)
    hmt[:m, :m] = hadamard_base(m).t().to(torch.float32)
    return hmt.to(device)


# perm -> destination columns, validated once per perm tensor (perms are model constants;
# validating needs a device sync, which must not happen on every call; a perm first seen
# inside CUDA-graph capture would fail there, so warm up before capturing).
_DEST_CACHE: dict[int, tuple[weakref.ref, int, Tensor]] = {}


def _destinations(perm: Tensor, n: int) -> Tensor:
    """``dest`` with ``dest[perm[j]] = j`` (int32), so the kernel stores y[c] at out[dest[c]]."""
    key = id(perm)
    hit = _DEST_CACHE.get(key)
    if hit is not None and hit[0]() is perm and hit[1] == perm._version:
        return hit[2]
    if perm.shape != (n,) or perm.dtype.is_floating_point or perm.dtype == torch.bool:
        raise ValueError(f"perm must be an integer tensor of shape [{n}], got {perm.dtype} {tuple(perm.shape)}")
    p64 = perm.long()
    if not torch.equal(torch.sort(p64).values, torch.arange(n, device=perm.device)):
        raise ValueError(f"perm must be a permutation of range({n})")
    dest = torch.empty(n, dtype=torch.int32, device=perm.device)
    dest[p64] = torch.arange(n, dtype=torch.int32, device=perm.device)
    for k in [k for k, v in _DEST_CACHE.items() if v[0]() is None]:
        del _DEST_CACHE[k]
    _DEST_CACHE[key] = (weakref.ref(perm), perm._version, dest)
    return dest


def _interpreting() -> bool:
    return not isinstance(_hadamard_kernel, triton.runtime.jit.JITFunction)


def _num_warps(elems: int) -> int:
    return 4 if elems <= 2048 else 8 if elems <= 8192 else 16


def hadamard_triton(
    x: Tensor,
    scale: float = 1.0,
    signs: Optional[Tensor] = None,
    perm: Optional[Tensor] = None,
    *,
    out: Optional[Tensor] = None,
    config: Optional[HadamardConfig] = None,
) -> Tensor:
    """``(scale * (x * signs) @ hadamard_matrix(n))[..., perm]`` along the last dim, in Triton.

    ``x``: fp16/bf16/fp32, any shape ``[..., n]``, any strides (never modified or aliased).
    ``signs``: optional [n] (applied to input columns); ``perm``: optional permutation of
    ``range(n)`` (``out[..., j] = y[..., perm[j]]``). ``out``: optional contiguous tensor of
    x's shape and dtype to write into. Runs on CUDA tensors, or on CPU tensors when
    ``TRITON_INTERPRET=1``. Returns a contiguous tensor of x's dtype.
    """
    cfg = config or _DEFAULT_CONFIG
    if x.dtype not in _DTYPES:
        raise TypeError(f"hadamard_triton supports float16, bfloat16 and float32 inputs, got {x.dtype}")
    if x.dim() == 0:
        raise ValueError("hadamard_triton needs at least one dimension")
    n = x.shape[-1]
    m, p = hadamard_factors(int(n))
    if signs is not None and (signs.shape != (n,) or signs.device != x.device):
        raise ValueError(f"signs must be a [{n}] tensor on {x.device}, got {tuple(signs.shape)} on {signs.device}")
    if perm is not None and perm.device != x.device:
        raise ValueError(f"perm must be on {x.device}, got {perm.device}")
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    else:
        if out.shape != x.shape or out.dtype != x.dtype or out.device != x.device or not out.is_contiguous():
            raise ValueError(
                f"out must be a contiguous {x.dtype} tensor of shape {tuple(x.shape)} on {x.device}, "
                f"got {out.dtype} {tuple(out.shape)} on {out.device}"
            )
        if out.numel() and out.untyped_storage().data_ptr() == x.untyped_storage().data_ptr():
            raise ValueError("out must not share memory with x (the transform is not in-place)")
    if x.numel() == 0:
        return out

    x2 = x.reshape(-1, n)  # a view for any row stride; a copy only when rows cannot be one stride
    if x2.stride(1) != 1:
        # Column-strided (e.g. transposed) input: one coalesced copy beats strided loads in
        # every stage-1 tile, and keeps column offsets within int32.
        x2 = x2.contiguous()
    out2 = out.view(-1, n)
    rows = x2.shape[0]
    dest = _destinations(perm, n) if perm is not None else None

    interp = _interpreting()
    # bf16 tensor-core dots need sm80+; elsewhere (and in the interpreter) bf16 dot operands
    # are widened to fp32, which is exact for +-1 matrices.
    bf16_mma = not interp and x.is_cuda and torch.cuda.get_device_capability(x.device)[0] >= 8
    f32_mode = cfg.f32_dot
    if f32_mode == "auto":
        f32_mode = "split" if interp or bf16_mma else "ieee"
    common = dict(F32_DOT=_F32_DOT_MODES[f32_mode], BF16_DOT=bf16_mma)

    plan = _plan(m, p, cfg)
    hmt = _base_matrix_t(m, x.device) if m > 1 else out2  # dummy pointer when unused
    src, src_strides, use_signs = x2, (x2.stride(0), x2.stride(1)), signs is not None
    if plan.base_gemm:
        scratch = torch.empty((rows, n), dtype=torch.float32, device=x.device)
        m_pad = _m_pad(m)
        block_v, block_i, block_k = 64, min(64, m_pad), 32
        grid = (triton.cdiv(rows * p, block_v), m_pad // block_i)
        _base_mix_kernel[grid](
            x2, scratch, signs if use_signs else x2, hmt, rows * p, x2.stride(0), x2.stride(1),
            P=p, M=m, M_PAD=m_pad, BLOCK_V=block_v, BLOCK_I=block_i, BLOCK_K=block_k,
            HAS_SIGNS=use_signs, num_warps=4, **common,
        )
        src, src_strides, use_signs = scratch, (n, 1), False

    for idx, (ps, grid_cols) in enumerate(plan.passes):
        final = idx == len(plan.passes) - 1
        dst = out2 if final else torch.empty((rows, n), dtype=torch.float32, device=x.device)
        br = ps.block_rows(rows, cfg.tile)
        _hadamard_kernel[(triton.cdiv(rows, br), grid_cols)](
            src, dst, signs if use_signs else src, dest if (final and dest is not None) else src, hmt,
            rows, n, src_strides[0], src_strides[1], dst.stride(0), float(scale) if final else 1.0,
            BLOCK_ROWS=br, PIECE=ps.piece, NB=ps.nb, A=ps.a, A_STRIDE=ps.a_stride, B=ps.b,
            A_M_PAD=ps.a_m_pad, A_RBITS=ps.a_rbits, A_N16=ps.a_n16, B_RBITS=ps.b_rbits, B_N16=ps.b_n16,
            HAS_SIGNS=use_signs, HAS_DEST=final and dest is not None, FINAL=final,
            num_warps=_num_warps(br * ps.a * ps.b), **common,
        )
        src, src_strides, use_signs = dst, (n, 1), False
    return out

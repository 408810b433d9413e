"""Native (non-Triton) Hadamard transform: the CPU implementation of ``hadacore::hadamard``.

Method: a blocked Kronecker factorisation. ``H_n = (H_m kron H_{f1} kron ... kron H_{fr})^T``
with ``m`` the base order (or none; any m in ``HADAMARD_BASES``, 12 ... 1020, applied
as one dense ``m x m`` matmul) and ``f1 * ... * fr = 2**k`` small Sylvester factors.
Viewing a row as the tensor ``(m, f1, ..., fr)``, factor ``f`` at axis ``a`` is one BLAS
matmul without any transpose: with the row block viewed as ``(rows * A, f, B)``
(``A``/``B`` = product of the axes before/after it) it is ``H_f @ X`` (batched), and for
the last axis (``B == 1``) a plain ``X @ H_f``. Sylvester matrices are symmetric, and
``H_m`` multiplies from the left exactly as QuaRot's ``matmul_hadU`` does.

Rows are processed in blocks of about ``_BLOCK_ELEMS`` elements, so the two fp32 work
buffers stay in L2 and every factor runs in cache: main memory sees one read of ``x``
and one write of the output (plus nothing else), instead of one round trip per factor.
fp32 accumulation (fp64 for fp64 input) and a single rounding when the block is stored.

The factor plan and block size were chosen by ``benchmarks/hadamard.py`` and a sweep on
this project's 2-core CPU (table in BENCHMARKS.md, "Hadamard on CPU: factor plans"):
one dense factor up to 64, otherwise the fewest factors of at most 32, smallest
first. Small factors keep the flop count low (2 * sum(factors) per element) while
staying big enough for BLAS to run at speed.

bf16 input with small n is the exception: oneDNN's bf16 matmul (AMX / AVX512-BF16 on
this CPU) multiplies bf16 by the +-1 matrix with fp32 accumulation and rounds once, so
a dense ``x @ H_n`` is exact by our contract and much faster than converting to fp32.
It needs the folded matrix ``scale * diag(signs) * H_n`` to be exact in bf16 (scale a
bf16 value, signs +-1); otherwise (e.g. ``scale = 1/24`` for n = 576) the blocked fp32
path runs. Measured up to n = 768 (BENCHMARKS.md, same section).

fp16 gets no such path: the CPU fp16 matmul is 1-40x slower than the blocked path.
"""

from __future__ import annotations

import functools
import struct
from typing import Optional

import torch
from torch import Tensor

from hadacore.hadamard import hadamard_base, hadamard_factors, hadamard_matrix, sylvester

__all__ = [
    "hadamard_native", "factor_plan", "use_matmul_form", "matmul_plan", "hadamard_by_matmuls",
    "hadamard_transposed", "MATMUL_FORM_MAX_ELEMS",
]

#: A power-of-two part up to this size is one dense matmul.
_MAX_SINGLE_FACTOR = 64
#: Otherwise it is split into factors of at most this size.
_MAX_FACTOR_LOG2 = 5
#: bf16 input up to this n may run as one dense bf16 matmul (see the table above).
_DENSE_BF16_MAX_N = 768
#: Elements per row block and thread: two fp32 buffers of this size (1 MiB) fit a core's
#: L2 (2 MiB) with room to spare.
_BLOCK_ELEMS = 1 << 17


def factor_plan(n: int) -> tuple[int, tuple[int, ...]]:
    """``(m, (f1, ..., fr))`` with ``n == m * f1 * ... * fr``: the base order (1 if
    none) and the Sylvester factors the CPU path applies, slowest axis first."""
    m, p = hadamard_factors(n)
    k = p.bit_length() - 1
    if p <= _MAX_SINGLE_FACTOR:
        return m, ((p,) if p > 1 else ())
    parts = -(-k // _MAX_FACTOR_LOG2)  # fewest factors of at most 2**_MAX_FACTOR_LOG2
    logs = [k // parts + (1 if i < k % parts else 0) for i in range(parts)]
    return m, tuple(1 << e for e in sorted(logs))


@functools.lru_cache(maxsize=128)
def _factor_matrices(n: int, scale: float, dtype: torch.dtype, device: torch.device) -> tuple[tuple[int, int, Tensor], ...]:
    """``(f, after, H)`` per axis, slowest first. ``H`` is applied as ``H @ X`` on the
    ``(rows * before, f, after)`` view, or as ``X @ H`` when ``after == 1``.

    ``scale`` is folded into the last factor's matrix (exact for +-1 entries: one
    rounding of ``scale`` itself). Sylvester factors are symmetric; ``H_m`` mixes the m
    pieces from the left (``y_i = sum_j H_m[i, j] x_j``), so as the only axis (n == m)
    it appears transposed.
    """
    m, factors = factor_plan(n)
    axes = ([m] if m > 1 else []) + list(factors)
    out = []
    before = 1
    for i, f in enumerate(axes):
        after = n // (before * f)
        h = hadamard_base(m).to(torch.float64) if (i == 0 and m > 1) else sylvester(f, torch.float64)
        if after == 1:
            h = h.t()
        if i == len(axes) - 1:
            h = h * scale
        out.append((f, after, h.contiguous().to(dtype=dtype, device=device)))
        before *= f
    return tuple(out)


@functools.lru_cache(maxsize=32)
def _dense_matrix(n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    return hadamard_matrix(n, torch.float64).to(dtype=dtype, device=device)


@functools.lru_cache(maxsize=64)
def _is_bf16_exact(v: float) -> bool:
    (bits,) = struct.unpack("<I", struct.pack("<f", v))  # exact in fp32 and low 16 bits zero
    return struct.unpack("<f", struct.pack("<I", bits))[0] == v and bits & 0xFFFF == 0


def _dense_lowp_fits(dtype: torch.dtype, n: int, device: torch.device, scale: float) -> bool:
    """The metadata half of :func:`_dense_lowp_ok`: bf16 on CPU, small n, scale exact in bf16."""
    return dtype == torch.bfloat16 and n <= _DENSE_BF16_MAX_N and device.type == "cpu" and _is_bf16_exact(scale)


def _dense_lowp_ok(x: Tensor, scale: float, signs: Optional[Tensor]) -> bool:
    """Whether ``x @ (scale * diag(signs) H_n)[:, perm]`` in bf16 is exact: the folded
    matrix must be representable (so scale must be, and signs +-1), and BLAS (oneDNN,
    AMX/AVX512-BF16) accumulates bf16 products in fp32 and rounds once; checked
    bit-for-bit against fp64 in tests/test_hadamard.py."""
    if not _dense_lowp_fits(x.dtype, x.shape[-1], x.device, scale):
        return False
    return signs is None or bool((signs.abs() == 1).all())


def _hadamard_dense_lowp(x: Tensor, scale: float, signs: Optional[Tensor], perm: Optional[Tensor]) -> Tensor:
    n = x.shape[-1]
    h = _dense_matrix(n, x.dtype, x.device)
    if scale != 1.0:
        h = h * scale
    if signs is not None:
        h = h * signs.to(h.dtype)[:, None]
    if perm is not None:
        h = h[:, perm.to(torch.long)]
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    torch.mm(x.reshape(-1, n), h, out=out.view(-1, n))
    return out


def hadamard_native(
    x: Tensor, scale: float = 1.0, signs: Optional[Tensor] = None, perm: Optional[Tensor] = None
) -> Tensor:
    """``out = (scale * (x * signs) @ hadamard_matrix(n))[..., perm]`` along the last dim.

    Any strides; ``x`` is only read. Returns a new contiguous tensor of ``x.dtype``.
    Argument checks live in ``hadacore.ops.check_hadamard_args``.
    """
    n = x.shape[-1]
    if x.numel() == 0:
        hadamard_factors(n)
        return torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if _dense_lowp_ok(x, scale, signs):
        return _hadamard_dense_lowp(x, scale, signs, perm)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    dev = x.device
    plan = _factor_matrices(n, float(scale), acc, dev)
    out = torch.empty(x.shape, dtype=x.dtype, device=dev)

    x2 = x.reshape(-1, n)  # a view for any 2-D strides; copies only for exotic N-D layouts
    o2 = out.view(-1, n)
    rows = x2.shape[0]
    # Each intra-op thread gets about _BLOCK_ELEMS of every matmul: its share stays in its L2.
    rb = max(1, min(rows, _BLOCK_ELEMS * torch.get_num_threads() // n))
    sg = signs.to(acc) if signs is not None else None
    pm = perm.to(torch.long) if perm is not None else None
    # fp32 input whose rows are packed feeds the first matmul directly; with fp32 output
    # and no permutation the last matmul writes straight into the result.
    read_direct = bool(plan) and sg is None and x2.dtype == acc and x2.stride(1) == 1 and x2.stride(0) == n
    write_direct = bool(plan) and pm is None and out.dtype == acc
    if read_direct and write_direct and len(plan) == 1:
        rb = rows  # one matmul from x into the result: nothing to keep in cache
    need_bufs = (0 if read_direct else 1) + max(0, len(plan) - 1) + (0 if write_direct else 1)
    bufs = [torch.empty(rb * n, dtype=acc, device=dev) for _ in range(min(2, need_bufs))]

    def other(t: Tensor) -> Tensor:  # the work buffer that ``t`` does not live in
        return bufs[1] if t.data_ptr() == bufs[0].data_ptr() else bufs[0]

    for r0 in range(0, rows, rb):
        r = min(rb, rows - r0)
        xb = x2[r0 : r0 + r]
        ob = o2[r0 : r0 + r]
        if read_direct:
            cur = xb
        else:
            cur = bufs[0][: r * n].view(r, n)
            if sg is not None:
                torch.mul(xb, sg, out=cur)  # one pass: convert + signs
            else:
                cur.copy_(xb)
        for i, (f, after, h) in enumerate(plan):
            if write_direct and i == len(plan) - 1:
                dst = ob
            else:
                dst = other(cur)[: r * n].view(r, n)
            if after == 1:
                torch.mm(cur.reshape(-1, f), h, out=dst.view(-1, f))
            else:
                torch.matmul(h, cur.reshape(-1, f, after), out=dst.view(-1, f, after))
            cur = dst
        if not plan and scale != 1.0:  # n == 1
            cur.mul_(scale)
        if pm is not None:
            dst = other(cur)[: r * n].view(r, n) if len(bufs) == 2 else torch.empty_like(cur)
            torch.index_select(cur, 1, pm, out=dst)
            cur = dst
        if cur.data_ptr() != ob.data_ptr():
            ob.copy_(cur)  # the single rounding to x.dtype
    return out


# --------------------------------------------------------------------------- traceable form


#: Up to this many elements the compiler emits :func:`hadamard_by_matmuls` (4 MiB in fp32:
#: its full-size intermediates still live in L2/L3, and the op's Python dispatch, ~48 us
#: per custom-op call here, is a visible share of the transform); above it the op's
#: blocked path, which keeps its work buffers in L2, is worth the dispatch.
MATMUL_FORM_MAX_ELEMS = 1 << 20


def use_matmul_form(rows, n: int) -> bool:
    """Whether the compiler emits the matmul form for ``rows`` rows of size ``n``
    (``rows`` may be symbolic; the caller proves it without guards)."""
    return rows * n <= MATMUL_FORM_MAX_ELEMS


def matmul_plan(
    n: int, scale: float, dtype: torch.dtype, device: torch.device, *, signed: bool = False
) -> tuple[list[Tensor], list[int]]:
    """``(matrices, afters)`` for :func:`hadamard_by_matmuls`: the matrices
    :func:`hadamard_native` uses for x of ``dtype``: the dense bf16 matrix with ``scale``
    folded in when that is exact (and, here, only without ``signs``, whose values are not
    known when the plan is made), else the fp32/fp64 Kronecker factors."""
    if n < 2:
        raise ValueError(f"the matmul form needs n >= 2, got {n}")
    if not signed and _dense_lowp_fits(dtype, n, device, scale):
        return [(_dense_matrix(n, dtype, device) * scale).contiguous()], [1]
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    plan = _factor_matrices(n, float(scale), acc, device)
    return [h for _, _, h in plan], [after for _, after, _ in plan]


def hadamard_by_matmuls(
    x: Tensor, signs: Optional[Tensor], perm: Optional[Tensor], matrices: list[Tensor], afters: list[int]
) -> Tensor:
    """:func:`hadamard_native` as plain functional aten ops, without row blocking.

    The compiler emits this function in place of the op when x is known to be small (a
    decode step; :func:`use_matmul_form`): AOTAutograd traces it into a few matmuls with
    constant matrices from :func:`matmul_plan`, which Inductor fuses with the neighbouring
    casts and runs without a Python op dispatch. Same matrices, same order, one rounding
    at the end: bit for bit the op's result when x is one of its row blocks (tested), and
    the same up to BLAS's summation order otherwise. Signs of +-1 are exact in any precision.
    """
    n = x.shape[-1]
    acc = matrices[0].dtype
    y = x.reshape(-1, n).to(acc)
    if signs is not None:
        y = y * signs.to(acc)
    for h, after in zip(matrices, afters):
        f = h.shape[0]
        y = torch.mm(y.reshape(-1, f), h) if after == 1 else torch.matmul(h, y.reshape(-1, f, after))
    y = y.reshape(-1, n)
    if perm is not None:
        y = y.index_select(1, perm.to(torch.long))
    return y.to(x.dtype).reshape(x.shape)


def hadamard_transposed(x: Tensor, scale: float) -> Tensor:
    """``scale * x @ hadamard_matrix(n).T`` along the last dim: the transform's adjoint (its
    backward). The same factor matrices as :func:`hadamard_by_matmuls`, each transposed
    (the transpose of a Kronecker product is the product of the transposes). fp32
    accumulation (fp64 for fp64), one rounding; any device."""
    n = x.shape[-1]
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    matrices, afters = matmul_plan(n, float(scale), acc, x.device, signed=True)
    y = x.reshape(-1, n).to(acc)
    for h, after in zip(matrices, afters):
        f = h.shape[0]
        h = h.mT
        y = torch.mm(y.reshape(-1, f), h) if after == 1 else torch.matmul(h, y.reshape(-1, f, after))
    return y.reshape(x.shape).to(x.dtype)

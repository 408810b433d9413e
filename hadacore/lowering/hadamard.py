"""Native (non-Triton) Hadamard transform: the CPU implementation of ``hadacore::hadamard``.

Method: a blocked Kronecker factorisation. ``H_n = (H_m kron H_{f1} kron ... kron H_{fr})^T``
with ``m`` the odd base (or none) and ``f1 * ... * fr = 2**k`` small Sylvester factors.
Viewing a row as the tensor ``(m, f1, ..., fr)``, factor ``f`` at axis ``a`` is one BLAS
matmul without any transpose: with the row block viewed as ``(rows * A, f, B)``
(``A``/``B`` = product of the axes before/after it) it is ``H_f @ X`` (batched), and for
the last axis (``B == 1``) a plain ``X @ H_f``. Sylvester matrices are symmetric, and
``H_m`` multiplies from the left exactly as QuaRot's ``matmul_hadU`` does.

Rows are processed in blocks of about ``_BLOCK_ELEMS`` elements, so the two fp32 work
buffers stay in L2 and every factor runs in cache: main memory sees one read of ``x``
and one write of the output (plus nothing else), instead of one round trip per factor.
fp32 accumulation (fp64 for fp64 input) and a single rounding when the block is stored.

The factor plan and block size were chosen by ``benchmarks/hadamard.py`` and a sweep
on this project's 2-core CPU (Xeon, AVX-512, 2 MiB L2 per core), 16M fp32 elements,
one thread, best of 9 (times as multiples of the ``copy_`` memory floor):

    n=64     [64] 3.3x      [8, 8] 4.6x
    n=128    [8, 16] 3.6x   [16, 8] 4.3x   [128] 4.5x
    n=1024   [32, 32] 3.2x  [16, 64] 3.7x  [64, 16] 3.9x
    n=4096   [16, 16, 16] 4.2x   [64, 64] 4.7x   [32, 128] 4.8x
    n=16384  [16, 32, 32] 4.2x   [32, 32, 16] 4.4x   [128, 128] 7.9x
    block    128K elements best at every n (64K/256K within 10%, 32K 10-60% slower)

i.e. one dense factor up to 64, otherwise the fewest factors of at most 32, smallest
first. Small factors keep the flop count low (2 * sum(factors) per element) while
staying big enough for BLAS to run at speed.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor

from hadacore.hadamard import hadamard_base, hadamard_factors, sylvester

__all__ = ["hadamard_native", "factor_plan"]

#: A power-of-two part up to this size is one dense matmul.
_MAX_SINGLE_FACTOR = 64
#: Otherwise it is split into factors of at most this size.
_MAX_FACTOR_LOG2 = 5
#: Elements per row block: two fp32 buffers of this size (1 MiB) fit L2 with room to spare.
_BLOCK_ELEMS = 1 << 17


def factor_plan(n: int) -> tuple[int, tuple[int, ...]]:
    """``(m, (f1, ..., fr))`` with ``n == m * f1 * ... * fr``: the odd base (1 if none)
    and the Sylvester factors the CPU path applies, slowest axis first."""
    m, p = hadamard_factors(n)
    k = p.bit_length() - 1
    if p <= _MAX_SINGLE_FACTOR:
        return m, ((p,) if p > 1 else ())
    parts = -(-k // _MAX_FACTOR_LOG2)  # fewest factors of at most 2**_MAX_FACTOR_LOG2
    logs = [k // parts + (1 if i < k % parts else 0) for i in range(parts)]
    return m, tuple(1 << e for e in sorted(logs))


@functools.lru_cache(maxsize=128)
def _sylvester_scaled(f: int, scale: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    return (sylvester(f, torch.float64) * scale).to(dtype=dtype, device=device)


@functools.lru_cache(maxsize=64)
def _base_scaled(m: int, scale: float, dtype: torch.dtype, device: torch.device, transposed: bool) -> Tensor:
    h = hadamard_base(m).to(torch.float64) * scale
    return (h.t() if transposed else h).contiguous().to(dtype=dtype, device=device)


def hadamard_native(
    x: Tensor, scale: float = 1.0, signs: Optional[Tensor] = None, perm: Optional[Tensor] = None
) -> Tensor:
    """``out = (scale * (x * signs) @ hadamard_matrix(n))[..., perm]`` along the last dim.

    Any strides; ``x`` is only read. Returns a new contiguous tensor of ``x.dtype``.
    Argument checks live in ``hadacore.ops.check_hadamard_args``.
    """
    n = x.shape[-1]
    m, factors = factor_plan(n)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    dev = x.device

    # (kind, size) per axis, slowest first; scale is folded into the last factor's matrix,
    # which is exact for the +-1 entries (one fp32 rounding of scale itself).
    axes: list[tuple[str, int]] = ([("base", m)] if m > 1 else []) + [("pow2", f) for f in factors]
    # H_m mixes the m pieces from the left (y_i = sum_j H_m[i, j] x_j): as the batched
    # left operand it is used as is; as the only axis (n == m) it is x @ H_m^T.
    axes_mats: list[Tensor] = []
    for i, (kind, s) in enumerate(axes):
        last = i == len(axes) - 1
        sc = scale if last else 1.0
        if kind == "base":
            axes_mats.append(_base_scaled(s, sc, acc, dev, last))
        else:
            axes_mats.append(_sylvester_scaled(s, sc, acc, dev))
    sizes = [s for _, s in axes]

    x2 = x.reshape(-1, n)  # a view for any 2-D strides; copies only for exotic N-D layouts
    o2 = out.view(-1, n)
    rows = x2.shape[0]
    rb = max(1, min(rows, _BLOCK_ELEMS // n))
    buf_a = torch.empty(rb * n, dtype=acc, device=dev)
    buf_b = torch.empty_like(buf_a)
    sg = signs.to(acc) if signs is not None else None
    pm = perm.to(torch.long) if perm is not None else None
    # fp32 input whose rows are packed can feed the first matmul directly.
    read_direct = sg is None and x2.dtype == acc and x2.stride(1) == 1 and x2.stride(0) == n
    write_direct = pm is None and out.dtype == acc

    for r0 in range(0, rows, rb):
        r = min(rb, rows - r0)
        xb = x2[r0 : r0 + r]
        ob = o2[r0 : r0 + r]
        if not axes:
            cur = buf_a[: r * n].view(r, n)
            if sg is not None:
                torch.mul(xb, sg, out=cur)
            else:
                cur.copy_(xb)
            if scale != 1.0:
                cur.mul_(scale)
        else:
            if read_direct:
                cur = xb.reshape(-1)
            else:
                cur = buf_a[: r * n]
                if sg is not None:
                    torch.mul(xb, sg, out=cur.view(r, n))  # one fp32 pass: convert + signs
                else:
                    cur.view(r, n).copy_(xb)
            before = 1
            for i, (f, h) in enumerate(zip(sizes, axes_mats)):
                after = n // (before * f)
                last = i == len(sizes) - 1
                if last and write_direct:
                    dst = ob.reshape(-1)
                else:
                    dst = buf_b[: r * n] if cur.data_ptr() != buf_b.data_ptr() else buf_a[: r * n]
                if after == 1:
                    torch.mm(cur.view(-1, f), h, out=dst.view(-1, f))
                else:
                    torch.matmul(h, cur.view(-1, f, after), out=dst.view(-1, f, after))
                cur = dst
                before *= f
            if last and write_direct:
                continue
            cur = cur.view(r, n)
        if pm is not None:
            spare = buf_b if cur.data_ptr() != buf_b.data_ptr() else buf_a
            perm_dst = spare[: r * n].view(r, n)
            torch.index_select(cur, 1, pm, out=perm_dst)
            cur = perm_dst
        ob.copy_(cur)  # the single rounding to x.dtype
    return out

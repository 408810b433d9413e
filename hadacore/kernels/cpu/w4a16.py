"""Native (non-Triton) W4A16 GEMM for CPU.

Two entry points:

- :func:`w4a16_gemm_native`: the CPU implementation of the generic op
  ``hadacore::w4a16_gemm`` (GPTQ tensors in, every call). It dequantizes and calls
  BLAS, in x's precision (fp16 inputs compute in fp32: CPU fp16 GEMMs are ~20x slower
  than fp32 ones). This is the exact path; it pays a full dequantization per call.
- :func:`prepare_w4a16_cpu` -> :class:`PreparedW4A16`: the weight converted ONCE for
  ``hadacore::w4a16_gemm_cpu``, the op the compiler emits on CPU (the prepared tensors
  become graph constants). It dispatches per call on M = rows of x:

  ======================  =====================================================
  M <= ``int4_max_m``     ``aten._weight_int4pack_mm_for_cpu`` on the repacked int4
                          weight (reads 0.5 B/weight: at the memory floor for M=1)
  M >  ``int4_max_m``     bf16 BLAS (``F.linear``) on the dequantized bf16 weight
  ======================  =====================================================

  ``int4_max_m`` comes from measured crossovers (:func:`default_int4_max_m`: 12 for
  K < 2048, else 6); the int4 kernel's time grows about linearly in M while bf16 BLAS
  stays near its weight-read time up to M ~ 16. The tables are in BENCHMARKS.md
  ("W4A16 on CPU: int4 kernel vs bf16 BLAS by M").

Act-order weights are sorted by group by the caller
(:func:`hadacore.quant.act_order.sort_by_group`), which hands over ``perm``, the gather
of the input the sorted weight expects; this module never sorts.

Numerics of the prepared op (the W4A16 contract on CPU): activations are 16-bit, so
every input dtype computes in **bf16** (x rounded to bf16, fp32 accumulation, result
rounded to bf16 then cast to x's dtype). The int4 kernel computes
``w = (q - 8) * scale + zero_f`` with bf16 ``scale`` and ``zero_f = (8 - zero) * scale``,
so scales and float zeros are rounded to bf16 (relative 2**-9 each); symmetric
checkpoints have ``zero_f = 0`` exactly. ``tests/test_w4a16_cpu.py`` holds it to the
bf16 tolerance (1e-2 relative Frobenius against fp64); measured errors are ~2-3e-3.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from hadacore.formats.gptq import check_gptq_values, dequantize_gptq, unpack_gptq
from hadacore.kernels.checks import CPU_COMPUTE_DTYPE, INT4PACK_GROUP_SIZES, check_prepared_args

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_INT4_MAX_M",
    "SHORT_K_INT4_MAX_M",
    "default_int4_max_m",
    "INT4PACK_GROUP_SIZES",
    "PreparedW4A16",
    "int4pack_unsupported_reason",
    "prepare_w4a16_cpu",
    "w4a16_gemm_native",
    "w4a16_gemm_prepared",
    "int4_linear",
    "bf16_linear",
]

DEFAULT_INT4_MAX_M = 6  # largest M run by the int4 kernel when a dense weight is kept, K >= 2048 (table above)
SHORT_K_INT4_MAX_M = 12  # the same for K < 2048, where bf16 BLAS's per-call cost dominates
_INT4PACK_N_MULTIPLE = 16  # _convert_weight_to_int4pack_for_cpu needs N % 16 == 0


def w4a16_gemm_native(
    x: Tensor, qweight: Tensor, qzeros: Tensor, scales: Tensor, g_idx: Optional[Tensor], bias: Optional[Tensor], group_size: int
) -> Tensor:
    """``x @ dequant(W).T + bias`` by dequantization + BLAS, in x's precision.

    bf16 x: bf16 weight (one rounding of the fp32 dequant) and bf16 BLAS; fp32 and fp16 x:
    fp32 weight and fp32 BLAS, result cast to x's dtype.
    """
    compute = torch.bfloat16 if x.dtype == torch.bfloat16 else torch.float32
    w = dequantize_gptq(qweight, qzeros, scales, g_idx, group_size, dtype=compute)
    y = F.linear(x.to(compute), w, None if bias is None else bias.to(compute))
    return y.to(x.dtype)


# --------------------------------------------------------------------------- prepared


@dataclass(frozen=True)
class PreparedW4A16:
    """A GPTQ linear converted once for ``hadacore::w4a16_gemm_cpu``.

    Tensors (any may be None, not both ``packed`` and ``weight``):
    ``packed`` uint8 ``[N16, K/2]`` (N padded to 16) from
    ``_convert_weight_to_int4pack_for_cpu`` with K in group-sorted order;
    ``scales_and_zeros`` bf16 ``[K/int4_group_size, N16, 2]``; ``weight`` bf16 ``[N, K]``
    dense, original column order; ``perm`` int64 ``[K]``: the int4 path multiplies
    ``x[..., perm]`` (act-order checkpoints); ``bias`` ``[N]``.

    The compiler registers :meth:`op_args` tensors as graph constants and emits
    ``torch.ops.hadacore.w4a16_gemm_cpu.default(x, *self.op_args())``.
    """

    packed: Optional[Tensor]
    scales_and_zeros: Optional[Tensor]
    weight: Optional[Tensor]
    perm: Optional[Tensor]
    bias: Optional[Tensor]
    int4_group_size: int
    in_features: int
    out_features: int
    int4_max_m: int

    def op_args(self) -> tuple:
        """Everything after ``x`` in ``hadacore::w4a16_gemm_cpu``'s schema, in order."""
        return (
            self.packed, self.scales_and_zeros, self.weight, self.perm, self.bias,
            self.int4_group_size, self.out_features, self.int4_max_m,
        )

    def __call__(self, x: Tensor) -> Tensor:
        """The fast path, called directly (eager mode: no op dispatch)."""
        check_prepared_args(x, *self.op_args()[:6], self.out_features)
        return w4a16_gemm_prepared(x, *self.op_args())

    @property
    def nbytes(self) -> int:
        """Bytes held (the memory cost of the choice of paths)."""
        ts = (self.packed, self.scales_and_zeros, self.weight, self.perm, self.bias)
        return sum(t.numel() * t.element_size() for t in ts if t is not None)


def int4pack_unsupported_reason(k: int, group_size: int, g_idx: Optional[Tensor], bits: int) -> tuple[Optional[str], int]:
    """``(why not | None, int4 group size)`` for torch's CPU int4 kernel.

    The kernel wants contiguous groups of 32/64/128/256 columns. Larger groups (and
    per-channel) are split into equal sub-groups sharing a scale, which is exact.
    """
    if bits != 4:
        return f"bits={bits} (the int4 kernel is 4-bit only)", 0
    gs = k if group_size == -1 else group_size
    sub = next((g for g in INT4PACK_GROUP_SIZES if gs % g == 0), None)
    if sub is None:
        return f"group size {gs} is not a multiple of 32", 0
    if g_idx is not None and group_size != -1 and not torch.equal(
            g_idx.long(), torch.arange(k, device=g_idx.device) // gs):
        return "groups are not contiguous runs of group_size columns", 0
    return None, sub


def default_int4_max_m(k: int) -> int:
    """Largest M that runs the int4 kernel for input size ``k`` (module docstring table)."""
    return SHORT_K_INT4_MAX_M if k < 2048 else DEFAULT_INT4_MAX_M


def prepare_w4a16_cpu(
    qweight: Tensor,
    qzeros: Tensor,
    scales: Tensor,
    g_idx: Optional[Tensor],
    group_size: int,
    bias: Optional[Tensor] = None,
    *,
    perm: Optional[Tensor] = None,
    bits: int = 4,
    checkpoint_format: str = "gptq",
    dense: Optional[bool] = None,
    int4: bool = True,
    int4_max_m: Optional[int] = None,
) -> PreparedW4A16:
    """Convert GPTQ tensors once for ``hadacore::w4a16_gemm_cpu`` (see module docstring).

    ``g_idx`` must be sorted by group (act-order weights: sort them first with
    :func:`hadacore.quant.act_order.sort_by_group`); ``perm`` is then the input gather the
    sorted weight expects: stored column ``j`` multiplies ``x[..., perm[j]]``.

    ``int4_max_m``: the largest M for the int4 kernel (default :func:`default_int4_max_m`).
    ``dense``: keep a dequantized bf16 weight for M > ``int4_max_m`` (4 extra bytes per
    2 weights: 2.5 B/weight in all). ``None`` (default) keeps it, which is fastest at
    every M; ``False`` keeps only the int4 weight (0.5 B/weight) and runs the int4 kernel
    at every M (~3x slower than BLAS from M=64). Where the int4 kernel cannot take the
    weight (not 4-bit, groups not a multiple of 32, uneven act-order groups) only the
    dense weight is kept, whatever ``dense`` says, and a log line says why. ``int4=False``
    skips the int4 repack and keeps only the dense weight (for callers that know every
    M will exceed ``int4_max_m``).
    """
    if not int4 and dense is False:
        raise ValueError("prepare_w4a16_cpu: int4=False with dense=False leaves no weight")
    n, k, _ = check_gptq_values(qweight, qzeros, scales, g_idx, group_size, bits=bits)
    if g_idx is not None and g_idx.numel() > 1 and not bool((g_idx[1:] >= g_idx[:-1]).all()):
        raise ValueError("prepare_w4a16_cpu needs groups sorted along K: sort an act-order weight with "
                         "hadacore.quant.act_order.sort_by_group and pass its perm")
    if perm is not None and (perm.shape != (k,) or perm.dtype.is_floating_point or perm.dtype == torch.bool):
        raise ValueError(f"perm must be an integer [K={k}] tensor, got {perm.dtype} {tuple(perm.shape)}")
    if qweight.device.type != "cpu":
        raise ValueError(f"prepare_w4a16_cpu needs CPU tensors, got {qweight.device}")
    if bias is not None and (bias.shape != (n,) or not bias.dtype.is_floating_point):
        raise ValueError(f"bias must be a floating-point [N={n}] tensor, got {bias.dtype} {tuple(bias.shape)}")
    why, sub = int4pack_unsupported_reason(k, group_size, g_idx, bits) if int4 else (None, 0)
    perm = None if perm is None else perm.to(torch.int64).contiguous()
    packed = sz = None
    if int4 and why is None:
        q, s, z, _ = unpack_gptq({"qweight": qweight, "qzeros": qzeros, "scales": scales}, bits, checkpoint_format=checkpoint_format)
        s32, z32 = s.float(), z.float()
        zero_f = (8.0 - z32) * s32  # w = (q - z) * s = (q - 8) * s + (8 - z) * s
        gs = k if group_size == -1 else group_size
        reps = gs // sub
        sz = torch.stack([s32, zero_f], dim=-1).repeat_interleave(reps, dim=0)  # [K/sub, N, 2]
        n16 = -(-n // _INT4PACK_N_MULTIPLE) * _INT4PACK_N_MULTIPLE
        if n16 != n:  # pad rows: q=8, scale=0, zero=0 give w=0 (sliced off anyway)
            q = torch.cat([q, q.new_full((n16 - n, k), 8)])
            sz = torch.cat([sz, sz.new_zeros(sz.shape[0], n16 - n, 2)], dim=1)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), 8)
        sz = sz.to(CPU_COMPUTE_DTYPE).contiguous()
    elif why is not None:
        log.info("hadacore: W4A16 [%d x %d] on CPU without the int4 kernel: %s; using bf16 BLAS", n, k, why)
    weight = None
    if packed is None or dense is None or dense:
        weight = dequantize_gptq(qweight, qzeros, scales, g_idx, group_size, bits, checkpoint_format=checkpoint_format,
                                 dtype=CPU_COMPUTE_DTYPE)
        if perm is not None:  # the dense path multiplies x as it comes: columns back in x's order
            weight = torch.empty_like(weight).index_copy_(1, perm, weight)
    return PreparedW4A16(
        packed=packed,
        scales_and_zeros=sz,
        weight=weight,
        perm=perm,
        bias=None if bias is None else bias.detach().clone(),
        int4_group_size=sub,
        in_features=k,
        out_features=n,
        int4_max_m=int(default_int4_max_m(k) if int4_max_m is None else int4_max_m),
    )


def int4_linear(
    x: Tensor,
    packed: Tensor,
    scales_and_zeros: Tensor,
    perm: Optional[Tensor],
    bias: Optional[Tensor],
    group_size: int,
    out_features: int,
) -> Tensor:
    """The int4 path in plain aten ops: bf16 ``x`` (gathered by ``perm``) through torch's int4 kernel.

    The compiler emits this function itself, not the op, when M is known to be small at
    compile time: AOTAutograd traces it, so Inductor fuses the casts and the gather into
    the neighbouring kernels and calls the int4 kernel directly (no Python op dispatch).
    """
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    if x2.dtype != CPU_COMPUTE_DTYPE:
        x2 = x2.to(CPU_COMPUTE_DTYPE)
    if perm is not None:
        x2 = x2.index_select(1, perm)
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, packed, group_size, scales_and_zeros)
    return _finish(y if y.shape[1] == out_features else y[:, :out_features], x, bias)


def bf16_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """The dense path: bf16 BLAS on the dequantized bf16 weight (emitted as is when M is known large)."""
    x2 = x.reshape(-1, x.shape[-1])
    y = F.linear(x2 if x2.dtype == CPU_COMPUTE_DTYPE else x2.to(CPU_COMPUTE_DTYPE), weight)
    return _finish(y, x, bias)


def _finish(y: Tensor, x: Tensor, bias: Optional[Tensor]) -> Tensor:
    """bf16 ``y [M, N]`` -> x's dtype, plus bias, in x's leading shape (no op that would be a no-op:
    in eager mode each costs a dispatch)."""
    if y.dtype != x.dtype:
        y = y.to(x.dtype)
    if bias is not None:
        y = y + (bias if bias.dtype == y.dtype else bias.to(y.dtype))
    return y.view(*x.shape[:-1], y.shape[-1])


def w4a16_gemm_prepared(
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
    """The CPU body of ``hadacore::w4a16_gemm_cpu``: dispatch on M (module docstring)."""
    m = x.numel() // x.shape[-1]
    if packed is not None and (weight is None or m <= int4_max_m):
        y = int4_linear(x, packed, scales_and_zeros, perm, bias, group_size, out_features)
    else:
        y = bf16_linear(x, weight, bias)
    return y.contiguous()

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

  Measured on this project's 2-core CPU (Xeon, AVX512-bf16 + AMX, bf16 activations, ms;
  int4 = the int4 kernel, blas = bf16 ``F.linear`` on the dense weight; scripts:
  ``benchmarks/w4a16.py``, and its ``--hot``/``--threads`` options):

  ====================  ======  =====  =====  =====  =====  =====  =====
  4096 x 4096           M=1     4      6      8      12     16     256
  ====================  ======  =====  =====  =====  =====  =====  =====
  2 threads, hot        0.44    0.78                         3.1    108
    blas                1.07    0.96                         1.06   32
  1 thread, hot         0.91    1.58   2.62   3.02   5.62   8.89
    blas                2.23    2.35   2.86   3.04   3.45   3.82
  1 thread, cold        1.46    1.97   3.25   3.92   13.4   15.0
    blas                7.98    3.57   3.78   3.61   9.91   6.01
  ====================  ======  =====  =====  =====  =====  =====  =====

  11008 x 4096, 1 thread, hot int4/blas: M=6 17.8/19.3, M=8 24.9/22.6; cold: M=6
  12.8/12.9, M=8 17.1/13.1. The int4 kernel is compute-bound and grows ~linearly in M;
  BLAS stays near its bf16-weight read time up to M ~ 16. Where they cross depends on
  K: BLAS's bf16 GEMM has a fixed cost per call that dominates short rows. Cold weights
  (64 MiB evicted before each call), 1 thread, int4 time / bf16 time, 2026-11-22:

  =============  =====  =====  =====  =====  =====
  N x K          M=4    6      8      12     16
  =============  =====  =====  =====  =====  =====
  576 x 576      0.42   0.58   0.56   0.62   0.71
  3072 x 576     0.38   0.58   0.54   0.90   0.87
  49152 x 576    0.44   0.57   0.67   0.97   1.24
  576 x 1536     0.48   0.62   0.75   0.89   1.04
  12288 x 4096   0.57   0.89   1.00   1.45   1.85
  4096 x 11008   0.57   0.91   1.06   1.53   1.95
  =============  =====  =====  =====  =====  =====

  hence :func:`default_int4_max_m`: 12 for K < 2048 (SmolLM2-sized layers), else 6
  (7B-sized layers, where M=8 is a tie and 12 already 1.5x slower). End to end on
  SmolLM2-135M at batch 8 this took a decode step from 52 to 41 ms.

  Full table (``benchmarks/w4a16.py --threads 1``, cold weights, 4 shapes x M in
  {1, 4, 16, 64, 256}): hadacore over the best alternative (bf16/fp32 ``F.linear``,
  dequantize + linear) is 0.28-0.46 at M=1, 0.37-0.60 at M=4 and 0.78-1.11 from M=16
  (there it is the same BLAS call plus ~0.1 ms of op overhead); at M=1 the int4 kernel
  reads the weight at 0.96-1.21x the single-thread ``sum`` bandwidth.

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

from hadacore.quant.format import check_gptq_values, dequantize_gptq, unpack_gptq

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_INT4_MAX_M",
    "SHORT_K_INT4_MAX_M",
    "default_int4_max_m",
    "INT4PACK_GROUP_SIZES",
    "PreparedW4A16",
    "check_prepared_args",
    "int4pack_unsupported_reason",
    "prepare_w4a16_cpu",
    "w4a16_gemm_native",
    "w4a16_gemm_prepared",
    "int4_linear",
    "bf16_linear",
]

DEFAULT_INT4_MAX_M = 6  # largest M run by the int4 kernel when a dense weight is kept, K >= 2048 (table above)
SHORT_K_INT4_MAX_M = 12  # the same for K < 2048, where bf16 BLAS's per-call cost dominates
INT4PACK_GROUP_SIZES = (256, 128, 64, 32)  # what _weight_int4pack_mm_for_cpu accepts
_INT4PACK_N_MULTIPLE = 16  # _convert_weight_to_int4pack_for_cpu needs N % 16 == 0
_COMPUTE_DTYPE = torch.bfloat16


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
        import hadacore.ops  # noqa: F401  (registers the op)

        return torch.ops.hadacore.w4a16_gemm_cpu(x, *self.op_args())

    @property
    def nbytes(self) -> int:
        """Bytes held (the memory cost of the choice of paths)."""
        ts = (self.packed, self.scales_and_zeros, self.weight, self.perm, self.bias)
        return sum(t.numel() * t.element_size() for t in ts if t is not None)


def int4pack_unsupported_reason(
    n: int, k: int, group_size: int, g_idx: Optional[Tensor], bits: int
) -> tuple[Optional[str], Optional[Tensor], int]:
    """``(why not | None, perm | None, int4 group size)`` for torch's CPU int4 kernel.

    The kernel wants contiguous groups of 32/64/128/256 columns. Larger groups (and
    per-channel) are split into equal sub-groups sharing a scale, which is exact.
    Act-order ``g_idx`` is handled by sorting K by group (``perm``), provided every group
    then has exactly ``group_size`` columns, as GPTQ's act-order produces.
    """
    if bits != 4:
        return f"bits={bits} (the int4 kernel is 4-bit only)", None, 0
    gs = k if group_size == -1 else group_size
    sub = next((g for g in INT4PACK_GROUP_SIZES if gs % g == 0), None)
    if sub is None:
        return f"group size {gs} is not a multiple of 32", None, 0
    perm = None
    if g_idx is not None and group_size != -1:
        g = g_idx.long()
        perm = torch.argsort(g, stable=True)
        if not torch.equal(g[perm], torch.arange(k, device=g.device) // gs):
            return "g_idx groups are not all of group_size columns", None, 0
        if torch.equal(perm, torch.arange(k, device=g.device)):
            perm = None
    return None, perm, sub


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
    bits: int = 4,
    checkpoint_format: str = "gptq",
    dense: Optional[bool] = None,
    int4: bool = True,
    int4_max_m: Optional[int] = None,
) -> PreparedW4A16:
    """Convert GPTQ tensors once for ``hadacore::w4a16_gemm_cpu`` (see module docstring).

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
    if qweight.device.type != "cpu":
        raise ValueError(f"prepare_w4a16_cpu needs CPU tensors, got {qweight.device}")
    if bias is not None and (bias.shape != (n,) or not bias.dtype.is_floating_point):
        raise ValueError(f"bias must be a floating-point [N={n}] tensor, got {bias.dtype} {tuple(bias.shape)}")
    why, perm, sub = int4pack_unsupported_reason(n, k, group_size, g_idx, bits) if int4 else (None, None, 0)
    packed = sz = None
    if int4 and why is None:
        q, s, z, _ = unpack_gptq({"qweight": qweight, "qzeros": qzeros, "scales": scales}, bits, checkpoint_format=checkpoint_format)
        s32, z32 = s.float(), z.float()
        zero_f = (8.0 - z32) * s32  # w = (q - z) * s = (q - 8) * s + (8 - z) * s
        gs = k if group_size == -1 else group_size
        reps = gs // sub
        sz = torch.stack([s32, zero_f], dim=-1).repeat_interleave(reps, dim=0)  # [K/sub, N, 2]
        if perm is not None:
            q = q[:, perm]
        n16 = -(-n // _INT4PACK_N_MULTIPLE) * _INT4PACK_N_MULTIPLE
        if n16 != n:  # pad rows: q=8, scale=0, zero=0 give w=0 (sliced off anyway)
            q = torch.cat([q, q.new_full((n16 - n, k), 8)])
            sz = torch.cat([sz, sz.new_zeros(sz.shape[0], n16 - n, 2)], dim=1)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), 8)
        sz = sz.to(_COMPUTE_DTYPE).contiguous()
    elif why is not None:
        log.info("hadacore: W4A16 [%d x %d] on CPU without the int4 kernel: %s; using bf16 BLAS", n, k, why)
    weight = None
    if packed is None or dense is None or dense:
        weight = dequantize_gptq(qweight, qzeros, scales, g_idx, group_size, bits, checkpoint_format=checkpoint_format, dtype=_COMPUTE_DTYPE)
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


def check_prepared_args(
    x: Tensor,
    packed: Optional[Tensor],
    scales_and_zeros: Optional[Tensor],
    weight: Optional[Tensor],
    perm: Optional[Tensor],
    bias: Optional[Tensor],
    group_size: int,
    out_features: int,
) -> int:
    """Validate a ``w4a16_gemm_cpu`` call from metadata only (fake-tensor safe); return K."""
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension [..., K]")
    if packed is None and weight is None:
        raise ValueError("w4a16_gemm_cpu needs the packed int4 weight, the dense weight, or both")
    if (packed is None) != (scales_and_zeros is None):
        raise ValueError("packed and scales_and_zeros come together")
    k = x.shape[-1]
    if packed is not None:
        if packed.dtype != torch.uint8 or packed.dim() != 2 or packed.shape[1] * 2 != k or packed.shape[0] < out_features:
            raise ValueError(
                f"packed must be uint8 [N16 >= {out_features}, K/2 = {k}/2] from "
                f"_convert_weight_to_int4pack_for_cpu, got {packed.dtype} {tuple(packed.shape)}"
            )
        if group_size not in INT4PACK_GROUP_SIZES:
            raise ValueError(f"group_size must be one of {INT4PACK_GROUP_SIZES} with a packed weight, got {group_size}")
        want = (k // group_size, packed.shape[0], 2)
        if scales_and_zeros.dtype != _COMPUTE_DTYPE or tuple(scales_and_zeros.shape) != want:
            raise ValueError(f"scales_and_zeros must be bfloat16 {want}, got {scales_and_zeros.dtype} {tuple(scales_and_zeros.shape)}")
    if weight is not None and (weight.dtype != _COMPUTE_DTYPE or tuple(weight.shape) != (out_features, k)):
        raise ValueError(f"weight must be bfloat16 [N={out_features}, K={k}], got {weight.dtype} {tuple(weight.shape)}")
    if perm is not None and (perm.dim() != 1 or perm.shape[0] != k or perm.dtype.is_floating_point):
        raise ValueError(f"perm must be an integer [K={k}] tensor, got {perm.dtype} {tuple(perm.shape)}")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != out_features or not bias.dtype.is_floating_point):
        raise ValueError(f"bias must be a floating-point [N={out_features}] tensor, got {bias.dtype} {tuple(bias.shape)}")
    for name, t in (("packed", packed), ("scales_and_zeros", scales_and_zeros), ("weight", weight), ("perm", perm), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"x is on {x.device} but {name} is on {t.device}")
    return k


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
    x2 = x.reshape(-1, k).to(_COMPUTE_DTYPE)
    if perm is not None:
        x2 = x2.index_select(1, perm)
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.contiguous(), packed, group_size, scales_and_zeros)
    return _finish(y[:, :out_features], x, bias)


def bf16_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """The dense path: bf16 BLAS on the dequantized bf16 weight (emitted as is when M is known large)."""
    k = x.shape[-1]
    y = F.linear(x.reshape(-1, k).to(_COMPUTE_DTYPE), weight)
    return _finish(y, x, bias)


def _finish(y: Tensor, x: Tensor, bias: Optional[Tensor]) -> Tensor:
    """bf16 ``y [M, N]`` -> x's dtype, plus bias, in x's leading shape."""
    y = y.to(x.dtype)
    if bias is not None:
        y = y + bias.to(x.dtype)
    return y.reshape(*x.shape[:-1], y.shape[-1])


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

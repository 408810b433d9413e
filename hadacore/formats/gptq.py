"""GPTQ checkpoint tensors: pack, unpack, dequantize, validate.

Layout (AutoGPTQ / Hugging Face / vLLM "gptq" = v1), for a linear ``y = x W^T`` with
``W [N, K]`` and ``G`` quantization groups along K:

- ``qweight`` int32 ``[K*bits/32, N]``: packed along K; value ``i`` of a word sits at
  bits ``bits*i .. bits*i + bits-1``.
- ``qzeros`` int32 ``[G, N*bits/32]``: packed along N, each stored as ``zero - 1``
  (v1; ``gptq_v2`` stores ``zero``). v1 readers (AutoGPTQ, exllama, vLLM) add 1 to the
  masked field without masking again, so a v1 zero lies in ``[1, 2**bits]``: a stored 15
  reads as 16, and a zero of 0 cannot be stored at all (writers that wrapped it produced
  checkpoints every reader takes as 16). :func:`pack_gptq` therefore rejects zero 0 in v1
  (hadacore's quantizers never emit it); ``gptq_v2`` stores zeros in ``[0, 2**bits)``.
- ``scales`` ``[G, N]`` in the model dtype; ``g_idx`` int32 ``[K]``: group of input column k.
  Per-channel quantization is ``group_size == -1`` with ``G == 1``.

``W[n, k] = (q[n, k] - zero[g_idx[k], n]) * scale[g_idx[k], n]``.
"""

from __future__ import annotations

import sys

import torch

__all__ = [
    "pack_gptq", "unpack_gptq", "dequantize_gptq", "check_gptq_tensors", "check_gptq_values", "check_g_idx_range",
    "default_g_idx",
    "pack_rows", "unpack_rows", "concat_output_rows", "unpack_zeros_wordwise", "mirror_zero_point_zero",
]

_FORMATS = ("gptq", "gptq_v2")


def _check_bits(bits: int) -> int:
    if bits not in (2, 4, 8):
        raise ValueError(f"bits must be 2, 4 or 8, got {bits}")
    return 32 // bits


def _to_int32_bits(words: torch.Tensor) -> torch.Tensor:
    """int64 values in [0, 2**32) -> int32 with the same bit pattern."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _range(t: torch.Tensor) -> str:
    return f"[{int(t.min())}, {int(t.max())}]"


def pack_rows(vals: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``vals [R*per, C]`` (ints in [0, 2**bits)) along dim 0 into int32 ``[R, C]``."""
    per = 32 // bits
    v = vals.to(torch.int64).reshape(vals.shape[0] // per, per, vals.shape[1])
    shifts = torch.arange(0, 32, bits, dtype=torch.int64, device=vals.device).view(1, per, 1)
    return _to_int32_bits((v << shifts).sum(dim=1))


def unpack_rows(words: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_rows`: int32 ``[R, C]`` -> int32 ``[R*per, C]``."""
    per = 32 // bits
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=words.device).view(1, per, 1)
    v = (words.unsqueeze(1) >> shifts) & ((1 << bits) - 1)
    return v.reshape(words.shape[0] * per, words.shape[1])


def _unpack_nk(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """``qweight [K*bits/32, N]`` -> ``[N, K]`` (W's orientation): uint8 for 4/8 bits, else int32."""
    per = 32 // bits
    rows, n = qweight.shape
    if bits in (4, 8) and sys.byteorder == "little" and qweight.is_contiguous():
        # Byte j of a little-endian word holds values 2j, 2j+1 (4-bit) or j (8-bit): split
        # the nibbles on uint8, then move each word's 8 (4) values as one int64 (int32)
        # when transposing to [N, K]: ~3.5x faster than shifting int32 words.
        b = qweight.view(torch.uint8).view(rows, n, 4)
        if bits == 4:
            u = torch.empty(rows, n, 4, 2, dtype=torch.uint8, device=qweight.device)
            torch.bitwise_and(b, 15, out=u[..., 0])
            torch.bitwise_right_shift(b, 4, out=u[..., 1])
            words = u.view(rows, n, 8).view(torch.int64).view(rows, n)
        else:
            words = qweight
        out = torch.empty((n, rows), dtype=words.dtype, device=words.device)  # standard strides, even for size-1 dims
        return out.copy_(words.t()).view(torch.uint8).view(n, rows * per)
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=qweight.device)
    words = qweight.t().contiguous()  # [N, K/per]
    return ((words.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).view(n, rows * per)


def default_g_idx(in_features: int, group_size: int, device=None) -> torch.Tensor:
    """``k // group_size`` (all zeros for per-channel, ``group_size == -1``)."""
    k = torch.arange(in_features, dtype=torch.int32, device=device)
    return torch.zeros_like(k) if group_size == -1 else k // group_size


def pack_gptq(
    intweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    g_idx: torch.Tensor | None = None,
    bits: int = 4,
    *,
    checkpoint_format: str = "gptq",
) -> dict[str, torch.Tensor]:
    """GPTQ tensors from ``intweight [N, K]`` in ``[0, 2**bits)``, ``scales``/``zeros [G, N]``.

    ``g_idx`` defaults to contiguous groups of ``K // G`` columns.
    """
    per = _check_bits(bits)
    if checkpoint_format not in _FORMATS:
        raise ValueError(f"checkpoint_format must be one of {_FORMATS}, got {checkpoint_format!r}")
    if intweight.dim() != 2:
        raise ValueError(f"intweight must be [N, K], got shape {tuple(intweight.shape)}")
    n, k = intweight.shape
    if k % per or n % per:
        raise ValueError(f"N ({n}) and K ({k}) must be multiples of {per} for {bits}-bit packing")
    if scales.dim() != 2 or scales.shape[1] != n or zeros.shape != scales.shape:
        raise ValueError(
            f"scales and zeros must both be [G, N={n}], got {tuple(scales.shape)} and {tuple(zeros.shape)}"
        )
    maxq = (1 << bits) - 1
    if intweight.is_floating_point() and not bool(torch.isfinite(intweight).all()):
        raise ValueError("intweight has non-finite values (NaN or Inf): the weight it was quantized from was not finite")
    if intweight.numel() and (int(intweight.min()) < 0 or int(intweight.max()) > maxq):
        raise ValueError(f"intweight values lie in {_range(intweight)}; they must lie in [0, {maxq}]")
    if scales.is_floating_point() and not bool(torch.isfinite(scales).all()):
        raise ValueError("scales has non-finite values (NaN or Inf): the weight it was quantized from was not finite")
    lo, hi = (1, maxq + 1) if checkpoint_format == "gptq" else (0, maxq)
    if zeros.numel() and (int(zeros.min()) < lo or int(zeros.max()) > hi):
        hint = (
            " (v1 stores zero-1, so zero 0 is not representable: quantize with zero >= 1 "
            "or use checkpoint_format='gptq_v2')" if checkpoint_format == "gptq" else ""
        )
        raise ValueError(f"zeros must lie in [{lo}, {hi}] for {checkpoint_format!r}{hint}")
    groups = scales.shape[0]
    if g_idx is None:
        if k % groups:
            raise ValueError(f"K ({k}) is not a multiple of the {groups} groups; pass g_idx")
        g_idx = torch.arange(k, device=intweight.device) // (k // groups)
    if g_idx.shape != (k,) or g_idx.dtype.is_floating_point or g_idx.dtype == torch.bool:
        raise ValueError(f"g_idx must be an integer [K={k}] tensor, got {g_idx.dtype} {tuple(g_idx.shape)}")
    if k and (int(g_idx.min()) < 0 or int(g_idx.max()) >= groups):
        raise ValueError(f"g_idx has values in {_range(g_idx)}; they must lie in [0, {groups})")
    stored = zeros.to(torch.int64) - (1 if checkpoint_format == "gptq" else 0)
    return {
        "qweight": pack_rows(intweight.t(), bits),
        "qzeros": pack_rows(stored.t(), bits).t().contiguous(),
        "scales": scales.contiguous(),
        "g_idx": g_idx.to(torch.int32).contiguous(),
    }


def unpack_gptq(
    tensors: dict[str, torch.Tensor], bits: int = 4, *, checkpoint_format: str = "gptq"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(intweight [N, K], scales [G, N], zeros [G, N], g_idx [K])``; exact inverse of pack."""
    _check_bits(bits)
    if checkpoint_format not in _FORMATS:
        raise ValueError(f"checkpoint_format must be one of {_FORMATS}, got {checkpoint_format!r}")
    qweight, qzeros, scales = tensors["qweight"], tensors["qzeros"], tensors["scales"]
    intweight = _unpack_nk(qweight, bits).to(torch.int32)
    zeros = unpack_rows(qzeros.t(), bits).t()
    if checkpoint_format == "gptq":
        zeros = zeros + 1  # no mask after the +1: exactly what v1 readers compute
    g_idx = tensors.get("g_idx")
    if g_idx is None:
        k, groups = intweight.shape[1], scales.shape[0]
        g_idx = torch.arange(k, dtype=torch.int32, device=qweight.device) // (k // groups)
    return intweight, scales, zeros.contiguous(), g_idx.to(torch.int32)


def check_gptq_tensors(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor | None,
    group_size: int,
    *,
    bits: int = 4,
    x: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> tuple[int, int, int]:
    """Validate shapes/dtypes/devices of a GPTQ linear; return ``(N, K, G)``.

    Uses only metadata, so it runs unchanged on fake tensors and symbolic shapes.
    """
    per = _check_bits(bits)
    if qweight.dtype != torch.int32 or qzeros.dtype != torch.int32:
        raise TypeError(f"qweight and qzeros must be int32, got {qweight.dtype} and {qzeros.dtype}")
    if not scales.dtype.is_floating_point:
        raise TypeError(f"scales must be floating point, got {scales.dtype}")
    if qweight.dim() != 2 or qzeros.dim() != 2 or scales.dim() != 2:
        raise ValueError("qweight, qzeros and scales must be 2-D")
    k, n = qweight.shape[0] * per, qweight.shape[1]
    groups = scales.shape[0]
    if scales.shape[1] != n or qzeros.shape[0] != groups or qzeros.shape[1] * per != n:
        raise ValueError(
            f"inconsistent GPTQ shapes: qweight {tuple(qweight.shape)} (K={k}, N={n}), "
            f"qzeros {tuple(qzeros.shape)}, scales {tuple(scales.shape)}"
        )
    if group_size == -1:
        if groups != 1:
            raise ValueError(f"per-channel (group_size=-1) needs 1 group, scales has {groups}")
    elif group_size <= 0 or k % group_size:
        raise ValueError(f"K ({k}) must be a multiple of group_size ({group_size}), and of {per}")
    elif g_idx is None and groups != k // group_size:
        raise ValueError(f"K={k} with group_size={group_size} needs {k // group_size} groups, scales has {groups}")
    if g_idx is not None and (g_idx.dim() != 1 or g_idx.shape[0] != k or g_idx.dtype.is_floating_point
                              or g_idx.dtype == torch.bool):
        raise ValueError(f"g_idx must be an integer [K={k}] tensor, got {g_idx.dtype} {tuple(g_idx.shape)}")
    if x is not None:
        if x.shape[-1] != k:
            raise ValueError(f"x has {x.shape[-1]} input features, the weight has K={k}")
        if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise TypeError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
        for name, t in (("qweight", qweight), ("qzeros", qzeros), ("scales", scales), ("g_idx", g_idx), ("bias", bias)):
            if t is not None and t.device != x.device:
                raise ValueError(f"x is on {x.device} but {name} is on {t.device}")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != n):
        raise ValueError(f"bias must be [N={n}], got {tuple(bias.shape)}")
    return n, k, groups


def check_g_idx_range(g_idx: torch.Tensor, groups: int, name: str = "GPTQ weight") -> None:
    """``0 <= g_idx < groups``: a negative index would wrap around to another group's scale."""
    if g_idx.numel() and (int(g_idx.min()) < 0 or int(g_idx.max()) >= groups):
        raise ValueError(f"{name}: g_idx has values in {_range(g_idx)}; they must lie in [0, {groups}) "
                         f"(the {groups} groups of scales)")


def check_gptq_values(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor | None,
    group_size: int,
    *,
    bits: int = 4,
    name: str = "GPTQ weight",
) -> tuple[int, int, int]:
    """:func:`check_gptq_tensors` plus the checks that need the values; return ``(N, K, G)``.

    ``g_idx`` must name groups that exist (``0 <= g_idx < G``; a negative index would wrap
    around to another group's scale) and the scales must be finite. Every entry point that
    takes GPTQ tensors from outside runs this once (``w4a16_matmul``, loading, preparing a
    layer's fast path); errors name the layer (``name``) and the bad range.
    """
    n, k, groups = check_gptq_tensors(qweight, qzeros, scales, g_idx, group_size, bits=bits)
    if g_idx is not None:
        check_g_idx_range(g_idx, groups, name)
    if scales.numel() and not bool(torch.isfinite(scales).all()):
        bad = int((~torch.isfinite(scales)).sum())
        raise ValueError(f"{name}: scales has {bad} non-finite value(s) (NaN or Inf)")
    return n, k, groups


def dequantize_gptq(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor | None,
    group_size: int,
    bits: int = 4,
    *,
    checkpoint_format: str = "gptq",
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``W [N, K]`` in ``dtype`` (default: the scales' dtype), contiguous.

    ``(q - zero) * scale`` is formed in fp32 with one rounding (the product), then cast:
    the reference every kernel is compared against.
    """
    n, k, groups = check_gptq_values(qweight, qzeros, scales, g_idx, group_size, bits=bits)
    if checkpoint_format not in _FORMATS:
        raise ValueError(f"checkpoint_format must be one of {_FORMATS}, got {checkpoint_format!r}")
    zeros = unpack_rows(qzeros.t(), bits).t().float()  # [G, N]
    if checkpoint_format == "gptq":
        zeros += 1
    zeros_t, scales_t = zeros.t().contiguous(), scales.float().t().contiguous()  # [N, G]
    q = _unpack_nk(qweight, bits)  # W's own [N, K] orientation: no transpose of W
    gs = k // groups
    contiguous_groups = g_idx is None or torch.equal(g_idx, default_g_idx(k, gs, device=g_idx.device).to(g_idx.dtype))
    gi = None if contiguous_groups else g_idx.long()
    out = torch.empty((n, k), dtype=dtype or scales.dtype, device=qweight.device)
    # Rows in chunks of ~1M elements: fp32 temporaries stay in cache and are reused, and
    # the only big allocation is the output (fresh pages cost a fault per 4 KiB on CPU).
    rows = max(1, (1 << 20) // max(k, 1))
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        w = q[r0:r1].float()
        if gi is None:
            w.view(r1 - r0, groups, gs).sub_(zeros_t[r0:r1, :, None]).mul_(scales_t[r0:r1, :, None])
        else:
            w.sub_(zeros_t[r0:r1, gi]).mul_(scales_t[r0:r1, gi])
        out[r0:r1] = w
    return out


def concat_output_rows(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """One GPTQ weight whose output rows are ``parts`` stacked (e.g. fused q/k/v, gate/up).

    Every part must share K, the group assignment ``g_idx`` and the scale dtype; N of each
    part is a multiple of 8, so packed ``qzeros`` words never straddle two parts.
    """
    if not parts:
        raise ValueError("concat_output_rows needs at least one part")
    first = parts[0]
    for p in parts[1:]:
        if p["qweight"].shape[0] != first["qweight"].shape[0] or p["scales"].dtype != first["scales"].dtype:
            raise ValueError("parts differ in K or in scale dtype")
        if not torch.equal(p["g_idx"], first["g_idx"]):
            raise ValueError("parts have different g_idx (group assignments); cannot share one GEMM")
    return {
        "qweight": torch.cat([p["qweight"] for p in parts], dim=1),
        "qzeros": torch.cat([p["qzeros"] for p in parts], dim=1),
        "scales": torch.cat([p["scales"] for p in parts], dim=1),
        "g_idx": first["g_idx"].clone(),
    }


def unpack_zeros_wordwise(qzeros: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """GPTQModel's reading of v1 ``qzeros``: ``+ 0x11111111`` on each whole 32-bit word, then
    unpack (``[G, N]``). It writes v1 by subtracting the same constant from the packed v2
    word, so a zero of 0 borrows from the next field; reading it back word-wise undoes that.
    It agrees with the per-field ``+ 1`` of AutoGPTQ and vLLM unless a field holds 15."""
    if bits != 4:
        raise ValueError("word-wise zero decoding is defined for 4-bit GPTQ")
    words = (qzeros.to(torch.int64) & 0xFFFFFFFF) + 0x11111111
    return unpack_rows(_to_int32_bits(words & 0xFFFFFFFF).t(), bits).t().contiguous()


def mirror_zero_point_zero(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor,
                           bits: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(q, scales, zeros)`` with every zero point 0 re-expressed exactly for GPTQ v1, which
    cannot store 0 (it stores ``zero - 1``): ``(q - 0) s == ((maxq - q) - maxq) (-s)``, so those
    groups' integers are mirrored, their scale negated and their zero set to ``maxq``.
    ``q [N, K]``, ``scales`` / ``zeros`` ``[G, N]``; other groups are returned unchanged."""
    hit = zeros == 0  # [G, N]
    if not bool(hit.any()):
        return q, scales, zeros
    maxq = (1 << bits) - 1
    columns = hit[g_idx.long()].t()  # [N, K]: does (n, k)'s group have zero 0?
    return (torch.where(columns, maxq - q, q), torch.where(hit, -scales, scales),
            torch.where(hit, torch.full_like(zeros, maxq), zeros))

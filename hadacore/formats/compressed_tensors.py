"""The compressed-tensors ``pack-quantized`` layout (what vLLM reads) and its GPTQ equivalent.

Per quantized linear ``W [N, K]`` with ``G = K / group_size`` contiguous groups
(compressed-tensors 0.20, ``compressors/pack_quantized``; checked against the package's own
decompression in tests/test_compressed_tensors.py):

- ``weight_packed`` int32 ``[N, K/8]``: packed along K, value ``k`` of a row in word ``k // 8``
  at bits ``4 (k % 8) .. 4 (k % 8) + 3``, stored as the unsigned nibble ``u = q + 8``;
- ``weight_scale`` ``[N, G]`` (transposed relative to GPTQ's ``scales [G, N]``);
- ``weight_zero_point`` int32 ``[N/8, G]`` (asymmetric only): packed along N, stored ``zp + 8``;
  symmetric checkpoints carry none (zero point 8 in unsigned terms);
- ``weight_shape`` int64 ``[2]`` = ``[N, K]``.

``W[n, k] = (u[n, k] - uz[n, g]) * s[n, g]`` with ``g = k // group_size``: the same numbers as
GPTQ's ``(q - zero) * scale``, with CT's unsigned zero ``uz`` equal to the GPTQ zero (CT stores
the zero itself; GPTQ v1 stores ``zero - 1``). Groups are contiguous in the stored column
order: compressed-tensors >= 0.19 and current vLLM have no ``g_idx`` (``actorder: "weight"``
is metadata only), so a weight with act-order groups cannot be written in this format.
"""

from __future__ import annotations

import torch

from hadacore.formats.gptq import default_g_idx, mirror_zero_point_zero, pack_gptq, pack_rows, unpack_gptq, unpack_rows

__all__ = ["gptq_to_compressed_tensors", "compressed_tensors_to_gptq", "TENSOR_SUFFIXES"]

#: The per-layer tensors of a ``pack-quantized`` linear.
TENSOR_SUFFIXES = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape")


def gptq_to_compressed_tensors(tensors: dict[str, torch.Tensor], group_size: int, *, symmetric: bool,
                               name: str = "layer") -> dict[str, torch.Tensor]:
    """GPTQ v1 4-bit tensors (contiguous groups) -> compressed-tensors ``pack-quantized`` tensors."""
    q, scales, zeros, g_idx = unpack_gptq(tensors, 4)  # q [N, K], scales/zeros [G, N], v1 zeros read as 1..16
    n, k = q.shape
    gs = k if group_size == -1 else group_size
    if not torch.equal(g_idx.long(), default_g_idx(k, gs, device=g_idx.device).long()):
        raise ValueError(f"{name}: its groups are not contiguous runs of {gs} columns (act-order with g_idx): "
                         "compressed-tensors has no g_idx; convert with static groups")
    if symmetric and not bool((zeros == 8).all()):
        raise ValueError(f"{name}: symmetric compressed-tensors needs every zero point to be 8")
    if not symmetric and bool((zeros > 15).any()):
        raise ValueError(f"{name}: a zero point of 16 (GPTQ v1 can store it) does not fit compressed-tensors' 4 bits")
    out = {
        "weight_packed": tensors["qweight"].t().contiguous(),  # the same nibbles, packed along K: [N, K/8]
        "weight_scale": scales.t().contiguous(),
        "weight_shape": torch.tensor([n, k], dtype=torch.int64),
    }
    if not symmetric:
        out["weight_zero_point"] = pack_rows(zeros.t().contiguous(), 4)  # [N/8, G], packed along N
    return out


def compressed_tensors_to_gptq(tensors: dict[str, torch.Tensor], group_size: int, *, symmetric: bool,
                               name: str = "layer") -> dict[str, torch.Tensor]:
    """compressed-tensors ``pack-quantized`` 4-bit tensors -> GPTQ v1 tensors (the same numbers;
    a zero point of 0, which v1 cannot store, is re-expressed exactly by mirroring the group)."""
    packed, scale = tensors["weight_packed"], tensors["weight_scale"]
    n, k = (int(v) for v in tensors["weight_shape"].tolist()) if "weight_shape" in tensors else (
        packed.shape[0], packed.shape[1] * 8)
    if packed.dtype != torch.int32 or tuple(packed.shape) != (n, k // 8):
        raise ValueError(f"{name}: weight_packed must be int32 [N={n}, K/8={k // 8}], got {packed.dtype} "
                         f"{tuple(packed.shape)}")
    groups = scale.shape[1]
    gs = k if group_size == -1 else group_size
    if tuple(scale.shape) != (n, k // gs):
        raise ValueError(f"{name}: weight_scale must be [N={n}, G={k // gs}], got {tuple(scale.shape)}")
    if symmetric:
        zeros = torch.full((groups, n), 8, dtype=torch.int32)
    else:
        zp = tensors.get("weight_zero_point")
        if zp is None or zp.dtype != torch.int32 or tuple(zp.shape) != (n // 8, groups):
            raise ValueError(f"{name}: an asymmetric layer needs weight_zero_point int32 [N/8={n // 8}, G={groups}]")
        zeros = unpack_rows(zp, 4).t().contiguous()  # [G, N]
    q = unpack_rows(packed.t().contiguous(), 4).t()  # [N, K] nibbles
    g_idx = default_g_idx(k, gs)
    return pack_gptq(*mirror_zero_point_zero(q, scale.t().contiguous(), zeros, g_idx), g_idx, 4)

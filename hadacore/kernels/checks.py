"""Argument checks shared by the ops (:mod:`hadacore.ops`, fake impls included) and the kernels.

Metadata checks (shapes, dtypes, devices) run unchanged on fake tensors and symbolic
shapes; value checks (:func:`check_perm_values`) run only where the values are real.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from hadacore.hadamard import check_hadamard_size, hadamard_factors

__all__ = [
    "FLOAT_DTYPES", "INT4PACK_GROUP_SIZES", "CPU_COMPUTE_DTYPE",
    "check_hadamard_args", "check_perm_values", "check_attention_args", "check_prepared_args",
]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_ATTENTION_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: What torch's CPU int4 kernel accepts as a group size.
INT4PACK_GROUP_SIZES = (256, 128, 64, 32)
#: The prepared CPU W4A16 paths compute in bf16 (16-bit activations: the W4A16 contract).
CPU_COMPUTE_DTYPE = torch.bfloat16


def check_hadamard_args(x: Tensor, signs: Optional[Tensor], perm: Optional[Tensor]) -> int:
    """Validate a Hadamard call (metadata only, so fake tensors pass through); return n."""
    if x.dtype not in FLOAT_DTYPES:
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


def check_attention_args(
    q: Tensor, k: Tensor, v: Tensor, rotate: bool, attn_mask: Optional[Tensor] = None, is_causal: bool = False
) -> int:
    """Validate shapes/dtypes (metadata only: fake and symbolic tensors pass); return the GQA group.

    ``q [B, Hq, S, D]``, ``k``/``v`` ``[B, Hkv, S_kv, D]``; fp16/bf16/fp32, all one dtype
    and device; ``Hq % Hkv == 0``; with ``rotate`` D must be a Hadamard size; ``attn_mask``
    bool or q's float dtype, at most 4-D, same device, not together with ``is_causal``.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"fp8_attention: {name} must be [B, H, S, D], got shape {tuple(t.shape)}")
        if t.dtype not in _ATTENTION_DTYPES:
            raise TypeError(f"fp8_attention: {name} must be float16, bfloat16 or float32, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"fp8_attention: q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"fp8_attention: q, k, v on different devices: {q.device}, {k.device}, {v.device}")
    if k.shape != v.shape:
        raise ValueError(f"fp8_attention: k and v shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}")
    hq, hkv, d = int(q.shape[1]), int(k.shape[1]), int(q.shape[3])
    if int(k.shape[3]) != d:
        raise ValueError(f"fp8_attention: q head_dim {d} != k head_dim {int(k.shape[3])}")
    if hkv == 0 or hq % hkv:
        raise ValueError(f"fp8_attention: query heads ({hq}) must be a multiple of KV heads ({hkv})")
    torch._check(q.shape[0] == k.shape[0], lambda: f"fp8_attention: batch of q {q.shape[0]} != batch of k {k.shape[0]}")
    if rotate:
        check_hadamard_size(d, what="fp8_attention: head_dim for the R3 rotation")
    if attn_mask is not None:
        if is_causal:
            raise ValueError("fp8_attention: pass either attn_mask or is_causal, not both (as SDPA)")
        if attn_mask.dtype not in (torch.bool, q.dtype) or attn_mask.dim() > 4 or attn_mask.device != q.device:
            raise ValueError(
                f"fp8_attention: attn_mask must be bool or {q.dtype}, at most 4-D, on {q.device} "
                f"(broadcastable to [B, Hq, S, S_kv]); got {attn_mask.dtype} {tuple(attn_mask.shape)} on {attn_mask.device}"
            )
    return hq // hkv


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
        if scales_and_zeros.dtype != CPU_COMPUTE_DTYPE or tuple(scales_and_zeros.shape) != want:
            raise ValueError(f"scales_and_zeros must be bfloat16 {want}, got {scales_and_zeros.dtype} {tuple(scales_and_zeros.shape)}")
    if weight is not None and (weight.dtype != CPU_COMPUTE_DTYPE or tuple(weight.shape) != (out_features, k)):
        raise ValueError(f"weight must be bfloat16 [N={out_features}, K={k}], got {weight.dtype} {tuple(weight.shape)}")
    if perm is not None and (perm.dim() != 1 or perm.shape[0] != k or perm.dtype.is_floating_point):
        raise ValueError(f"perm must be an integer [K={k}] tensor, got {perm.dtype} {tuple(perm.shape)}")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != out_features or not bias.dtype.is_floating_point):
        raise ValueError(f"bias must be a floating-point [N={out_features}] tensor, got {bias.dtype} {tuple(bias.shape)}")
    for name, t in (("packed", packed), ("scales_and_zeros", scales_and_zeros), ("weight", weight), ("perm", perm), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"x is on {x.device} but {name} is on {t.device}")
    return k

"""Permuting, concatenating and sharding GPTQ tensors without touching their values.

The act-order algebra (DESIGN.md): GPTQ with act-order quantizes W's input columns in a
permuted order, so its ``g_idx`` is not sorted. With ``perm = act_order_perm(g_idx)``,
``W' = W[:, perm]`` has every group contiguous and ``x[..., perm] @ W'.T == x @ W.T``.
For an MLP the gather on x folds into the producers: ``silu(x Wg[perm].T) * (x Wu[perm].T)``
is ``h[..., perm]`` exactly, so permuting gate/up's output rows removes it.

Every function unpacks to integers and repacks: results are bit-exact rearrangements.
"""

from __future__ import annotations

import torch

from hadacore.quant.format import pack_gptq, unpack_gptq

__all__ = [
    "act_order_perm",
    "is_sorted_by_group",
    "permute_input_columns",
    "permute_output_rows",
    "concat_output_rows",
    "shard_gptq",
]

Tensors = dict[str, torch.Tensor]


def act_order_perm(g_idx: torch.Tensor) -> torch.Tensor:
    """Input columns sorted by group (stable, so columns keep their order inside a group)."""
    return torch.argsort(g_idx.to(torch.int64), stable=True)


def is_sorted_by_group(g_idx: torch.Tensor) -> bool:
    return g_idx.numel() < 2 or bool((g_idx[1:] >= g_idx[:-1]).all())


def _check_perm(perm: torch.Tensor, size: int, what: str) -> torch.Tensor:
    perm = perm.to(torch.int64)
    if perm.shape != (size,) or not torch.equal(torch.sort(perm).values, torch.arange(size, device=perm.device)):
        raise ValueError(f"{what} must be a permutation of range({size}), got shape {tuple(perm.shape)}")
    return perm


def permute_input_columns(tensors: Tensors, perm: torch.Tensor, bits: int = 4) -> Tensors:
    """GPTQ tensors of ``W'[:, j] = W[:, perm[j]]`` (``g_idx' = g_idx[perm]``)."""
    q, scales, zeros, g_idx = unpack_gptq(tensors, bits)
    perm = _check_perm(perm, q.shape[1], "perm")
    return pack_gptq(q[:, perm], scales, zeros, g_idx[perm], bits)


def permute_output_rows(tensors: Tensors, perm: torch.Tensor, bits: int = 4) -> Tensors:
    """GPTQ tensors of ``W'[i, :] = W[perm[i], :]``. A bias is the caller's: ``bias[perm]``."""
    q, scales, zeros, g_idx = unpack_gptq(tensors, bits)
    perm = _check_perm(perm, q.shape[0], "perm")
    return pack_gptq(q[perm], scales[:, perm], zeros[:, perm], g_idx, bits)


def concat_output_rows(parts: list[Tensors]) -> Tensors:
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


def shard_gptq(tensors: Tensors, *, dim: str, rank: int, world_size: int, bits: int = 4) -> Tensors:
    """This rank's shard of a GPTQ weight.

    ``dim="out"`` (column-parallel) splits N. ``dim="in"`` (row-parallel) splits K: the shard
    keeps the groups its columns reference, ``[min, max]`` of its ``g_idx``, re-based to 0.
    With sorted group-aligned ``g_idx`` that is exactly its own groups; with a global
    act-order ``g_idx`` it may be most of them (scales replicated, as vLLM does).
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world of size {world_size}")
    per = 32 // bits
    qweight, qzeros, scales = tensors["qweight"], tensors["qzeros"], tensors["scales"]
    k, n = qweight.shape[0] * per, qweight.shape[1]
    g_idx = tensors.get("g_idx")
    if g_idx is None:
        g_idx = unpack_gptq(tensors, bits)[3]
    if dim == "out":
        if n % (world_size * per):
            raise ValueError(f"N={n} does not split into {world_size} shards of a multiple of {per}")
        s = n // world_size
        lo, hi = rank * s, (rank + 1) * s
        return {
            "qweight": qweight[:, lo:hi].contiguous(),
            "qzeros": qzeros[:, lo // per : hi // per].contiguous(),
            "scales": scales[:, lo:hi].contiguous(),
            "g_idx": g_idx.clone(),
        }
    if dim == "in":
        if k % (world_size * per):
            raise ValueError(f"K={k} does not split into {world_size} shards of a multiple of {per}")
        s = k // world_size
        lo, hi = rank * s, (rank + 1) * s
        gi = g_idx[lo:hi].to(torch.int64)
        g0, g1 = int(gi.min()), int(gi.max()) + 1
        return {
            "qweight": qweight[lo // per : hi // per].contiguous(),
            "qzeros": qzeros[g0:g1].contiguous(),
            "scales": scales[g0:g1].contiguous(),
            "g_idx": (gi - g0).to(torch.int32),
        }
    raise ValueError(f"dim must be 'in' or 'out', got {dim!r}")

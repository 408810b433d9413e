"""Act-order: the one place that sorts GPTQ columns by group and folds the permutation away.

GPTQ with act-order (``desc_act``) quantizes W's input columns in a permuted order, so its
``g_idx`` is not sorted. With ``perm = act_order_perm(g_idx)``, ``W' = W[:, perm]`` has every
group contiguous and ``x[..., perm] @ W'.T == x @ W.T``: a kernel with contiguous groups
can run it once the activation arrives gathered. For an MLP the gather folds into the
producers: ``silu(x Wg[perm].T) * (x Wu[perm].T)`` is ``h[..., perm]`` exactly (SiLU and the
product act elementwise), so permuting gate/up's output rows removes it
(:func:`fold_into_gate_up`), at every TP degree (TP-aware dequantization).

Users: the converter (down_proj without R4), the compiler's ``fold_act_order`` pass, the
TP shard planner (:mod:`hadacore.distributed.plan`) and the prepared fast paths of
:class:`~hadacore.quant.linear.QuantLinear`. Every function unpacks to integers and
repacks: results are bit-exact rearrangements.
"""

from __future__ import annotations

import torch

from hadacore.formats.gptq import pack_gptq, unpack_gptq

__all__ = [
    "act_order_perm",
    "is_sorted_by_group",
    "sort_by_group",
    "permute_input_columns",
    "permute_output_rows",
    "fold_into_gate_up",
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


def sort_by_group(tensors: Tensors, bits: int = 4) -> tuple[Tensors, torch.Tensor | None]:
    """``(W' = W[:, perm], perm)`` with every group contiguous; ``(tensors, None)`` when they
    already are. The caller multiplies ``x[..., perm]`` by ``W'``."""
    g_idx = tensors.get("g_idx")
    if g_idx is None or is_sorted_by_group(g_idx):
        return tensors, None
    perm = act_order_perm(g_idx)
    return permute_input_columns(tensors, perm, bits), perm


def fold_into_gate_up(gate: Tensors, up: Tensors, down: Tensors, bits: int = 4) -> tuple[Tensors, Tensors, Tensors]:
    """The TP-aware permutation of one MLP: down_proj's columns sorted by group, gate/up's
    output rows (and a ``"bias"`` entry) permuted the same way, so
    ``down'(silu(gate'(x)) * up'(x)) == down(silu(gate(x)) * up(x))`` exactly and no gather is
    left. Contiguous shards of gate'/up' line up with contiguous K-shards of down'. Only
    valid without an online rotation between the two (R4 mixes the permuted features)."""
    new_down, perm = sort_by_group(down, bits)
    if perm is None:
        return gate, up, down

    def rows(t: Tensors) -> Tensors:
        out = permute_output_rows(t, perm, bits)
        if t.get("bias") is not None:
            out["bias"] = t["bias"][perm]
        return out

    if down.get("bias") is not None:
        new_down["bias"] = down["bias"]
    return rows(gate), rows(up), new_down

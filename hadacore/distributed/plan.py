"""Act-order planning for a tensor-parallel MLP: which rows/columns each rank holds.

GPTQ act-order stores down_proj with an unsorted ``g_idx``; a fast W4A16 kernel wants its
groups contiguous, i.e. the columns sorted by group: ``P = act_order_perm(g_idx)`` and
``W'[:, j] = W[:, P[j]]``, which then needs the activation ``h[:, P]``. Two strategies:

``naive`` (what an engine does without planning): rank r holds the K-shard
``P[r*Kl:(r+1)*Kl]`` of the sorted weight, and at run time all-gathers the column-parallel
activation from every rank to pick those columns: one all-gather per MLP.

``tp_aware`` (DESIGN.md, the TP-aware dequantization paper): gate/up's output rows are
permuted by the same ``P``, so rank r's gate/up shard already *produces* ``h[:, P_r]`` and
lines up with its down shard: no collective but the row-parallel all-reduce. With an
online R4 Hadamard between the two layers the permutation acts on the rotated activation,
so it must stay inside each shard: every act-order group of down_proj must lie in one
shard (the converter quantizes block-locally for tp > 1), and the shard-local order is
fused into the Hadamard's store.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hadacore.quant.act_order import act_order_perm, is_sorted_by_group

__all__ = ["STRATEGIES", "MLPShardPlan", "plan_mlp_shard"]

STRATEGIES = ("naive", "tp_aware")


@dataclass(frozen=True)
class MLPShardPlan:
    """One rank's view of an MLP. Indices refer to the stored (checkpoint) tensors."""

    gate_up_rows: torch.Tensor  # output rows of gate/up this rank computes, in order
    down_cols: torch.Tensor  # input columns of down_proj this rank holds, in order
    hadamard_block: int | None  # shard-local online Hadamard (R4) block, or None
    local_perm: torch.Tensor | None  # permutation inside the shard (fused into the Hadamard store)
    gather_index: torch.Tensor | None  # naive: columns taken from the all-gathered activation

    @property
    def all_gathers(self) -> bool:
        return self.gather_index is not None


def _check_strategy(strategy: str) -> None:
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")


def plan_mlp_shard(
    down_g_idx: torch.Tensor,
    *,
    tp_rank: int,
    tp_size: int,
    strategy: str = "tp_aware",
    hadamard_block: int | None = None,
    group_size: int | None = None,
) -> MLPShardPlan:
    """Rank ``tp_rank``'s rows of gate/up and columns of down_proj (see the module docstring).

    ``down_g_idx`` is down_proj's stored ``g_idx`` [I]; ``hadamard_block`` the block of the
    online R4 Hadamard the weight was rotated with (None without R4).
    """
    _check_strategy(strategy)
    g_idx = down_g_idx.to(torch.int64).cpu()
    inter = g_idx.numel()
    if not 0 <= tp_rank < tp_size:
        raise ValueError(f"tp_rank {tp_rank} outside tp_size {tp_size}")
    if inter % tp_size:
        raise ValueError(f"intermediate_size {inter} is not divisible by tp_size {tp_size}")
    local = inter // tp_size
    lo, hi = tp_rank * local, (tp_rank + 1) * local
    if group_size is not None and group_size != -1 and local % group_size:
        raise ValueError(f"the down_proj shard width {local} (= {inter} / tp {tp_size}) is not a multiple of group_size {group_size}")
    if hadamard_block is not None and local % hadamard_block:
        raise ValueError(
            f"down_proj was rotated with a shard-local Hadamard of block {hadamard_block}, which does not divide "
            f"the shard width {local} at tp_size {tp_size}: load with a tp_size whose shard holds whole blocks"
        )
    contiguous = torch.arange(lo, hi)
    if is_sorted_by_group(g_idx):  # no act-order, or already planned offline: nothing to move
        return MLPShardPlan(contiguous, contiguous, hadamard_block, None, None)
    perm = act_order_perm(g_idx)
    mine = perm[lo:hi]
    if strategy == "naive":
        # The gathered activation is the (rotated) h in rank order; P indexes its columns.
        return MLPShardPlan(contiguous, mine, hadamard_block, None, mine)
    if hadamard_block is None:
        return MLPShardPlan(mine, mine, None, None, None)
    shard_groups = g_idx[lo:hi]
    outside = torch.cat([g_idx[:lo], g_idx[hi:]])
    if bool(torch.isin(shard_groups, outside).any()):
        raise ValueError(
            "down_proj's act-order groups cross tp shards, but the online R4 Hadamard before it is shard-local, "
            "so its permutation must be too: convert with --tp set to this tp_size (block-local act-order), "
            "or load with strategy='naive'"
        )
    local_perm = act_order_perm(shard_groups)
    return MLPShardPlan(contiguous, lo + local_perm, hadamard_block, local_perm, None)

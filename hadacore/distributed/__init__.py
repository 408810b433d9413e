"""Tensor parallelism on ``torch.distributed`` for GPTQ (W4A16) models, with TP-aware act-order.

- :func:`load_sharded`: one rank's share of a converted checkpoint (reads only its slices).
- :class:`ColumnParallelQuantLinear`, :class:`RowParallelQuantLinear`: the layers.
- :func:`plan_tp_aware_mlp`: the offline TP-aware permutation of an MLP's GPTQ tensors;
  :func:`plan_mlp_shard`: which rows/columns a rank holds under ``"naive"`` / ``"tp_aware"``.
"""

from hadacore.distributed.layers import ColumnParallelQuantLinear, RowParallelQuantLinear
from hadacore.distributed.model import ShardLoadError, agree_on_success, build_parallel_mlp, load_sharded
from hadacore.distributed.plan import STRATEGIES, MLPShardPlan, plan_mlp_shard, plan_tp_aware_mlp

__all__ = [
    "STRATEGIES",
    "ColumnParallelQuantLinear",
    "MLPShardPlan",
    "RowParallelQuantLinear",
    "ShardLoadError",
    "agree_on_success",
    "build_parallel_mlp",
    "load_sharded",
    "plan_mlp_shard",
    "plan_tp_aware_mlp",
]

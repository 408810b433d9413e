"""Tensor parallelism on ``torch.distributed`` for GPTQ (W4A16) models, with TP-aware act-order.

- :class:`ColumnParallelQuantLinear`, :class:`RowParallelQuantLinear`: the layers.
- :func:`plan_mlp_shard`: which rows/columns a rank holds under ``"naive"`` / ``"tp_aware"``.
- :func:`agree_on_success`: ranks fail together instead of hanging.

Loading one rank's share of a checkpoint is ``hadacore.load(path, tp_rank=r, tp_size=n)``.
"""

from hadacore.distributed.group import ShardLoadError, agree_on_success
from hadacore.distributed.layers import ColumnParallelQuantLinear, RowParallelQuantLinear
from hadacore.distributed.plan import STRATEGIES, MLPShardPlan, plan_mlp_shard

__all__ = [
    "STRATEGIES",
    "ColumnParallelQuantLinear",
    "MLPShardPlan",
    "RowParallelQuantLinear",
    "ShardLoadError",
    "agree_on_success",
    "plan_mlp_shard",
]

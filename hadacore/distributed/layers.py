"""Tensor-parallel quantized linears over a ``torch.distributed`` process group.

Megatron's split: a column-parallel layer owns a slice of the output features and needs
no communication; a row-parallel layer owns a slice of the input features and sums the
ranks' partial outputs with one all-reduce. The collectives are the functional ones
(``torch.distributed._functional_collectives``) so a rank's forward stays one
``torch.compile`` graph (Dynamo traces them; Inductor lowers them to ``_c10d_functional``).

A row-parallel layer may transform its input shard first, in this order:

1. ``hadamard_block``: a shard-local online Hadamard (R4 with ``I_tp (x) H_b``), applied to
   each length-``b`` block of the shard by :func:`hadacore.ops.block_hadamard_transform`;
   a shard-local permutation is fused into the Hadamard's store through the op's ``perm``
   argument when the shard is one block;
2. ``local_perm``: otherwise, a gather inside the shard (no communication);
3. ``gather_index``: the naive act-order path: all-gather the full activation from every
   rank and take the columns this rank's (globally group-sorted) weight shard expects.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn

from hadacore.ops import block_hadamard_transform

__all__ = ["ColumnParallelQuantLinear", "RowParallelQuantLinear"]

# torch >= 2.10 names it all_gather_single (all_gather_tensor is deprecated there).
_all_gather = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor


class ColumnParallelQuantLinear(nn.Module):
    """This rank's output-feature shard of a quantized linear: ``y_r = x @ W[rows_r].T + b[rows_r]``.

    No communication: the output stays sharded along its last dim. ``local`` is the shard's
    linear: a :class:`QuantLinear` (or any module with ``in_features``/``out_features``
    computing ``x @ W_shard.T``, e.g. a prepared CPU W4A16 weight in the benchmarks).
    """

    def __init__(self, local: nn.Module, *, tp_rank: int, tp_size: int, group: dist.ProcessGroup | None = None):
        super().__init__()
        if getattr(local, "online_hadamard", False):
            raise ValueError("a column-parallel layer cannot apply an online Hadamard to its (replicated) input")
        self.linear = local
        self.tp_rank, self.tp_size, self.group = tp_rank, tp_size, group

    @property
    def in_features(self) -> int:
        return self.linear.in_features

    @property
    def out_features(self) -> int:  # local
        return self.linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)

    def extra_repr(self) -> str:
        return f"tp_rank={self.tp_rank}, tp_size={self.tp_size}"


class RowParallelQuantLinear(nn.Module):
    """This rank's input-feature shard of a quantized linear, summed over ranks by one all-reduce.

    ``local`` holds ``W[:, cols_r]`` (without bias); ``bias`` is the full bias, added once
    after the reduction. See the module docstring for the optional input transforms.
    """

    def __init__(
        self,
        local: nn.Module,
        *,
        tp_rank: int,
        tp_size: int,
        group: dist.ProcessGroup | None = None,
        bias: torch.Tensor | None = None,
        hadamard_block: int | None = None,
        local_perm: torch.Tensor | None = None,
        gather_index: torch.Tensor | None = None,
    ):
        super().__init__()
        if getattr(local, "online_hadamard", False):
            raise ValueError("pass hadamard_block instead of a QuantLinear with online_hadamard (it must be shard-local)")
        if getattr(local, "bias", None) is not None:
            raise ValueError("the local shard must have no bias; pass the full bias as bias= (added after the all-reduce)")
        if local_perm is not None and gather_index is not None:
            raise ValueError("local_perm and gather_index are alternatives: the gathered index already orders the columns")
        self.linear = local
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.group = group if group is not None else (dist.group.WORLD if tp_size > 1 else None)
        self.hadamard_block = hadamard_block
        self.register_buffer("bias", bias)
        self.register_buffer("local_perm", None if local_perm is None else local_perm.to(torch.int64))
        self.register_buffer("gather_index", None if gather_index is None else gather_index.to(torch.int64))
        if gather_index is not None and gather_index.shape[0] != local.in_features:
            raise ValueError(f"gather_index has {gather_index.shape[0]} entries, the shard has K={local.in_features}")

    @property
    def in_features(self) -> int:  # local, as seen by the producer (before any gather)
        return self.linear.in_features

    @property
    def out_features(self) -> int:
        return self.linear.out_features

    def _transform_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.hadamard_block is not None:
            x = block_hadamard_transform(x, self.hadamard_block, perm=self.local_perm)
        elif self.local_perm is not None:
            x = x.index_select(-1, self.local_perm)
        if self.gather_index is not None:
            lead, k = x.shape[:-1], x.shape[-1]
            # Gather the transposed activation along dim 0: rows of ``full`` are then the
            # global columns in rank order, and one index_select picks this rank's.
            full = x.reshape(-1, k).t().contiguous()
            if self.tp_size > 1:
                full = _all_gather(full, 0, self.group)
            x = full.index_select(0, self.gather_index).t().reshape(*lead, self.gather_index.shape[0])
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(self._transform_input(x))
        if self.tp_size > 1:
            y = funcol.all_reduce(y, "sum", self.group)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y

    def extra_repr(self) -> str:
        return (
            f"tp_rank={self.tp_rank}, tp_size={self.tp_size}, hadamard_block={self.hadamard_block}, "
            f"local_perm={self.local_perm is not None}, all_gather={self.gather_index is not None}"
        )

"""Modules the converter puts into models: the float half-way state of R4.

The quantized layer with an online R4 is :class:`hadacore.quant.linear.QuantLinear` with
``online_hadamard=True`` (and ``hadamard_block=K/tp`` for a checkpoint planned for
``tp > 1``, whose down_proj input is rotated block-diagonally, ``I_tp (x) H_{K/tp}``, so
each row-parallel shard transforms only its own slice). Both use
:func:`hadacore.ops.block_hadamard_transform`.
"""

from __future__ import annotations

import torch
from torch import nn

from hadacore.ops import block_hadamard_transform

__all__ = ["OnlineHadamardLinear"]


class OnlineHadamardLinear(nn.Module):
    """A float linear whose input is rotated first: ``linear(block_hadamard_transform(x, block))``.

    The fp model between R4's offline and online halves (``W <- W R4`` is already done),
    used for calibration and for checking that the rotation is exact.
    """

    def __init__(self, linear: nn.Linear, block: int):
        super().__init__()
        self.linear = linear
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(block_hadamard_transform(x, self.block))

    def extra_repr(self) -> str:
        return f"hadamard_block={self.block}"

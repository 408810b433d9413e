"""Modules the converter puts into models: the online half of R4.

The single-block case is :class:`hadacore.quant.linear.QuantLinear` with
``online_hadamard=True`` (the pattern the compiler fuses). A checkpoint planned for
``tp > 1`` rotates down_proj's input block-diagonally, ``I_tp (x) H_{K/tp}``, so each
row-parallel shard transforms only its own slice; :class:`BlockHadamardQuantLinear` is
that layer unsharded (one rank, or a reference for the sharded one).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

import hadacore.ops  # noqa: F401  (registers torch.ops.hadacore.hadamard)
from hadacore.quant.linear import QuantLinear

__all__ = ["block_hadamard", "OnlineHadamardLinear", "BlockHadamardQuantLinear"]


def block_hadamard(x: torch.Tensor, block: int) -> torch.Tensor:
    """``x @ (I_{K/block} (x) H_block) / sqrt(block)`` along the last dim (K = x.shape[-1])."""
    k = x.shape[-1]
    if k % block:
        raise ValueError(f"Hadamard block {block} does not divide the input size {k}")
    scale = 1.0 / math.sqrt(block)
    if block == k:
        return torch.ops.hadacore.hadamard(x, scale)
    return torch.ops.hadacore.hadamard(x.unflatten(-1, (k // block, block)), scale).flatten(-2)


class OnlineHadamardLinear(nn.Module):
    """A float linear whose input is rotated first: ``linear(block_hadamard(x))``.

    The fp model between R4's offline and online halves (``W <- W R4`` is already done),
    used for calibration and for checking that the rotation is exact.
    """

    def __init__(self, linear: nn.Linear, block: int):
        super().__init__()
        self.linear = linear
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(block_hadamard(x, self.block))

    def extra_repr(self) -> str:
        return f"hadamard_block={self.block}"


class BlockHadamardQuantLinear(QuantLinear):
    """``QuantLinear`` whose online Hadamard is block-diagonal with blocks of ``hadamard_block``."""

    hadamard_block: int

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = block_hadamard(x, self.hadamard_block)
        w = self.dequantized_weight()
        return F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, hadamard_block={self.hadamard_block}"

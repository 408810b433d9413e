"""Native (non-Triton) W4A16 GEMM: the CPU implementation of ``hadacore::w4a16_gemm``."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from hadacore.quant.format import dequantize_gptq


def w4a16_gemm_native(
    x: Tensor, qweight: Tensor, qzeros: Tensor, scales: Tensor, g_idx: Optional[Tensor], bias: Optional[Tensor], group_size: int
) -> Tensor:
    w = dequantize_gptq(qweight, qzeros, scales, g_idx, group_size, dtype=torch.float32)
    y = torch.nn.functional.linear(x.float(), w, None if bias is None else bias.float())
    return y.to(x.dtype)

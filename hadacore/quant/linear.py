"""``QuantLinear``: a GPTQ-format linear layer written in plain, unfused ops.

Its forward is ``[hadamard ->] gptq_dequantize -> linear``: eager mode is the numerical
reference, and the compiler's passes recognise exactly this pattern and fuse it into
``hadacore::w4a16_gemm`` (plus a Hadamard kernel when ``online_hadamard`` is set).
Buffer names are those of GPTQ checkpoints, so state dicts load unchanged.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

import hadacore.ops  # noqa: F401  (registers torch.ops.hadacore.*)
from hadacore.ops import block_hadamard_transform
from hadacore.quant.format import check_gptq_values, default_g_idx
from hadacore.quant.rtn import rtn_gptq_tensors

if TYPE_CHECKING:
    from hadacore.lowering.w4a16 import PreparedW4A16

__all__ = ["QuantLinear"]


class QuantLinear(nn.Module):
    """``y = [H(x) ->] x @ dequant(W).T + bias`` with W stored as GPTQ v1 tensors.

    ``online_hadamard``: apply ``hadamard_transform(x, 1/sqrt(K))`` to the input first
    (R4 in QuaRot's naming; the stored weight was rotated by the same matrix offline).
    ``hadamard_block``: make that rotation block-diagonal, ``I_{K/b} (x) H_b / sqrt(b)``
    (:func:`hadacore.ops.block_hadamard_transform`), as in a checkpoint planned for
    tensor parallelism where each row-parallel shard rotates only its own slice.
    ``None`` (or ``K``) is the whole-K rotation, written as the single op the compiler fuses.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bits: int = 4,
        group_size: int = 128,
        bias: bool = False,
        dtype: torch.dtype = torch.float16,
        online_hadamard: bool = False,
        hadamard_block: int | None = None,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        _check_hadamard_block(in_features, online_hadamard, hadamard_block)
        per = 32 // bits
        if in_features % per or out_features % per:
            raise ValueError(f"in/out features ({in_features}, {out_features}) must be multiples of {per}")
        gs = in_features if group_size == -1 else group_size
        if gs <= 0 or in_features % gs:
            raise ValueError(f"group_size {group_size} does not divide in_features {in_features}")
        groups = in_features // gs
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        self.online_hadamard, self.hadamard_block = online_hadamard, hadamard_block
        self.register_buffer("qweight", torch.zeros(in_features // per, out_features, dtype=torch.int32, device=device))
        self.register_buffer("qzeros", torch.zeros(groups, out_features // per, dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.zeros(groups, out_features, dtype=dtype, device=device))
        self.register_buffer("g_idx", default_g_idx(in_features, group_size, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)

    @classmethod
    def from_tensors(
        cls, tensors: dict[str, torch.Tensor], *, group_size: int, bits: int = 4,
        bias: torch.Tensor | None = None, online_hadamard: bool = False, hadamard_block: int | None = None,
        name: str = "QuantLinear",
    ) -> "QuantLinear":
        """Wrap GPTQ tensors (``qweight``, ``qzeros``, ``scales``, optional ``g_idx``), validated
        (:func:`~hadacore.quant.format.check_gptq_values`; ``name`` goes into the errors)."""
        g_idx = tensors.get("g_idx")
        n, k, _ = check_gptq_values(tensors["qweight"], tensors["qzeros"], tensors["scales"], g_idx, group_size,
                                    bits=bits, name=name)
        if bias is not None and (bias.dim() != 1 or bias.shape[0] != n):
            raise ValueError(f"{name}: bias must be [N={n}], got {tuple(bias.shape)}")
        _check_hadamard_block(k, online_hadamard, hadamard_block)
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features = k, n
        layer.bits, layer.group_size = bits, group_size
        layer.online_hadamard, layer.hadamard_block = online_hadamard, hadamard_block
        device = tensors["qweight"].device
        layer.register_buffer("qweight", tensors["qweight"])
        layer.register_buffer("qzeros", tensors["qzeros"])
        layer.register_buffer("scales", tensors["scales"])
        layer.register_buffer("g_idx", (g_idx if g_idx is not None else default_g_idx(k, group_size, device)).to(torch.int32))
        layer.register_buffer("bias", bias)
        return layer

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, *, bits: int = 4, group_size: int = 128, sym: bool = True,
        online_hadamard: bool = False, hadamard_block: int | None = None,
    ) -> "QuantLinear":
        """RTN-quantize a float ``nn.Linear``. With ``online_hadamard`` the weight is
        rotated first (``W <- W H / sqrt(K)``, block-diagonal with ``hadamard_block``) so
        the layer computes the same function."""
        w = linear.weight.detach()
        _check_hadamard_block(w.shape[1], online_hadamard, hadamard_block)
        if online_hadamard:
            w = block_hadamard_transform(w.float(), hadamard_block or w.shape[1])
        tensors = rtn_gptq_tensors(w, bits, group_size, sym, scale_dtype=linear.weight.dtype)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls.from_tensors(
            tensors, group_size=group_size, bits=bits, bias=bias,
            online_hadamard=online_hadamard, hadamard_block=hadamard_block,
        )

    def dequantized_weight(self) -> torch.Tensor:
        return torch.ops.hadacore.gptq_dequantize(self.qweight, self.qzeros, self.scales, self.g_idx, self.group_size, self.bits)

    def prepare_cpu(self, **kwargs) -> "PreparedW4A16":
        """This layer's weight converted once for the CPU op ``hadacore::w4a16_gemm_cpu``
        (see :func:`hadacore.lowering.w4a16.prepare_w4a16_cpu` for ``kwargs``). The online
        Hadamard, if any, is not included: apply it to the input first."""
        from hadacore.lowering.w4a16 import prepare_w4a16_cpu

        return prepare_w4a16_cpu(
            self.qweight, self.qzeros, self.scales, self.g_idx, self.group_size, self.bias, bits=self.bits, **kwargs
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.online_hadamard:  # whole-K: one hadacore::hadamard call, the pattern the compiler fuses
            x = block_hadamard_transform(x, self.hadamard_block or self.in_features)
        w = self.dequantized_weight()
        return F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        block = "" if self.hadamard_block is None else f", hadamard_block={self.hadamard_block}"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, bias={self.bias is not None}, online_hadamard={self.online_hadamard}{block}"
        )


def _check_hadamard_block(in_features: int, online_hadamard: bool, hadamard_block: int | None) -> None:
    if hadamard_block is None:
        return
    if not online_hadamard:
        raise ValueError(f"hadamard_block={hadamard_block} needs online_hadamard=True (it is the online rotation's block)")
    if hadamard_block <= 0 or in_features % hadamard_block:
        raise ValueError(f"hadamard_block {hadamard_block} must be a positive divisor of in_features {in_features}")

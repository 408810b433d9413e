"""``QuantLinear``: a GPTQ-format linear layer, fast in eager mode and fused by the compiler.

One representation: the checkpoint's own GPTQ buffers (``qweight``, ``qzeros``, ``scales``,
``g_idx``, ``bias``; state dicts load unchanged). Two ways to run it:

- **fast** (the default forward in eager mode): the weight is prepared once for its
  device, lazily on first use and again after ``.to(device)`` or an in-place update, and
  every call runs the kernels the compiled graph runs. CPU: torch's int4 kernel for small
  M, bf16 BLAS on a dequantized copy for large M (each prepared only when first needed;
  16-bit activations, the W4A16 contract). CUDA: the Triton W4A16 GEMM. Act-order weights
  are sorted by group once; the input gather is fused into the online Hadamard's store
  when there is one, else it is an ``index_select``.
- **reference** (:meth:`QuantLinear.reference`, and what ``forward`` traces to under
  ``torch.compile``): ``[hadamard ->] gptq_dequantize -> linear`` in the input's own
  precision. It is the numerical reference, and it is exactly the pattern the compiler's
  passes recognise and rewrite into fused ``hadacore::*`` ops (with the same preparation
  at compile time). :func:`reference_numerics` runs a whole model this way.

Why a module that owns its prepared forms rather than a tensor subclass (torchao's
``Int4OpaqueTensor``): the compiler's passes run on the Dynamo graph before AOTAutograd,
where a subclass weight would have to be flattened and its dispatch undone before the
passes could permute, fuse (q/k/v, gate/up) or fold act-order into neighbouring layers,
all of which need the raw GPTQ tensors. A module keeps one plain pattern for the passes
and one cached fast path for eager mode, with the same kernels behind both.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from hadacore.formats.gptq import check_gptq_values, default_g_idx
from hadacore.kernels.cpu.hadamard import hadamard_by_matmuls, matmul_plan, use_matmul_form
from hadacore.kernels.cpu.w4a16 import (
    bf16_linear, default_int4_max_m, int4_linear, int4pack_unsupported_reason, prepare_w4a16_cpu,
)
from hadacore.ops import block_hadamard_transform
from hadacore.quant.act_order import sort_by_group
from hadacore.quant.rtn import rtn_gptq_tensors

__all__ = ["QuantLinear", "reference_numerics"]

_BUFFERS = ("qweight", "qzeros", "scales", "g_idx", "bias")


class _CPUPath:
    """A QuantLinear's CPU fast path: the compiled graph's kernels, called directly.

    The int4 form (small M) and the dense bf16 form (large M) are each prepared when first
    needed; small online Hadamards run as the compiled graph's constant matmuls, larger
    ones through the op's blocked kernel. The input gather of an act-order weight rides on
    the Hadamard when there is one (whole-K), else it is one ``index_select``.
    """

    def __init__(self, layer: "QuantLinear"):
        gptq, perm = layer._sorted_tensors()
        self.args = (gptq["qweight"], gptq["qzeros"], gptq["scales"], gptq["g_idx"], layer.group_size)
        self.bits, self.bias, self.n = layer.bits, layer.bias, layer.out_features
        self.perm = None if perm is None else perm.to(torch.int64)
        self.limit = default_int4_max_m(layer.in_features)
        self.int4_ok = int4pack_unsupported_reason(layer.in_features, layer.group_size, gptq["g_idx"], layer.bits)[0] is None
        self.block = (layer.hadamard_block or layer.in_features) if layer.online_hadamard else None
        self.int4 = self.dense = None
        self.rotations: dict[torch.dtype, tuple] = {}

    def _rotate(self, x: torch.Tensor) -> torch.Tensor:
        k, b = x.shape[-1], self.block
        rows = x.numel() // b
        if not use_matmul_form(rows, b):
            return block_hadamard_transform(x, b, perm=self.perm)
        if x.dtype not in self.rotations:
            self.rotations[x.dtype] = matmul_plan(b, 1.0 / math.sqrt(b), x.dtype, x.device)
        y = hadamard_by_matmuls(x if b == k else x.unflatten(-1, (k // b, b)), None,
                                self.perm if b == k else None, *self.rotations[x.dtype])
        if b != k:
            y = y.flatten(-2)
            if self.perm is not None:
                y = y.index_select(-1, self.perm)
        return y

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.block is not None:
            x = self._rotate(x)
        elif self.perm is not None:
            x = x.index_select(-1, self.perm)
        m = x.numel() // x.shape[-1]
        if self.int4_ok and m <= self.limit:
            if self.int4 is None:
                self.int4 = prepare_w4a16_cpu(*self.args, bits=self.bits, dense=False, int4_max_m=self.limit)
            p = self.int4
            return int4_linear(x, p.packed, p.scales_and_zeros, None, self.bias, p.int4_group_size, self.n)
        if self.dense is None:
            self.dense = prepare_w4a16_cpu(*self.args, bits=self.bits, int4=False)
        return bf16_linear(x, self.dense.weight, self.bias)


class _CUDAPath:
    """A QuantLinear's CUDA fast path: the Triton W4A16 GEMM on the weight sorted by group."""

    def __init__(self, layer: "QuantLinear"):
        gptq, perm = layer._sorted_tensors()
        g_idx = gptq["g_idx"]
        k, gs = layer.in_features, layer.group_size
        if gs != -1 and torch.equal(g_idx.long(), torch.arange(k, device=g_idx.device) // gs):
            g_idx = None  # contiguous groups: the kernel's fastest path, and no per-call check
        self.tensors = (gptq["qweight"], gptq["qzeros"], gptq["scales"], g_idx, layer.bias, gs)
        self.perm = None if perm is None else perm.to(torch.int64)
        self.block = (layer.hadamard_block or k) if layer.online_hadamard else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.block is not None:
            x = block_hadamard_transform(x, self.block, perm=self.perm)  # whole-K: gather fused into the store
        elif self.perm is not None:
            x = x.index_select(-1, self.perm)
        return torch.ops.hadacore.w4a16_gemm(x, *self.tensors, 0, False)


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
        self.numerics = "fast"
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
        (:func:`~hadacore.formats.gptq.check_gptq_values`; ``name`` goes into the errors)."""
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
        layer.numerics = "fast"
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

    # ------------------------------------------------------------------ the two forms
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.numerics == "reference" or torch.compiler.is_compiling():
            return self.reference(x)  # under torch.compile: the pattern the passes fuse
        return self._fast(x)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """``[hadamard ->] gptq_dequantize -> linear`` in x's precision: the numerical reference."""
        if self.online_hadamard:  # whole-K: one hadacore::hadamard call, the pattern the compiler fuses
            x = block_hadamard_transform(x, self.hadamard_block or self.in_features)
        w = self.dequantized_weight()
        return F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def _fast(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"{self!r}: x has {x.shape[-1]} input features, the layer {self.in_features}")
        path = self._fast_path(x.device)
        return self.reference(x) if path is None else path(x)

    # ------------------------------------------------------------------ prepared forms
    def _weight_key(self) -> tuple:
        """Which tensors, at which version: a prepared form is stale once they change (this runs
        on every eager call, so it is written for speed)."""
        q, z, s, g, b = self.qweight, self.qzeros, self.scales, self.g_idx, self.bias
        try:
            return (id(q), q._version, id(z), z._version, id(s), s._version, id(g), g._version, id(b),
                    None if b is None else b._version)
        except RuntimeError:  # inference tensors carry no version counter: identity only
            return (id(q), id(z), id(s), id(g), id(b))

    def _fast_path(self, device: torch.device) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
        """This layer's fast path on ``device``, built on first use (module docstring)."""
        key = self._weight_key()
        cache = self.__dict__.get("_prepared")
        if cache is None or cache[0] != key:
            cache = self.__dict__["_prepared"] = (key, {})
        paths = cache[1]
        if device not in paths:
            paths[device] = (_CPUPath(self) if device.type == "cpu" else _CUDAPath(self) if device.type == "cuda"
                             else None)
        return paths[device]

    def _sorted_tensors(self) -> tuple[dict[str, torch.Tensor], Optional[torch.Tensor]]:
        gptq = {"qweight": self.qweight, "qzeros": self.qzeros, "scales": self.scales, "g_idx": self.g_idx}
        check_gptq_values(*gptq.values(), self.group_size, bits=self.bits, name=repr(self))
        return sort_by_group(gptq, self.bits)

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_prepared", None)  # closures over device-specific tensors: rebuilt on use
        return state

    def _apply(self, fn, recurse=True):
        self.__dict__.pop("_prepared", None)  # .to(device), .half(), ...: prepare again on next use
        return super()._apply(fn, recurse)

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


@contextlib.contextmanager
def reference_numerics(model: nn.Module) -> Iterator[nn.Module]:
    """Run every :class:`QuantLinear` of ``model`` in its reference form inside the block
    (dequantize + linear in the input's precision: fp32 inputs compute exactly)."""
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    before = [m.numerics for m in layers]
    for m in layers:
        m.numerics = "reference"
    try:
        yield model
    finally:
        for m, n in zip(layers, before):
            m.numerics = n

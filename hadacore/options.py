"""The compiler's options: one frozen, typed object, validated once.

``torch.compile(model, backend="hadacore", options={...})`` hands the backend a dict;
:meth:`CompileOptions.from_mapping` turns it into a :class:`CompileOptions` (unknown keys
and bad values are a ``ValueError`` naming them), and every pass reads its fields.

Rotations share one vocabulary across the compiler and the converter
(:data:`ROTATIONS`); each name is a set of QuaRot/SpinQuant rotations:

============  ====================================================================
``none``      no rotation
``offline``   R1 (residual stream) and R2 (per head, V/O) folded into the weights
``online``    R4 before down_proj (and R3 on Q/K, where the compiler adds it) at run time
``full``      ``offline`` + ``online``
``learned``   ``full`` with R1/R2 optimised on calibration text (converter only)
============  ====================================================================

The compiler accepts ``none`` and ``online`` (it rewrites a graph, not a checkpoint); the
converter accepts all five.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, Optional

__all__ = ["CompileOptions", "ROTATIONS", "COMPILER_ROTATIONS", "check_rotate", "folds_r1_r2", "has_online_r4"]

#: Every rotation setting (module docstring).
ROTATIONS = ("none", "offline", "online", "full", "learned")
#: The ones the compiler can apply to a graph.
COMPILER_ROTATIONS = ("none", "online")


def folds_r1_r2(rotate: str) -> bool:
    """Whether the setting folds R1 and R2 into the weights (random Hadamard or learned)."""
    return rotate in ("offline", "full", "learned")


def has_online_r4(rotate: str) -> bool:
    """Whether the setting rotates down_proj's input at run time (R4)."""
    return rotate in ("online", "full", "learned")


def check_rotate(value: Any, accepted: tuple[str, ...], what: str) -> str:
    if value not in accepted:
        raise ValueError(f"{what}: rotate={value!r}; accepted here: {accepted} (of the rotation settings {ROTATIONS})")
    return value


def _bad(key: str, value: Any, accepted: str) -> ValueError:
    return ValueError(f"hadacore option {key!r}: got {value!r}, accepted: {accepted}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class CompileOptions:
    """What ``backend="hadacore"`` does to a graph. Field docs are the option docs."""

    #: ``None`` or ``"w4a16"``: RTN-quantize every float linear when the graph compiles.
    quantize: Optional[str] = None
    #: Quantization group size along K (positive, or -1 for per-channel).
    group_size: int = 128
    bits: int = 4
    #: Symmetric grids (zero point 8) for compile-time quantization.
    sym: bool = True
    #: ``"none"`` or ``"online"``: R4 before down_proj and R3 on Q/K after RoPE.
    rotate: str = "none"
    #: R3 rotates K where it is written into the KV cache, so the cache holds rotated keys and
    #: a step's R3 work no longer grows with the cache. Exact only when every writer of the
    #: cache is compiled with these options (``StaticDecoder`` compiles its prefill then).
    rotated_kv_cache: bool = False
    #: R3 + per-head FP8 e4m3 Q/K (emulated by quantize-dequantize off CUDA).
    fp8_attention: bool = False
    #: SplitK factor of the CUDA W4A16 GEMM; 0 chooses per call.
    split_k: int = 0
    #: Fixed-order SplitK reduction (bitwise repeatable results).
    deterministic: bool = False
    #: False: run the rewritten graph without Inductor (debugging).
    inductor: bool = True
    #: Glob patterns of layer names that compile-time quantization keeps in float on purpose.
    skip_layers: tuple[str, ...] = ()

    def __post_init__(self):
        if self.quantize not in (None, "w4a16"):
            raise _bad("quantize", self.quantize, "None or 'w4a16'")
        if not _is_int(self.group_size) or not (self.group_size > 0 or self.group_size == -1):
            raise _bad("group_size", self.group_size, "a positive int or -1 (per-channel)")
        if not _is_int(self.bits) or self.bits != 4:
            raise _bad("bits", self.bits, "4 (the W4A16 GEMM is 4-bit)")
        if self.rotate not in COMPILER_ROTATIONS:
            raise _bad("rotate", self.rotate, f"one of {COMPILER_ROTATIONS}")
        if not _is_int(self.split_k) or self.split_k < 0:
            raise _bad("split_k", self.split_k, "0 (automatic) or a positive int")
        for f in ("sym", "rotated_kv_cache", "fp8_attention", "deterministic", "inductor"):
            if not isinstance(getattr(self, f), bool):
                raise _bad(f, getattr(self, f), "True or False")
        if not isinstance(self.skip_layers, tuple) or not all(isinstance(p, str) for p in self.skip_layers):
            raise _bad("skip_layers", self.skip_layers, "a tuple of glob patterns (str)")
        if self.rotated_kv_cache and self.rotate != "online":
            raise ValueError("hadacore option 'rotated_kv_cache': needs rotate='online' (it moves R3's rotation of K)")
        if self.rotated_kv_cache and self.fp8_attention:
            raise ValueError("hadacore options 'rotated_kv_cache' and 'fp8_attention' cannot be combined yet: FP8 "
                             "attention rotates and quantizes K in one step as attention reads it")

    @classmethod
    def from_mapping(cls, options: Optional[Mapping[str, Any]] = None) -> "CompileOptions":
        """Options as ``torch.compile`` passes them (a dict; ``split_k="auto"`` means 0,
        a list of ``skip_layers`` becomes a tuple)."""
        options = dict(options or {})
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(options) - set(names))
        if unknown:
            raise ValueError(f"unknown hadacore option(s) {unknown}; valid options: {sorted(names)}")
        if options.get("split_k") == "auto":
            options["split_k"] = 0
        if isinstance(options.get("skip_layers"), (list, str)):
            sl = options["skip_layers"]
            options["skip_layers"] = (sl,) if isinstance(sl, str) else tuple(sl)
        return cls(**options)

    @property
    def changes_model(self) -> bool:
        """Whether the compiled graph computes another function than the eager model: then
        every writer of shared state (a KV cache) must be compiled with these options, and
        no call may silently fall back to eager."""
        return self.quantize is not None or self.rotated_kv_cache or self.fp8_attention

"""hadacore: Hadamard-rotated W4A16 inference for LLMs.

Public API (stable names): see DESIGN.md. The torch.compile backend is registered by
entry point, so ``torch.compile(model, backend="hadacore")`` needs no import.
"""

from hadacore.hadamard import HADAMARD_BASES, hadamard_matrix
from hadacore.ops import hadamard_transform, w4a16_matmul
from hadacore.formats.gptq import pack_gptq, unpack_gptq
from hadacore.fxpasses.stats import reset_stats, stats

__version__ = "0.1.0"


def __getattr__(name: str):
    # convert/load need the optional `hf` extra (transformers): imported on first use.
    # `hadacore.convert` is the callable package hadacore.convert (== its convert()).
    if name in ("convert", "load"):
        import hadacore.convert as _convert_pkg

        return _convert_pkg if name == "convert" else _convert_pkg.load
    raise AttributeError(f"module 'hadacore' has no attribute {name!r}")


__all__ = [
    "HADAMARD_BASES",
    "convert",
    "hadamard_matrix",
    "hadamard_transform",
    "load",
    "pack_gptq",
    "reset_stats",
    "stats",
    "unpack_gptq",
    "w4a16_matmul",
]

"""hadacore: Hadamard-rotated W4A16 inference for LLMs.

Public API (stable names): see DESIGN.md. The torch.compile backend is registered by
entry point, so ``torch.compile(model, backend="hadacore")`` needs no import.
"""

from hadacore.hadamard import HADAMARD_BASES, hadamard_matrix
from hadacore.ops import hadamard_transform, w4a16_matmul
from hadacore.quant.format import pack_gptq, unpack_gptq
from hadacore.fxpasses.stats import reset_stats, stats

__version__ = "0.1.0"

__all__ = [
    "HADAMARD_BASES",
    "hadamard_matrix",
    "hadamard_transform",
    "pack_gptq",
    "reset_stats",
    "stats",
    "unpack_gptq",
    "w4a16_matmul",
]

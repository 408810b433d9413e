"""Checkpoints on disk: the config (:mod:`.config`), atomic writing (:mod:`.write`,
:mod:`.output_dir`), reading tensors or one rank's slices (:mod:`.read`) and the one
loader (:mod:`.load`). Needs the ``hf`` extra (safetensors, transformers)."""

from hadacore.checkpoint.config import CheckpointConfig, GPTQSpec, OnlineRotations
from hadacore.checkpoint.load import load

__all__ = ["CheckpointConfig", "GPTQSpec", "OnlineRotations", "load"]

"""Writing a checkpoint: safetensors (sharded above a size) + config.json + tokenizer, atomically.

Layout of OUT: ``config.json`` (:class:`~hadacore.checkpoint.config.CheckpointConfig`),
``model.safetensors`` or ``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``
above the shard size, tokenizer files when the source had a tokenizer. Tensor names are
the usual ``model.layers.{i}.self_attn.q_proj.qweight`` etc., so GPTQ loaders read them.
Every safetensors file records the runtime contract in its metadata.

Writes are atomic: everything goes to a work directory beside OUT that is renamed into
place only when complete (:mod:`hadacore.checkpoint.output_dir`).
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

import torch
from torch import nn

from hadacore.checkpoint.config import ONLINE_METADATA_KEY, CheckpointConfig
from hadacore.checkpoint.output_dir import OutputDir
from hadacore.formats.compressed_tensors import gptq_to_compressed_tensors
from hadacore.hadamard import sylvester
from hadacore.quant.linear import QuantLinear

__all__ = ["atomic_output_dir", "write_checkpoint", "write_safetensors", "DEFAULT_MAX_SHARD_BYTES", "INDEX_FILE"]

log = logging.getLogger(__name__)

DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3
INDEX_FILE = "model.safetensors.index.json"


@contextlib.contextmanager
def atomic_output_dir(out_dir: str | Path, *, force: bool = False, protect: tuple = ()):
    """Claim ``out_dir`` now (:meth:`OutputDir.claim`: every check that can fail does so here),
    yield the work directory to write into, and publish it as ``out_dir`` when the block
    ends without an exception; on any exception the work directory goes, OUT untouched."""
    target = OutputDir.claim(out_dir, force=force, protect=protect)
    try:
        yield target.work
        target.publish()
    finally:
        target.discard()


def _shards(state: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    return shards


def write_safetensors(state: dict[str, torch.Tensor], directory: Path, *, metadata: dict[str, str] | None = None,
                      max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> list[str]:
    """Write ``state`` as one file, or as shards plus an index when larger than ``max_shard_bytes``;
    ``metadata`` goes into every file's header."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    shards = _shards(state, max_shard_bytes)
    if len(shards) == 1:
        names = ["model.safetensors"]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        save_file(shard, str(directory / name), metadata={"format": "pt", **(metadata or {})})
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
            "weight_map": {k: name for name, shard in zip(names, shards) for k in shard},
        }
        (directory / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True))
    return names


def _compressed_tensors_state(model: nn.Module, config: CheckpointConfig) -> dict[str, torch.Tensor]:
    """The state dict with every QuantLinear in compressed-tensors' ``pack-quantized`` layout and,
    with an online R4, its Sylvester matrix (one shared copy, under layer 0's name, as
    compressed-tensors' writer saves it; readers divide by sqrt(n))."""
    state = model.state_dict()
    for name, module in model.named_modules():
        if not isinstance(module, QuantLinear):
            continue
        gptq = {k: state.pop(f"{name}.{k}") for k in ("qweight", "qzeros", "scales", "g_idx")}
        ct = gptq_to_compressed_tensors(gptq, module.group_size, symmetric=config.gptq.sym, name=name)
        state.update({f"{name}.{k}": v for k, v in ct.items()})
    if config.online.needed:
        state["model.layers.0.mlp.down_proj.R4_input.weight"] = sylvester(config.online.r4_block, torch.float32)
    return state


def write_checkpoint(model: nn.Module, config: CheckpointConfig, directory: Path, *, tokenizer=None,
                     max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> list[str]:
    """Write ``model``'s state dict, ``config`` and the tokenizer into ``directory``."""
    state = _compressed_tensors_state(model, config) if config.format == "compressed-tensors" else model.state_dict()
    names = write_safetensors(state, directory, max_shard_bytes=max_shard_bytes,
                              metadata={ONLINE_METADATA_KEY: config.online.metadata()})
    (directory / "config.json").write_text(json.dumps(config.to_json(), indent=2, sort_keys=True) + "\n")
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        generation_config.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return names

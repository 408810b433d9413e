"""Writing and reading hadacore checkpoints (standard GPTQ v1 safetensors + config.json).

Layout of OUT: ``config.json`` (the model's config as a ``LlamaForCausalLM``, with a
standard GPTQ ``quantization_config`` and a ``hadacore`` block), ``model.safetensors``
or ``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json`` above the
shard size, tokenizer files when the source had a tokenizer. Tensor names are the
usual ``model.layers.{i}.self_attn.q_proj.qweight`` etc., so GPTQ loaders read them.

Writes are atomic: everything goes to a temporary directory beside OUT which is renamed
into place only when complete; an existing OUT is replaced only with ``force``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import tempfile
import uuid
from pathlib import Path

import torch
from torch import nn

__all__ = ["atomic_output_dir", "check_output_dir", "save_checkpoint", "read_state_dict", "load", "DEFAULT_MAX_SHARD_BYTES"]

log = logging.getLogger(__name__)

DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3
_INDEX = "model.safetensors.index.json"


def check_output_dir(out_dir: str | Path, force: bool) -> Path:
    out = Path(out_dir)
    if out.exists() and not force:
        raise FileExistsError(f"{out} already exists; pass force=True (CLI: --force) to replace it")
    return out


@contextlib.contextmanager
def atomic_output_dir(out_dir: str | Path, *, force: bool = False):
    """Yield a fresh temporary directory beside ``out_dir``; on success it becomes ``out_dir``.

    On any exception the temporary directory is removed and ``out_dir`` is untouched.
    """
    out = check_output_dir(out_dir, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():  # force: swap, then delete the old one
        old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)


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


def write_safetensors(state: dict[str, torch.Tensor], directory: Path, *, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> list[str]:
    """Write ``state`` as one file, or as shards plus an index when larger than ``max_shard_bytes``."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    shards = _shards(state, max_shard_bytes)
    if len(shards) == 1:
        names = ["model.safetensors"]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        save_file(shard, str(directory / name), metadata={"format": "pt"})
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
            "weight_map": {k: name for name, shard in zip(names, shards) for k in shard},
        }
        (directory / _INDEX).write_text(json.dumps(index, indent=2, sort_keys=True))
    return names


def save_checkpoint(
    model: nn.Module,
    config: dict,
    out_dir: str | Path,
    *,
    tokenizer=None,
    force: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Atomically write ``model``'s state dict, ``config`` (a dict) and the tokenizer to ``out_dir``."""
    with atomic_output_dir(out_dir, force=force) as tmp:
        names = write_safetensors(model.state_dict(), tmp, max_shard_bytes=max_shard_bytes)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        generation_config = getattr(model, "generation_config", None)
        if generation_config is not None:
            generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        log.info("wrote %s (%d safetensors file%s)", out_dir, len(names), "s" * (len(names) > 1))
    return Path(out_dir)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory (single file or index + shards), with clear errors."""
    from safetensors.torch import load_file

    path = Path(path)
    index = path / _INDEX
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{path} has neither model.safetensors nor {_INDEX}")
    state: dict[str, torch.Tensor] = {}
    for name in files:
        f = path / name
        if not f.exists():
            raise FileNotFoundError(f"missing weight shard {f}")
        try:
            state.update(load_file(str(f)))
        except Exception as e:  # safetensors' own error types for a corrupt header/body
            raise ValueError(f"corrupt safetensors file {f}: {e}") from None
    return state


def read_config(path: str | Path) -> dict:
    f = Path(path) / "config.json"
    if not f.exists():
        raise FileNotFoundError(f"{f} not found: not a checkpoint directory")
    config = json.loads(f.read_text())
    qc = config.get("quantization_config") or {}
    if qc.get("quant_method") != "gptq" or qc.get("checkpoint_format", "gptq") != "gptq":
        raise ValueError(f"{f}: expected a GPTQ v1 checkpoint (quantization_config.quant_method 'gptq'), got {qc or None}")
    return config


def load(path: str | Path, *, tp_rank: int = 0, tp_size: int = 1, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> nn.Module:
    """A ``LlamaForCausalLM`` with :class:`QuantLinear` layers from a converted checkpoint.

    ``tp_size > 1`` delegates to ``hadacore.distributed.load_sharded`` (that rank's shard).
    ``dtype`` (default: the checkpoint's) is the dtype of the float parts and the scales.
    """
    if tp_size > 1:
        try:
            from hadacore.distributed import load_sharded
        except ImportError:
            raise NotImplementedError(
                "tensor-parallel loading (tp_size > 1) is provided by hadacore.distributed.load_sharded, "
                "which is not available in this build"
            ) from None
        return load_sharded(path, tp_rank=tp_rank, tp_size=tp_size, device=device, dtype=dtype)
    if tp_rank != 0:
        raise ValueError(f"tp_rank must be 0 when tp_size is 1, got {tp_rank}")

    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.initialization import no_init_weights

    from hadacore.convert.pipeline import make_quant_linear

    config = read_config(path)
    qc, hc = config["quantization_config"], config.get("hadacore") or {}
    bits, group_size = int(qc["bits"]), int(qc["group_size"])
    stored = getattr(torch, str(config.get("dtype") or config.get("torch_dtype") or "float16"))
    dtype = dtype or stored
    r4_block = hc.get("r4_block_size") if (hc.get("online") or {}).get("r4_down_proj") else None
    state = read_state_dict(path)

    llama_config = LlamaConfig.from_dict({k: v for k, v in config.items() if k not in ("quantization_config",)})
    with no_init_weights():
        model = LlamaForCausalLM(llama_config)
    for i, layer in enumerate(model.model.layers):
        for parent, names in ((layer.self_attn, ("q_proj", "k_proj", "v_proj", "o_proj")), (layer.mlp, ("gate_proj", "up_proj", "down_proj"))):
            for name in names:
                prefix = f"model.layers.{i}.{'self_attn' if parent is layer.self_attn else 'mlp'}.{name}"
                try:
                    tensors = {k: state.pop(f"{prefix}.{k}") for k in ("qweight", "qzeros", "scales", "g_idx")}
                except KeyError as e:
                    raise ValueError(f"{path}: checkpoint lacks {e.args[0]}") from None
                bias = state.pop(f"{prefix}.bias", None)
                setattr(parent, name, make_quant_linear(
                    tensors, bits=bits, group_size=group_size, bias=bias,
                    r4_block=r4_block if name == "down_proj" else None,
                ))
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not k.endswith((".qweight", ".qzeros", ".scales", ".g_idx", ".bias"))]
    if missing or unexpected:
        raise ValueError(f"{path}: checkpoint does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.to(device=device, dtype=dtype).eval()

"""Reading a source model: a Hugging Face directory, a GGUF file, or an in-memory module.

Only the Llama family is accepted (RMSNorm, SwiGLU MLP, RoPE, GQA; no MLP bias, no
q/k norms): Llama, Mistral, Qwen2 (q/k/v biases) and SmolLM. Everything is checked
before any weight is touched, with errors that say what was wrong and what works.
"""

from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from hadacore.hadamard import check_hadamard_size
from hadacore.options import folds_r1_r2, has_online_r4

__all__ = [
    "SUPPORTED_MODEL_TYPES", "ModelShape", "Source", "load_source", "model_shape", "check_model", "check_sizes",
    "check_finite",
]

log = logging.getLogger(__name__)

#: ``config.model_type`` values this converter understands (SmolLM checkpoints say "llama").
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
_SUPPORTED_TEXT = (
    "a Llama-family causal LM (model_type one of "
    f"{', '.join(SUPPORTED_MODEL_TYPES)}: Llama, Mistral, Qwen2, SmolLM) given as a Hugging Face "
    "directory with config.json and *.safetensors, a .gguf file (or a directory holding one), "
    "or an in-memory transformers model of that family"
)
_COMMON_GROUP_SIZES = (32, 64, 128, 256)


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    layers: int
    vocab: int


@dataclass
class Source:
    model: nn.Module  # fp32 transformers model, owned by the converter (safe to modify)
    tokenizer: object | None
    description: str


def model_shape(config) -> ModelShape:
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return ModelShape(
        hidden=config.hidden_size,
        intermediate=config.intermediate_size,
        heads=heads,
        kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        layers=config.num_hidden_layers,
        vocab=config.vocab_size,
    )


def check_model(model: nn.Module) -> None:
    """Raise ``ValueError`` unless ``model`` is a supported Llama-family causal LM."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"unsupported model ({type(model).__name__}, model_type={model_type!r}); expected {_SUPPORTED_TEXT}")
    act = getattr(config, "hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"unsupported MLP activation {act!r}: the Llama family uses SwiGLU (silu)")
    try:
        layers = model.model.layers
        for i, layer in enumerate(layers):
            at, mlp = layer.self_attn, layer.mlp
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                if not isinstance(getattr(at, name), nn.Linear):
                    raise ValueError(f"layer {i}: self_attn.{name} is not an nn.Linear")
            for name in ("gate_proj", "up_proj", "down_proj"):
                lin = getattr(mlp, name)
                if not isinstance(lin, nn.Linear) or lin.bias is not None:
                    raise ValueError(f"layer {i}: mlp.{name} must be an nn.Linear without bias")
            if hasattr(at, "q_norm") or hasattr(at, "k_norm"):
                raise ValueError(f"layer {i}: q/k norms (Qwen3-style) are not supported")
            if at.o_proj.bias is not None:
                raise ValueError(f"layer {i}: self_attn.o_proj has a bias; not supported")
        model.model.embed_tokens, model.model.norm, model.lm_head  # noqa: B018
    except AttributeError as e:
        raise ValueError(f"model does not have the Llama module layout ({e}); expected {_SUPPORTED_TEXT}") from None


def check_finite(model: nn.Module) -> None:
    """Raise ``ValueError`` naming every parameter or buffer with NaN or Inf values: no
    quantizer can represent them, and they would surface later as a confusing error
    (or as a checkpoint whose logits are not finite)."""
    bad = [f"{name} ({int((~torch.isfinite(t)).sum())} of {t.numel()})"
           for name, t in (*model.named_parameters(), *model.named_buffers())
           if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise ValueError(f"the source model has non-finite values (NaN or Inf) in {', '.join(bad[:8])}"
                         + (f" and {len(bad) - 8} more tensors" if len(bad) > 8 else ""))


def check_sizes(shape: ModelShape, *, rotate: str, tp: int, group_size: int) -> None:
    """Every Hadamard the chosen rotations need is supported, every layer's input size is
    a multiple of the group size (per TP shard for the row-parallel o_proj/down_proj)."""
    if folds_r1_r2(rotate):
        check_hadamard_size(shape.hidden, what=f"R1 needs a Hadamard of the hidden size {shape.hidden}")
        check_hadamard_size(shape.head_dim, what=f"R2 needs a Hadamard of the head size {shape.head_dim}")
    if has_online_r4(rotate):
        if shape.intermediate % tp:
            raise ValueError(f"intermediate size {shape.intermediate} is not divisible by tp={tp}")
        block = shape.intermediate // tp
        check_hadamard_size(block, what=f"R4 needs a Hadamard of the down_proj input size {block} (intermediate / tp)")
    if tp > 1:
        for what, n in (("heads", shape.heads), ("kv heads", shape.kv_heads), ("intermediate size", shape.intermediate)):
            if n % tp:
                raise ValueError(f"tp={tp} does not divide the number of {what} ({n})")
    if group_size == -1:
        return
    inputs = {
        "q_proj/k_proj/v_proj/gate_proj/up_proj": shape.hidden,
        "o_proj (per TP shard)": shape.heads * shape.head_dim // tp,
        "down_proj (per TP shard)": shape.intermediate // tp,
    }
    for layer, k in inputs.items():
        if group_size <= 0 or k % group_size:
            fit = [g for g in _COMMON_GROUP_SIZES if all(v % g == 0 for v in inputs.values())]
            raise ValueError(
                f"group size {group_size} does not divide the input size {k} of {layer}; "
                f"group sizes that fit every layer: {fit + [-1]} (-1 = per-channel)"
            )


def _check_safetensors_dir(path: Path) -> None:
    from safetensors import safe_open

    index = path / "model.safetensors.index.json"
    if index.exists():
        from hadacore.checkpoint.config import read_json

        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: not a valid safetensors index (no 'weight_map' object)")
        files = sorted(set(weight_map.values()))
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
        if not files:
            raise ValueError(f"{path} has no *.safetensors weights; expected {_SUPPORTED_TEXT}")
    for name in files:
        f = path / name
        if not f.exists():
            raise FileNotFoundError(f"missing weight shard {f} (listed in {index.name})")
        try:
            with safe_open(str(f), framework="pt") as st:
                st.keys()
        except Exception as e:  # safetensors raises its own error types for bad headers
            raise ValueError(f"corrupt safetensors shard {f}: {e}") from None


def _gguf_in(path: Path) -> Path | None:
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir() and not (path / "config.json").exists():
        found = sorted(path.glob("*.gguf"))
        if len(found) == 1:
            return found[0]
    return None


def _load_tokenizer(path: str, **kw):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, **kw)
    except Exception as e:  # a checkpoint without tokenizer files is still convertible
        log.warning("no tokenizer loaded from %s (%s); pass calibration as token ids", path, e)
        return None


def _as_float_model(model: nn.Module) -> nn.Module:
    """fp32, eval mode. transformers marks GGUF-loaded models as quantized (and then refuses
    ``.float()``) although their weights were dequantized to float tensors on load; from
    here on they are plain float models, so the marks go."""
    if getattr(model, "is_quantized", False):
        model.is_quantized = False
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if "quantization_config" in vars(model.config):
        del model.config.quantization_config
    return model.float().eval()


def load_source(model_or_path, *, tokenizer=None, check=None) -> Source:
    """Load (or copy) the source as an fp32 transformers model plus its tokenizer.

    ``check(shape)`` runs on the config before any weight is read, when possible.
    An in-memory model is deep-copied, so the caller's module is never modified.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    if isinstance(model_or_path, nn.Module):
        check_model(model_or_path)
        if check:
            check(model_shape(model_or_path.config))
        model = _as_float_model(copy.deepcopy(model_or_path))
        return Source(model, tokenizer, f"in-memory {type(model_or_path).__name__}")
    if not isinstance(model_or_path, (str, os.PathLike)):
        raise TypeError(f"expected a path or an nn.Module, got {type(model_or_path).__name__}; expected {_SUPPORTED_TEXT}")
    path = Path(model_or_path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; expected {_SUPPORTED_TEXT}")
    gguf = _gguf_in(path)
    if gguf is not None:
        directory, kw = str(gguf.parent), {"gguf_file": gguf.name}
        config = AutoConfig.from_pretrained(directory, **kw)
    elif path.is_dir() and (path / "config.json").exists():
        directory, kw = str(path), {}
        config = AutoConfig.from_pretrained(directory)
    else:
        raise ValueError(f"cannot read {path}; expected {_SUPPORTED_TEXT}")
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"unsupported model_type {config.model_type!r} in {path}; expected {_SUPPORTED_TEXT}")
    if check:
        check(model_shape(config))
    if gguf is None:
        _check_safetensors_dir(path)
    log.info("loading %s", path)
    model = _as_float_model(AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, **kw))
    check_model(model)
    if tokenizer is None:
        tokenizer = _load_tokenizer(directory, **kw)
    return Source(model, tokenizer, str(path))

"""What a checkpoint's ``config.json`` says about its tensors: written and read in one place.

A hadacore checkpoint is a transformers Llama config plus:

- ``quantization_config``: the standard GPTQ block (bits, group size, ``desc_act``,
  ``sym``, ``checkpoint_format`` = the zero-point convention, v1 ``gptq`` or ``gptq_v2``);
- ``hadacore``: the record of how it was made (provenance: method, rotations, calibration)
  and the *runtime contract*: the online rotations its tensors need (:class:`OnlineRotations`).

The contract is also stored in every safetensors file's metadata (key
:data:`ONLINE_METADATA_KEY`), so a ``config.json`` whose rotations were removed or edited
no longer agrees with its tensors and loading fails instead of computing another model.

A checkpoint that needs online rotations must not load as plain GPTQ anywhere: other
loaders would drop the rotation and compute garbage without a word. Its config therefore
says ``model_type: "hadacore_llama"`` (transformers, and the GPTQModel, vLLM and SGLang
loaders that start from transformers' ``AutoConfig``, refuse an unknown model type) and
``quant_method: "hadacore"`` (vLLM, SGLang and GPTQModel refuse an unknown method even when
the model type is overridden). Plain checkpoints are ordinary ``llama`` + ``gptq``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "FORMAT_VERSION",
    "ONLINE_METADATA_KEY",
    "CheckpointConfig",
    "GPTQSpec",
    "OnlineRotations",
    "read_json",
]

#: 2: the runtime contract is also in the safetensors metadata; rotated checkpoints use
#: the ``hadacore_llama`` model type and ``hadacore`` quant method.
FORMAT_VERSION = 2
ONLINE_METADATA_KEY = "hadacore.online"
ROTATED_MODEL_TYPE = "hadacore_llama"
ROTATED_ARCHITECTURE = "HadacoreLlamaForCausalLM"
ROTATED_QUANT_METHOD = "hadacore"
_ZERO_FORMATS = ("gptq", "gptq_v2")
_BASE_MODEL_TYPES = ("llama", "mistral", "qwen2")


def read_json(path: str | Path) -> dict:
    """A JSON object from a checkpoint file; a malformed file is an error that names it."""
    path = Path(path)
    try:
        value = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


@dataclass(frozen=True)
class OnlineRotations:
    """The rotations the tensors need at run time (their weights were rotated offline to match).

    ``r4_block``: down_proj's input is rotated by ``I_{K/b} (x) H_b / sqrt(b)`` (``b = K`` for
    a single-GPU checkpoint, ``K / tp`` for one planned for ``tp`` ranks); None: no R4.
    """

    r4_block: int | None = None

    def __post_init__(self):
        if self.r4_block is not None and (not isinstance(self.r4_block, int) or isinstance(self.r4_block, bool)
                                          or self.r4_block <= 0):
            raise ValueError(f"r4_block must be a positive int or None, got {self.r4_block!r}")

    @property
    def needed(self) -> bool:
        return self.r4_block is not None

    def to_json(self) -> dict:
        return {"r4_down_proj": self.needed, "r3_qk": False, "r4_block_size": self.r4_block}

    @classmethod
    def from_json(cls, block: Any, where: str) -> "OnlineRotations":
        if not isinstance(block, dict):
            raise ValueError(f"{where}: the online rotations must be an object, got {block!r}")
        if block.get("r3_qk"):
            raise ValueError(f"{where}: online R3 in a checkpoint is not supported (the compiler adds R3 itself)")
        if not block.get("r4_down_proj"):
            return cls()
        r4 = block.get("r4_block_size")
        if not isinstance(r4, int) or isinstance(r4, bool) or r4 <= 0:
            raise ValueError(f"{where}: r4_block_size must be a positive int when r4_down_proj is set, got {r4!r}")
        return cls(r4)

    def metadata(self) -> str:
        """The safetensors metadata value that records this contract beside the tensors."""
        return json.dumps(self.to_json(), sort_keys=True)


@dataclass(frozen=True)
class GPTQSpec:
    """The GPTQ tensors' layout, as ``quantization_config`` states it."""

    bits: int = 4
    group_size: int = 128
    sym: bool = True
    desc_act: bool = False
    checkpoint_format: str = "gptq"  # the zero-point convention: v1 stores zero - 1
    #: Writer's notes kept in ``quantization_config`` for other tools (damp_percent, ...).
    extra: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self):
        if self.bits not in (2, 4, 8):
            raise ValueError(f"bits must be 2, 4 or 8, got {self.bits!r}")
        if not isinstance(self.group_size, int) or not (self.group_size > 0 or self.group_size == -1):
            raise ValueError(f"group_size must be a positive int or -1, got {self.group_size!r}")
        if self.checkpoint_format not in _ZERO_FORMATS:
            raise ValueError(f"checkpoint_format must be one of {_ZERO_FORMATS}, got {self.checkpoint_format!r}")


@dataclass(frozen=True)
class CheckpointConfig:
    """A whole ``config.json``: the model's transformers config, the quantization, the
    runtime contract and the provenance record. :meth:`to_json` / :meth:`from_json` are
    inverses for everything hadacore writes."""

    model: dict  # transformers config fields; model_type is the base one ("llama")
    gptq: GPTQSpec
    online: OnlineRotations = OnlineRotations()
    dtype: torch.dtype = torch.float16
    provenance: dict = field(default_factory=dict)  # the hadacore block minus the contract

    # ------------------------------------------------------------------ writing
    def to_json(self) -> dict:
        cfg = {k: v for k, v in self.model.items() if k not in ("quantization_config", "hadacore", "torch_dtype")}
        g = self.gptq
        qc = {"quant_method": "gptq", "bits": g.bits, "group_size": g.group_size, "desc_act": g.desc_act,
              "sym": g.sym, "checkpoint_format": g.checkpoint_format, **dict(g.extra)}
        hc = {"format_version": FORMAT_VERSION, **self.provenance, "online": self.online.to_json(),
              "r4_block_size": self.online.r4_block, "base_model_type": cfg.get("model_type", "llama")}
        hc["online"].pop("r4_block_size")
        if self.online.needed:  # refused by every loader that would ignore the rotation (module docstring)
            cfg.update(model_type=ROTATED_MODEL_TYPE, architectures=[ROTATED_ARCHITECTURE])
            qc["quant_method"] = ROTATED_QUANT_METHOD
        cfg.update(dtype=str(self.dtype).removeprefix("torch."), quantization_config=qc, hadacore=hc)
        return cfg

    # ------------------------------------------------------------------ reading
    @classmethod
    def from_json(cls, cfg: dict, where: str = "config.json") -> "CheckpointConfig":
        qc = cfg.get("quantization_config")
        if not isinstance(qc, dict):
            raise ValueError(f"{where}: no quantization_config: not a quantized checkpoint")
        method = qc.get("quant_method")
        if method not in ("gptq", ROTATED_QUANT_METHOD):
            raise ValueError(f"{where}: quantization_config.quant_method {method!r} is not supported "
                             f"(expected 'gptq' or {ROTATED_QUANT_METHOD!r})")
        hc = cfg.get("hadacore") or {}
        if not isinstance(hc, dict):
            raise ValueError(f"{where}: the hadacore block must be an object")
        block = {**(hc.get("online") or {}), "r4_block_size": hc.get("r4_block_size")}
        online = OnlineRotations.from_json(block, f"{where} (hadacore.online)")
        model = {k: v for k, v in cfg.items() if k not in ("quantization_config", "hadacore", "dtype", "torch_dtype")}
        if model.get("model_type") == ROTATED_MODEL_TYPE:
            model["model_type"] = hc.get("base_model_type", "llama")
            model["architectures"] = ["LlamaForCausalLM"]
        if model.get("model_type") not in _BASE_MODEL_TYPES:
            raise ValueError(f"{where}: model_type {model.get('model_type')!r} is not a Llama-family model "
                             f"({', '.join(_BASE_MODEL_TYPES)})")
        rotated_marks = (cfg.get("model_type") == ROTATED_MODEL_TYPE, method == ROTATED_QUANT_METHOD)
        if online.needed and not all(rotated_marks) or not online.needed and any(rotated_marks):
            raise ValueError(f"{where}: model_type {cfg.get('model_type')!r} and quant_method {method!r} disagree "
                             f"with the online rotations it declares ({online.to_json()}); the file was edited?")
        try:
            gptq = GPTQSpec(
                bits=int(qc.get("bits", 4)), group_size=int(qc.get("group_size", 128)), sym=bool(qc.get("sym", True)),
                desc_act=bool(qc.get("desc_act", False)),
                checkpoint_format=str(qc.get("checkpoint_format") or qc.get("format") or "gptq").lower(),
                extra=tuple((k, v) for k, v in qc.items() if k not in (
                    "quant_method", "bits", "group_size", "sym", "desc_act", "checkpoint_format", "format")),
            )
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: quantization_config: {e}") from None
        dtype_name = str(cfg.get("dtype") or cfg.get("torch_dtype") or "float16")
        dtype = getattr(torch, dtype_name, None)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"{where}: dtype {dtype_name!r} is not a floating-point torch dtype")
        provenance = {k: v for k, v in hc.items() if k not in ("online", "r4_block_size", "base_model_type")}
        return cls(model=model, gptq=gptq, online=online, dtype=dtype, provenance=provenance)

    @classmethod
    def read(cls, path: str | Path) -> "CheckpointConfig":
        """``path/config.json``, checked against the contract in the tensors' metadata."""
        f = Path(path) / "config.json"
        if not f.exists():
            raise FileNotFoundError(f"{f} not found: not a checkpoint directory")
        return cls.from_json(read_json(f), str(f))

    def check_metadata(self, metadata: dict | None, where: str) -> None:
        """The tensors were written for exactly the online rotations this config declares.

        Checkpoints hadacore did not write (or wrote before format 2) carry no record; then
        only the config speaks for them.
        """
        recorded = (metadata or {}).get(ONLINE_METADATA_KEY)
        if recorded is None:
            return
        try:
            stored = OnlineRotations.from_json(json.loads(recorded), where)
        except (json.JSONDecodeError, ValueError) as e:
            raise ValueError(f"{where}: unreadable {ONLINE_METADATA_KEY} metadata ({e})") from None
        if stored != self.online:
            raise ValueError(
                f"config.json and the tensors of {where} disagree: the tensors were written for online rotations "
                f"{stored.to_json()} but config.json declares {self.online.to_json()}. The config (its hadacore "
                "block, r4_block_size or model_type) was edited; restore it or convert again")

    def transformers_config(self, **overrides):
        """The model's transformers config (the base Llama-family type), with ``overrides``."""
        from transformers import AutoConfig

        fields = {k: v for k, v in self.model.items() if k not in ("model_type", "architectures", "transformers_version")}
        config = AutoConfig.for_model(self.model.get("model_type", "llama"), **fields)
        for k, v in overrides.items():
            setattr(config, k, v)
        return config

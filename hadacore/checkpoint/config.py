"""What a checkpoint's ``config.json`` says about its tensors: written and read in one place.

A hadacore checkpoint is a transformers Llama config plus:

- ``quantization_config``: the standard GPTQ block (bits, group size, ``desc_act``,
  ``sym``, ``checkpoint_format`` = the zero-point convention, v1 ``gptq`` or ``gptq_v2``);
- ``hadacore``: the record of how it was made (provenance: method, rotations, calibration)
  and the *runtime contract*: the online rotations its tensors need (:class:`OnlineRotations`).

The contract is also stored in every safetensors file's metadata (key
:data:`ONLINE_METADATA_KEY`), so a ``config.json`` whose rotations were removed or edited
no longer agrees with its tensors and loading fails instead of computing another model.

Two on-disk formats, chosen by :attr:`CheckpointConfig.format`:

- ``"gptq"``: GPTQ v1 tensors (``qweight``, ``qzeros``, ``scales``, ``g_idx``). A checkpoint
  that needs online rotations must not load as plain GPTQ anywhere: other loaders would
  drop the rotation and compute garbage without a word. Its config therefore says
  ``model_type: "hadacore_llama"`` (transformers, and the GPTQModel, vLLM and SGLang loaders
  that start from transformers' ``AutoConfig``, refuse an unknown model type) and
  ``quant_method: "hadacore"`` (vLLM, SGLang and GPTQModel refuse an unknown method even
  when the model type is overridden). Plain checkpoints are ordinary ``llama`` + ``gptq``.
  Foreign GPTQ checkpoints (GPTQModel, AutoGPTQ: v1 or v2 zeros, ``quantize_config.json``)
  are read too.
- ``"compressed-tensors"``: the ``pack-quantized`` W4A16 scheme vLLM reads
  (:mod:`hadacore.formats.compressed_tensors`), with the online R4 as a ``transform_config``
  input transform of type ``hadamard`` (Sylvester, ``head_dim`` = the block), which vLLM
  applies. transformers' compressed-tensors loader does not apply ``transform_config``.
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
FORMATS = ("gptq", "compressed-tensors")
#: The compressed-tensors version whose reader the exported checkpoints are tested against.
COMPRESSED_TENSORS_VERSION = "0.20.1"
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

    @property
    def zero_layout(self) -> str:
        """How the stored ``qzeros`` read: "gptq" (v1, field + 1, AutoGPTQ/vLLM/hadacore), "gptq_v2"
        (the zero itself) or "gptqmodel_v1" (v1 written by GPTQModel: read word-wise)."""
        meta = dict(self.extra).get("meta") or {}
        quantizer = meta.get("quantizer") if isinstance(meta, dict) else None
        quantizers = [quantizer] if isinstance(quantizer, str) else list(quantizer or [])
        if self.checkpoint_format == "gptq" and any(str(q).startswith("gptqmodel") for q in quantizers):
            return "gptqmodel_v1"
        return self.checkpoint_format

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
    gptq: GPTQSpec  # bits, group size, symmetry (and for "gptq", the GPTQ layout)
    online: OnlineRotations = OnlineRotations()
    dtype: torch.dtype = torch.float16
    provenance: dict = field(default_factory=dict)  # the hadacore block minus the contract
    format: str = "gptq"

    def __post_init__(self):
        if self.format not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, got {self.format!r}")
        if self.format == "compressed-tensors":
            if self.gptq.bits != 4 or self.gptq.desc_act:
                raise ValueError("compressed-tensors export is 4-bit with contiguous groups (no act-order g_idx)")

    # ------------------------------------------------------------------ writing
    def to_json(self) -> dict:
        cfg = {k: v for k, v in self.model.items() if k not in ("quantization_config", "hadacore", "torch_dtype")}
        hc = {"format_version": FORMAT_VERSION, **self.provenance, "online": self.online.to_json(),
              "r4_block_size": self.online.r4_block, "base_model_type": cfg.get("model_type", "llama")}
        hc["online"].pop("r4_block_size")
        if self.format == "compressed-tensors":
            qc = self._compressed_tensors_config()
        else:
            g = self.gptq
            qc = {"quant_method": "gptq", "bits": g.bits, "group_size": g.group_size, "desc_act": g.desc_act,
                  "sym": g.sym, "checkpoint_format": g.checkpoint_format, **dict(g.extra)}
            if self.online.needed:  # refused by every loader that would ignore the rotation (module docstring)
                cfg.update(model_type=ROTATED_MODEL_TYPE, architectures=[ROTATED_ARCHITECTURE])
                qc["quant_method"] = ROTATED_QUANT_METHOD
        cfg.update(dtype=str(self.dtype).removeprefix("torch."), quantization_config=qc, hadacore=hc)
        return cfg

    def _compressed_tensors_config(self) -> dict:
        """``quantization_config`` as compressed-tensors writes it for W4A16 ``pack-quantized``."""
        g = self.gptq
        weights = {"actorder": "weight" if dict(g.extra).get("actorder") else None, "dynamic": False,
                   "group_size": None if g.group_size == -1 else g.group_size, "num_bits": 4,
                   "strategy": "channel" if g.group_size == -1 else "group", "symmetric": g.sym, "type": "int"}
        qc = {
            "config_groups": {"group_0": {"format": "pack-quantized", "input_activations": None,
                                          "output_activations": None, "targets": ["Linear"], "weights": weights}},
            "format": "pack-quantized", "global_compression_ratio": None, "ignore": ["lm_head"],
            "kv_cache_scheme": None, "quant_method": "compressed-tensors", "quantization_status": "compressed",
            "sparsity_config": {}, "version": COMPRESSED_TENSORS_VERSION,
        }
        if self.online.needed:
            k = int(self.model["intermediate_size"])
            targets = ["re:.*down_proj$"]
            qc["transform_config"] = {"config_groups": {"R4": {
                "apply": [{"ignore": [], "inverse": False, "location": "input", "targets": targets},
                          {"ignore": [], "inverse": True, "location": "weight_input", "targets": targets}],
                "head_dim": None if self.online.r4_block == k else self.online.r4_block,
                "precision": "torch.float32", "randomize": False, "requires_grad": False, "type": "hadamard"}}}
        return qc

    # ------------------------------------------------------------------ reading
    @classmethod
    def from_json(cls, cfg: dict, where: str = "config.json") -> "CheckpointConfig":
        qc = cfg.get("quantization_config")
        if not isinstance(qc, dict):
            raise ValueError(f"{where}: no quantization_config: not a quantized checkpoint")
        method = qc.get("quant_method")
        if method not in ("gptq", ROTATED_QUANT_METHOD, "compressed-tensors"):
            raise ValueError(f"{where}: quantization_config.quant_method {method!r} is not supported "
                             f"(expected 'gptq', {ROTATED_QUANT_METHOD!r} or 'compressed-tensors')")
        hc = cfg.get("hadacore") or {}
        if not isinstance(hc, dict):
            raise ValueError(f"{where}: the hadacore block must be an object")
        model = {k: v for k, v in cfg.items() if k not in ("quantization_config", "hadacore", "dtype", "torch_dtype")}
        if model.get("model_type") == ROTATED_MODEL_TYPE:
            model["model_type"] = hc.get("base_model_type", "llama")
            model["architectures"] = ["LlamaForCausalLM"]
        if model.get("model_type") not in _BASE_MODEL_TYPES:
            raise ValueError(f"{where}: model_type {model.get('model_type')!r} is not a Llama-family model "
                             f"({', '.join(_BASE_MODEL_TYPES)})")
        dtype_name = str(cfg.get("dtype") or cfg.get("torch_dtype") or "float16")
        dtype = getattr(torch, dtype_name, None)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"{where}: dtype {dtype_name!r} is not a floating-point torch dtype")
        provenance = {k: v for k, v in hc.items() if k not in ("online", "r4_block_size", "base_model_type")}
        if method == "compressed-tensors":
            gptq, online = _read_compressed_tensors(qc, model, where)
            return cls(model=model, gptq=gptq, online=online, dtype=dtype, provenance=provenance,
                       format="compressed-tensors")
        block = {**(hc.get("online") or {}), "r4_block_size": hc.get("r4_block_size")}
        online = OnlineRotations.from_json(block, f"{where} (hadacore.online)")
        rotated_marks = (cfg.get("model_type") == ROTATED_MODEL_TYPE, method == ROTATED_QUANT_METHOD)
        if online.needed and not all(rotated_marks) or not online.needed and any(rotated_marks):
            raise ValueError(f"{where}: model_type {cfg.get('model_type')!r} and quant_method {method!r} disagree "
                             f"with the online rotations it declares ({online.to_json()}); the file was edited?")
        return cls(model=model, gptq=_read_gptq(qc, where), online=online, dtype=dtype, provenance=provenance)

    @classmethod
    def read(cls, path: str | Path) -> "CheckpointConfig":
        """``path/config.json`` (with AutoGPTQ's ``quantize_config.json`` when the config has no
        ``quantization_config``); loading checks it against the tensors' metadata."""
        f = Path(path) / "config.json"
        if not f.exists():
            raise FileNotFoundError(f"{f} not found: not a checkpoint directory")
        cfg = read_json(f)
        side = Path(path) / "quantize_config.json"
        if "quantization_config" not in cfg and side.exists():
            cfg["quantization_config"] = {"quant_method": "gptq", **read_json(side)}
        return cls.from_json(cfg, str(f))

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


def _read_gptq(qc: dict, where: str) -> GPTQSpec:
    """GPTQ's ``quantization_config`` as hadacore, AutoGPTQ, GPTQModel and transformers write it
    (``format`` / ``checkpoint_format``: ``gptq`` = v1 zeros, ``gptq_v2`` = zeros as they are)."""
    fmt = str(qc.get("checkpoint_format") or qc.get("format") or "gptq").lower()
    if fmt not in _ZERO_FORMATS:
        raise ValueError(f"{where}: GPTQ checkpoint_format {fmt!r} is not supported (expected one of {_ZERO_FORMATS})")
    try:
        return GPTQSpec(
            bits=int(qc.get("bits", 4)), group_size=int(qc.get("group_size", 128)), sym=bool(qc.get("sym", True)),
            desc_act=bool(qc.get("desc_act", False)), checkpoint_format=fmt,
            extra=tuple((k, v) for k, v in qc.items() if k not in (
                "quant_method", "bits", "group_size", "sym", "desc_act", "checkpoint_format", "format")),
        )
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: quantization_config: {e}") from None


def _matches_down_proj(targets: Any) -> bool:
    targets = [targets] if isinstance(targets, str) else list(targets or [])
    return bool(targets) and all(t in ("re:.*down_proj$", "re:.*down_proj", "down_proj") for t in targets)


def _read_compressed_tensors(qc: dict, model: dict, where: str) -> tuple[GPTQSpec, OnlineRotations]:
    """The W4A16 ``pack-quantized`` schemes hadacore runs, and the one online transform it
    applies (R4: a Sylvester ``input`` transform on down_proj). Anything else is refused by
    name: a reader that ignored it would compute another model."""
    groups = qc.get("config_groups") or {}
    if len(groups) != 1:
        raise ValueError(f"{where}: compressed-tensors checkpoints with {len(groups)} config groups are not "
                         "supported (expected one W4A16 scheme targeting Linear)")
    scheme = next(iter(groups.values()))
    w = scheme.get("weights") or {}
    fmt = scheme.get("format") or qc.get("format")
    unsupported = []
    if fmt != "pack-quantized":
        unsupported.append(f"format {fmt!r}")
    if scheme.get("input_activations") or scheme.get("output_activations"):
        unsupported.append("quantized activations")
    if w.get("num_bits") != 4 or w.get("type", "int") != "int" or w.get("dynamic"):
        unsupported.append(f"weights {w.get('num_bits')}-bit {w.get('type')} dynamic={w.get('dynamic')}")
    if w.get("strategy") not in ("group", "channel"):
        unsupported.append(f"strategy {w.get('strategy')!r}")
    if w.get("actorder") not in (None, "weight", "static"):
        unsupported.append(f"actorder {w.get('actorder')!r} (g_idx)")
    if [t for t in scheme.get("targets", ["Linear"]) if t != "Linear"]:
        unsupported.append(f"targets {scheme.get('targets')}")
    if unsupported:
        raise ValueError(f"{where}: this compressed-tensors scheme is not supported: {', '.join(unsupported)}")
    gptq = GPTQSpec(bits=4, group_size=-1 if w["strategy"] == "channel" else int(w["group_size"]),
                    sym=bool(w.get("symmetric", True)), extra=(("actorder", w.get("actorder")),))
    r4 = None
    for name, t in ((qc.get("transform_config") or {}).get("config_groups") or {}).items():
        for apply in t.get("apply", []):
            if apply.get("location") in ("weight_input", "weight_output"):
                continue  # fused into the weights when the checkpoint was written
            intermediate = int(model.get("intermediate_size", 0))
            block = t.get("head_dim") or intermediate
            if not (apply.get("location") == "input" and _matches_down_proj(apply.get("targets"))
                    and t.get("type") == "hadamard" and not t.get("randomize") and not apply.get("inverse")
                    and block and block & (block - 1) == 0 and intermediate % block == 0):
                raise ValueError(
                    f"{where}: transform {name!r} ({t.get('type')} at {apply.get('location')} of "
                    f"{apply.get('targets')}) is not supported: hadacore applies one online transform, a Sylvester "
                    "'hadamard' input transform of down_proj (R4)")
            r4 = block
    return gptq, OnlineRotations(r4)

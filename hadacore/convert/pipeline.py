"""The offline pipeline: fold norms -> rotate -> quantize layer by layer -> permute -> save.

:func:`quantize_model` builds the quantized model in memory (a transformers model whose
linears are :class:`~hadacore.quant.linear.QuantLinear`); :func:`convert` adds loading
the source and writing the checkpoint.

Act-order and tensor parallelism (DESIGN.md, "Act-order and TP-aware permutation"):

- q/k/v/gate/up are column-parallel (every rank sees the whole input), so they use
  plain global act-order (an unsorted ``g_idx``, as any desc_act GPTQ checkpoint).
- down_proj without R4: global act-order, then the TP-aware permutation: down's input
  columns are sorted by group (``g_idx`` becomes sorted) and gate/up's output rows are
  permuted the same way, so the gather on down's input disappears exactly; every TP
  degree then shards down_proj along K into self-contained groups.
- down_proj with R4: the permutation cannot pass through the online Hadamard, so the
  ordering is shard-local (blocks of ``K / tp`` columns, each sorted by ``diag H`` on its
  own) and the R4 Hadamard is block-diagonal per shard; ``g_idx`` stays unsorted
  inside each shard (the runtime folds that gather into the Hadamard's store).
- o_proj: act-order within each head when ``head_dim`` is a multiple of the group
  size (groups never straddle heads, so any head-aligned TP split is self-contained),
  else within each TP shard.
- Per-channel (``group_size=-1``): one group, ``g_idx`` is all zeros and already
  sorted: plain global act-order everywhere.
"""

from __future__ import annotations

import copy
import logging
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from hadacore.checkpoint.config import CheckpointConfig, GPTQSpec, OnlineRotations
from hadacore.convert.learn import ROTATIONS_FILE, LearnedRotations, LearnOptions, hadamard_start, learn_rotations
from hadacore.convert.modules import OnlineHadamardLinear
from hadacore.convert.rotate import fold_norms, random_signs, rotate_r1, rotate_r2, rotate_r4_weights
from hadacore.convert.source import ModelShape, check_finite, check_sizes, model_shape
from hadacore.convert.tune import TuneOptions, tune_scales
from hadacore.quant.gptq import HessianAccumulator, act_order_perm_from_hessian, gptq_quantize
from hadacore.quant.linear import QuantLinear
from hadacore.quant.act_order import fold_into_gate_up
from hadacore.quant.rtn import rtn_gptq_tensors
from hadacore.options import ROTATIONS, check_rotate, folds_r1_r2, has_online_r4

__all__ = ["ConvertOptions", "QuantizedModel", "rotate_model", "quantize_model"]

log = logging.getLogger(__name__)

METHODS = ("gptq", "rtn")
FORMATS = ("gptq", "compressed-tensors")
#: The converter takes every rotation setting (hadacore.options.ROTATIONS, shared with the compiler).
CONVERTER_ROTATIONS = ROTATIONS
_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ConvertOptions:
    bits: int = 4
    group_size: int = 128
    # Symmetric grids (zero 8) by default: what every GPTQ kernel takes (vLLM's Marlin needs it).
    # Asymmetric: SmolLM2-135M W4 g64 rotate=full GPTQ 24.68 -> 24.23 ppl (fp32 22.03).
    sym: bool = True
    method: str = "gptq"
    act_order: bool = True
    rotate: str = "offline"
    tp: int = 1
    samples: int = 128
    seqlen: int = 512
    seed: int = 0
    dtype: torch.dtype = torch.float16
    percdamp: float = 0.01
    batch_size: int = 8
    # Per-group clip search of the grid (GPTQ's mse=True / QuaRot's w_clip). On SmolLM2-135M,
    # W4 g64 rotate=full: GPTQ 25.87 -> 25.63 ppl, RTN 52.68 -> 42.18 (fp32 22.03).
    w_clip: bool = True
    # Group grids from the weight before GPTQ's updates (AutoGPTQ's static_groups): g_idx stays
    # sorted. Measured worse on SmolLM2 (24.68 -> 25.15), so off.
    static_groups: bool = False
    # GPTAQ (GPTQv2, Li et al. 2025): match each layer's output to the fp model's, not to its own
    # fp output on the quantized inputs; ``gptaq_alpha`` scales the extra update as the reference.
    # SmolLM2: 24.68 -> 24.24 at alpha 0.25 (24.82 at alpha 1), ~1.4x the GPTQ time. Off by
    # default: it also keeps the fp model's inputs of q/o/gate/down for one layer in memory
    # (about 3 hidden-size + 1 intermediate-size activations per calibration token).
    gptaq: bool = False
    gptaq_alpha: float = 0.25
    # "gptq": GPTQ v1 tensors (act-order with g_idx); "compressed-tensors": what vLLM reads (no
    # g_idx: act-order runs with static groups; R4 as a Sylvester transform, TP=1).
    format: str = "gptq"
    # How R1/R2 are learned with rotate="learned" (hadacore.convert.learn).
    learn: LearnOptions = LearnOptions()
    # End-to-end scale tuning after quantization (hadacore.convert.tune); steps=0: off.
    tune: TuneOptions = TuneOptions()

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        check_rotate(self.rotate, CONVERTER_ROTATIONS, "hadacore.convert")
        if self.bits not in (2, 4, 8):
            raise ValueError(f"bits must be 2, 4 or 8, got {self.bits}")
        if self.group_size != -1 and self.group_size <= 0:
            raise ValueError(f"group_size must be positive or -1 (per-channel), got {self.group_size}")
        if not isinstance(self.tp, int) or self.tp < 1:
            raise ValueError(f"tp must be a positive int, got {self.tp!r}")
        if self.samples < 1 or self.seqlen < 1 or self.batch_size < 1:
            raise ValueError("samples, seqlen and batch_size must be positive")
        if self.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"dtype must be float16, bfloat16 or float32, got {self.dtype}")
        if not 0 <= self.percdamp < 1:
            raise ValueError(f"percdamp must lie in [0, 1), got {self.percdamp}")
        if self.gptaq_alpha < 0:
            raise ValueError(f"gptaq_alpha must be >= 0, got {self.gptaq_alpha}")
        if self.method != "gptq" and (self.static_groups or self.gptaq):
            raise ValueError("static_groups and gptaq are options of method='gptq'")
        if not isinstance(self.learn, LearnOptions):
            raise TypeError(f"learn must be a hadacore.convert.LearnOptions, got {type(self.learn).__name__}")
        if not isinstance(self.tune, TuneOptions):
            raise TypeError(f"tune must be a hadacore.convert.TuneOptions, got {type(self.tune).__name__}")
        if self.format not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, got {self.format!r}")
        if self.format == "compressed-tensors":
            if self.bits != 4:
                raise ValueError("format='compressed-tensors': hadacore exports 4-bit weights (W4A16) only")
            if self.uses_act_order and not self.static_groups:
                raise ValueError("format='compressed-tensors' has no g_idx: act-order needs static_groups=True "
                                 "(hadacore.convert sets it for you)")
            if self.has_r4 and self.tp != 1:
                raise ValueError("format='compressed-tensors' with an online R4: vLLM applies online transforms at "
                                 "tensor-parallel size 1 only; convert with tp=1 or format='gptq'")

    @property
    def uses_act_order(self) -> bool:
        return self.method == "gptq" and self.act_order

    def reads_calibration(self, learning: bool = True) -> bool:
        """Whether any stage reads calibration text: GPTQ, rotation learning (``learning``:
        rotate="learned" without given rotations) or scale tuning."""
        return self.method == "gptq" or (learning and self.rotate == "learned") or self.tune.steps > 0

    def calibration_windows(self, learning: bool = True) -> int:
        """How many ``seqlen``-token windows to draw: GPTQ's first ``samples``, then scale
        tuning's own windows after them (text GPTQ did not fit), and at least what rotation
        learning cuts into its sequences (it runs before GPTQ and reads the whole draw)."""
        n = self.samples
        if self.tune.steps > 0:
            n += math.ceil(self.tune.samples * self.tune.seqlen / self.seqlen)
        if learning and self.rotate == "learned":
            n = max(n, math.ceil(self.learn.samples * self.learn.seqlen / self.seqlen))
        return n

    @property
    def has_r4(self) -> bool:
        """R4 on down_proj (weight offline, input online at run time)."""
        return has_online_r4(self.rotate)

    def r4_block(self, intermediate: int) -> int | None:
        """R4's block: ``intermediate / tp`` (a shard-local rotation per rank), or for
        compressed-tensors the largest power of two dividing it (Sylvester, which that format
        names exactly and vLLM runs with its Hadamard kernel)."""
        if not self.has_r4:
            return None
        if self.format == "compressed-tensors":
            return intermediate & -intermediate
        return intermediate // self.tp


@dataclass
class QuantizedModel:
    model: nn.Module
    shape: ModelShape
    options: ConvertOptions
    plan: dict = field(default_factory=dict)  # how act-order was handled per layer kind
    rotations: LearnedRotations | None = None  # rotate="learned": the folded R1/R2 and their record
    calibration_shape: tuple[int, int] | None = None  # [samples, seqlen] of the calibration ids used
    scale_tuning: dict | None = None  # the record of end-to-end scale tuning, when it ran

    @property
    def online(self) -> OnlineRotations:
        """What the checkpoint's tensors need at run time: R4's block on down_proj's input."""
        return OnlineRotations(self.options.r4_block(self.shape.intermediate))

    def checkpoint_config(self, source: str = "", calibration: str | None = None) -> CheckpointConfig:
        """config.json of the converted model (``calibration``: what the GPTQ calibration
        text was, recorded with the provenance)."""
        o = self.options
        model = self.model.config.to_dict()
        for key in ("quantization_config", "_name_or_path", "transformers_version", "torch_dtype", "dtype"):
            model.pop(key, None)
        model["tie_word_embeddings"] = False  # R1 unties lm_head from the embedding
        model["architectures"] = [type(self.model).__name__]  # the source's: Qwen2 keeps its q/k/v biases
        if o.format == "compressed-tensors":  # act-order ran with static groups: metadata only ("weight")
            gptq = GPTQSpec(bits=o.bits, group_size=o.group_size, sym=o.sym,
                            extra=(("actorder", "weight" if o.uses_act_order else None),))
        else:
            gptq = GPTQSpec(
                bits=o.bits, group_size=o.group_size, sym=o.sym, desc_act=o.uses_act_order and not o.static_groups,
                checkpoint_format="gptq",
                extra=(("true_sequential", True), ("damp_percent", o.percdamp), ("static_groups", o.static_groups),
                       ("lm_head", False)),
            )
        r12 = folds_r1_r2(o.rotate)
        if o.rotate == "learned":
            r1_r2 = {"kind": "learned", "file": ROTATIONS_FILE, **self.rotations.record}
        else:
            r1_r2 = {"kind": "random_hadamard", "seed": o.seed} if r12 else None
        provenance = {
            "source": source,
            "method": o.method,
            "rotate": o.rotate,
            "rotations": {"r1": r12, "r2": r12, "r4_weight": o.has_r4},
            "r1_r2": r1_r2,
            "tp_planned": o.tp,
            "act_order": self.plan,
            "w_clip": o.w_clip,
            "gptaq": {"alpha": o.gptaq_alpha} if o.gptaq else None,
            "scale_tuning": self.scale_tuning,
            # windows drawn; GPTQ read the first `gptq_samples`, tuning the ones after them
            "calibration": ({"samples": self.calibration_shape[0], "seqlen": self.calibration_shape[1],
                             "gptq_samples": min(o.samples, self.calibration_shape[0]) if o.method == "gptq" else 0,
                             "seed": o.seed, "text": calibration} if self.calibration_shape else None),
        }
        return CheckpointConfig(model=model, gptq=gptq, online=self.online, dtype=o.dtype, provenance=provenance,
                                format=o.format)


# --------------------------------------------------------------------------- rotation


def rotate_model(model: nn.Module, *, rotate: str, seed: int = 0, r4_block: int | None = None,
                 rotations: LearnedRotations | None = None) -> None:
    """Fold norms, untie, and apply the offline rotations of ``rotate`` in place (fp, exact).

    ``rotate="learned"`` folds the given learned ``rotations``; without them it stops after the
    norms and R4, the model :func:`~hadacore.convert.learn.learn_rotations` trains R1/R2 on.
    """
    shape = model_shape(model.config)
    fold_norms(model)
    if has_online_r4(rotate):  # first: R4 acts on down_proj's input, R1/R2 on other dims (they commute)
        k = shape.intermediate
        rotate_r4_weights(model, blocks=k // (r4_block or k))
    if rotate == "learned":
        if rotations is not None:
            rotations.check(shape.hidden, shape.head_dim, shape.layers)
            rotate_r1(model, matrix=rotations.r1)
            rotate_r2(model, shape.head_dim, matrices=rotations.r2)
    elif folds_r1_r2(rotate):
        rotate_r1(model, random_signs(shape.hidden, seed))
        rotate_r2(model, shape.head_dim)


def _training_windows(calibration_ids: torch.Tensor, samples: int, seqlen: int, what: str) -> torch.Tensor:
    """Sequences for rotation learning or scale tuning: the calibration ids cut into ``seqlen`` windows."""
    n, t = calibration_ids.shape
    if t < seqlen:
        raise ValueError(f"{what} uses {seqlen}-token sequences; the calibration ids have {t}")
    windows = calibration_ids[:, : t // seqlen * seqlen].reshape(-1, seqlen)
    if windows.shape[0] < samples:
        log.warning("%s: %d calibration sequences of %d tokens, fewer than the %d asked for",
                    what, windows.shape[0], seqlen, samples)
    return windows[:samples]


# --------------------------------------------------------------------------- quantization


class _Stop(Exception):
    """Raised by a hook to end a calibration forward once the wanted inputs are seen."""


def _float_linear(module: nn.Module) -> nn.Linear:
    return module.linear if isinstance(module, OnlineHadamardLinear) else module


@torch.no_grad()
def _capture_layer0_inputs(model: nn.Module, ids: torch.Tensor, batch_size: int) -> list[tuple[torch.Tensor, dict]]:
    """``(hidden_states, kwargs)`` of the first decoder layer for each calibration batch."""
    captured: list[tuple[torch.Tensor, dict]] = []

    def hook(_mod, args, kwargs):
        kwargs = dict(kwargs)
        h = args[0] if args else kwargs.pop("hidden_states")
        captured.append((h.detach(), kwargs))
        raise _Stop

    handle = model.model.layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in ids.split(batch_size):
            try:
                model(input_ids=batch, use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return captured


def _layer_out(out) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def _fp_layer_pass(layer: nn.Module, fp_inps, targets: dict[str, nn.Module]) -> tuple[list, dict[str, list[torch.Tensor]]]:
    """The fp layer on the fp model's hidden states: its outputs and each target's inputs per batch."""
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in targets}
    handles = [m.register_forward_pre_hook(lambda _m, args, name=name: seen[name].append(args[0].detach()))
               for name, m in targets.items()]
    try:
        outs = [(_layer_out(layer(h, **kw)), kw) for h, kw in fp_inps]
    finally:
        for h in handles:
            h.remove()
    return outs, seen


@torch.no_grad()
def _hessian(layer: nn.Module, inps, target: nn.Linear, fp_inputs: list[torch.Tensor] | None = None) -> HessianAccumulator:
    """Hessian of ``target``'s inputs over the calibration set; the forward stops right there.

    ``fp_inputs``: the same inputs in the fp model, one per batch (GPTAQ's ``dXXT`` too).
    """
    acc = HessianAccumulator(target.in_features, asymmetric=fp_inputs is not None)
    batch = iter(fp_inputs or ())

    def hook(_mod, args):
        acc.add(args[0], next(batch) if fp_inputs is not None else None)
        raise _Stop

    handle = target.register_forward_pre_hook(hook)
    try:
        for h, kw in inps:
            try:
                layer(h, **kw)
            except _Stop:
                pass
    finally:
        handle.remove()
    return acc


class _LayerQuantizer:
    """Quantizes one decoder layer (RTN, or GPTQ true-sequentially: q/k/v, o, gate/up, down)."""

    def __init__(self, opts: ConvertOptions, shape: ModelShape):
        self.o, self.shape = opts, shape
        self.r4_block = opts.r4_block(shape.intermediate)

    def _bias(self, lin: nn.Linear):
        return None if lin.bias is None else lin.bias.detach().to(self.o.dtype).clone()

    def _install(self, parent: nn.Module, name: str, tensors: dict, bias, r4: bool = False) -> None:
        block = self.r4_block if r4 else None
        k = tensors["qweight"].shape[0] * 32 // self.o.bits
        setattr(parent, name, QuantLinear.from_tensors(
            tensors, group_size=self.o.group_size, bits=self.o.bits, bias=bias, online_hadamard=block is not None,
            hadamard_block=None if block == k else block, name=name,
        ))

    def _gptq(self, lin: nn.Linear, acc: HessianAccumulator, perm: torch.Tensor | None = None) -> dict:
        return gptq_quantize(
            lin.weight, acc.H, bits=self.o.bits, group_size=self.o.group_size, act_order=self.o.act_order,
            sym=self.o.sym, perm=perm, percdamp=self.o.percdamp, scale_dtype=self.o.dtype, clip=self.o.w_clip,
            static_groups=self.o.static_groups, dXXT=acc.dXXT, alpha=self.o.gptaq_alpha,
        )

    def rtn(self, layer: nn.Module) -> None:
        for parent, names in ((layer.self_attn, _ATTN), (layer.mlp, _MLP)):
            for name in names:
                lin = _float_linear(getattr(parent, name))
                t = rtn_gptq_tensors(lin.weight.detach(), self.o.bits, self.o.group_size, self.o.sym,
                                     scale_dtype=self.o.dtype, clip=self.o.w_clip)
                self._install(parent, name, t, self._bias(lin), r4=name == "down_proj")

    def gptq(self, layer: nn.Module, inps, step, fp_inps=None):
        """Quantize ``layer`` given its calibration inputs ``inps``; with GPTAQ, ``fp_inps`` are the
        fp model's hidden states at this layer, and the fp model's next ones are returned."""
        o, s = self.o, self.shape
        at, mlp = layer.self_attn, layer.mlp
        per_channel = o.group_size == -1
        ordered = o.act_order
        down = mlp.down_proj
        fp_seen: dict[str, list[torch.Tensor]] = {}
        if fp_inps is not None:
            step("fp forward")
            targets = {"q_proj": at.q_proj, "o_proj": at.o_proj, "gate_proj": mlp.gate_proj, "down_proj": _float_linear(down)}
            fp_inps, fp_seen = _fp_layer_pass(layer, fp_inps, targets)

        def hessian(target: nn.Linear, name: str) -> HessianAccumulator:
            return _hessian(layer, inps, target, fp_seen.pop(name) if fp_inps is not None else None)

        step("q/k/v")
        acc = hessian(at.q_proj, "q_proj")
        for name in ("q_proj", "k_proj", "v_proj"):
            lin = getattr(at, name)
            self._install(at, name, self._gptq(lin, acc), self._bias(lin))

        step("o_proj")
        acc = hessian(at.o_proj, "o_proj")
        perm = None
        if ordered and not per_channel:
            blocks = s.heads if s.head_dim % o.group_size == 0 else o.tp
            perm = act_order_perm_from_hessian(acc.H, blocks=blocks)
        self._install(at, "o_proj", self._gptq(at.o_proj, acc, perm), None)

        step("gate/up")
        acc = hessian(mlp.gate_proj, "gate_proj")
        gate_up = {name: self._gptq(getattr(mlp, name), acc) for name in ("gate_proj", "up_proj")}
        for name, t in gate_up.items():
            self._install(mlp, name, t, None)

        step("down_proj")
        acc = hessian(_float_linear(down), "down_proj")
        if self.r4_block is not None:
            perm = act_order_perm_from_hessian(acc.H, blocks=o.tp) if ordered and not per_channel else None
            self._install(mlp, "down_proj", self._gptq(_float_linear(down), acc, perm), None, r4=True)
            return fp_inps
        t = self._gptq(down, acc)
        if ordered and not per_channel:
            # TP-aware permutation: sort down's columns by group, fold the gather into gate/up.
            gate, up, t = fold_into_gate_up(gate_up["gate_proj"], gate_up["up_proj"], t, o.bits)
            self._install(mlp, "gate_proj", gate, None)
            self._install(mlp, "up_proj", up, None)
        self._install(mlp, "down_proj", t, None)
        return fp_inps


def _act_order_plan(o: ConvertOptions, shape: ModelShape) -> dict:
    if not o.uses_act_order:
        return {"qkv_gate_up": "none", "o_proj": "none", "down_proj": "none"}
    if o.group_size == -1:
        return {"qkv_gate_up": "global", "o_proj": "global", "down_proj": "global (per-channel: g_idx all zero)"}
    if o.static_groups:
        return {"qkv_gate_up": "global", "o_proj": "global", "down_proj": "global",
                "g_idx": "sorted (static groups: columns keep their natural groups)"}
    o_proj = "head_local" if shape.head_dim % o.group_size == 0 else ("tp_shard_local" if o.tp > 1 else "global")
    if o.has_r4:
        down = "tp_shard_local (unsorted g_idx within each shard)" if o.tp > 1 else "global (unsorted g_idx)"
    else:
        down = "tp_aware_permutation (down_proj g_idx sorted; gate/up rows permuted)"
    return {"qkv_gate_up": "global", "o_proj": o_proj, "down_proj": down}


@torch.no_grad()
def quantize_model(model: nn.Module, opts: ConvertOptions, calibration_ids: torch.Tensor | None = None, *,
                   rotations: LearnedRotations | None = None, progress: bool | None = None) -> QuantizedModel:
    """Rotate and quantize ``model`` (fp32, modified in place) into a QuantLinear model in ``opts.dtype``.

    ``rotate="learned"``: R1/R2 are learned on ``calibration_ids`` first, unless ``rotations``
    (from an earlier run) are given. GPTQ calibrates on the first ``opts.samples`` rows of
    ``calibration_ids``, scale tuning on the rows after them, learning on all of them
    (:meth:`ConvertOptions.calibration_windows` says how many to draw). Streams layer by layer: calibration activations flow
    through layer ``i`` after layers ``< i`` are quantized, and each layer's float weights are
    dropped once it is done.
    """
    from tqdm.auto import tqdm

    shape = model_shape(model.config)
    check_sizes(shape, rotate=opts.rotate, tp=opts.tp, group_size=opts.group_size)
    check_finite(model)
    if rotations is not None and opts.rotate != "learned":
        raise ValueError(f"learned rotations were given, but rotate={opts.rotate!r}: use rotate='learned'")
    learning = opts.rotate == "learned" and rotations is None
    tuning = opts.tune.steps > 0
    if opts.reads_calibration(learning):
        if calibration_ids is None:
            raise ValueError("GPTQ, rotation learning and scale tuning need calibration token ids")
        if calibration_ids.dim() != 2 or calibration_ids.dtype != torch.long:
            raise ValueError(f"calibration ids must be a LongTensor [samples, seqlen], got {calibration_ids.dtype} {tuple(calibration_ids.shape)}")
    model = model.float().eval()
    teacher = copy.deepcopy(model) if tuning else None  # the fp model scale tuning matches
    rotate_model(model, rotate=opts.rotate, seed=opts.seed, r4_block=opts.r4_block(shape.intermediate),
                 rotations=rotations)
    if learning:
        with torch.enable_grad():
            rotations = learn_rotations(
                model, _training_windows(calibration_ids, opts.learn.samples, opts.learn.seqlen, "rotation learning"),
                bits=opts.bits, group_size=opts.group_size,
                sym=opts.sym, opts=opts.learn, start=hadamard_start(shape.hidden, shape.head_dim, shape.layers, opts.seed),
                head_dim=shape.head_dim, progress=progress)
        rotations.record["start"] = {"kind": "random_hadamard", "seed": opts.seed}
        rotate_r1(model, matrix=rotations.r1)
        rotate_r2(model, shape.head_dim, matrices=rotations.r2)
    plan = _act_order_plan(opts, shape)
    quantizer = _LayerQuantizer(opts, shape)

    # GPTQ calibrates on the first `samples` windows; learning and tuning may have drawn more.
    inps = _capture_layer0_inputs(model, calibration_ids[:opts.samples], opts.batch_size) if opts.method == "gptq" else None
    fp_inps = list(inps) if opts.method == "gptq" and opts.gptaq else None
    layers = model.model.layers
    bar = tqdm(total=len(layers), desc=f"{opts.method} w{opts.bits}g{opts.group_size}", unit="layer", disable=None if progress is None else not progress)
    for i, layer in enumerate(layers):
        def step(name: str, i=i) -> None:
            bar.set_postfix_str(f"layer {i}: {name}")
            log.debug("layer %d: %s", i, name)

        if opts.method == "rtn":
            quantizer.rtn(layer)
        else:
            fp_inps = quantizer.gptq(layer, inps, step, fp_inps)
            step("forward")
            inps = [(_layer_out(layer(h, **kw)), kw) for h, kw in inps]
        bar.update(1)
    bar.close()
    tuned = None
    if tuning:
        with torch.enable_grad():
            # Tuning on GPTQ's own windows corrects the text GPTQ already fit: it takes the
            # windows after them (measured: 23.18 ppl on a pool sharing them, 23.08 on other text).
            rest = calibration_ids[opts.samples:]
            if rest.shape[0] == 0:
                log.warning("scale tuning: no calibration windows beyond GPTQ's %d; tuning on GPTQ's own", opts.samples)
                rest = calibration_ids
            tuned = tune_scales(model, teacher, _training_windows(rest, opts.tune.samples, opts.tune.seqlen,
                                                                   "scale tuning"), opts.tune, progress=progress)
        del teacher
    model.to(opts.dtype)
    log.info("quantized %d layers (%s, %d-bit, group %d, rotate=%s, tp=%d)", len(layers), opts.method, opts.bits, opts.group_size, opts.rotate, opts.tp)
    used = tuple(calibration_ids.shape) if opts.reads_calibration(learning) else None
    return QuantizedModel(model, shape, opts, plan, rotations, used, tuned)


# --------------------------------------------------------------------------- end to end


def _calibration_ids(calibration, tokenizer, opts: ConvertOptions, windows: int) -> torch.Tensor:
    """Token ids ``[windows, seqlen]`` from any accepted ``calibration`` value (token ids as given)."""
    from hadacore import data

    if isinstance(calibration, torch.Tensor):
        if calibration.dim() != 2 or calibration.dtype != torch.long:
            raise ValueError(f"calibration token ids must be a LongTensor [samples, seqlen], got {calibration.dtype} {tuple(calibration.shape)}")
        return calibration
    if tokenizer is None:
        raise ValueError("the source has no tokenizer: pass calibration as a LongTensor [samples, seqlen] of token ids")
    if calibration is None or calibration == "packaged":
        text = None
    elif isinstance(calibration, str) and calibration in data.CALIBRATION_SOURCES:
        text = data.CALIBRATION_SOURCES[calibration]()
    elif isinstance(calibration, (str, Path)):
        p = Path(calibration)
        if not p.is_file():
            raise FileNotFoundError(f"calibration file {p} not found (pass a text file, a list of strings, token ids, or None)")
        text = p.read_text(encoding="utf-8")
    elif isinstance(calibration, (list, tuple)) and all(isinstance(t, str) for t in calibration):
        text = list(calibration)
    else:
        raise TypeError(f"calibration must be a text file path, a list of strings, a LongTensor or None, got {type(calibration).__name__}")
    return data.calibration_tokens(tokenizer, samples=windows, seqlen=opts.seqlen, seed=opts.seed, text=text)


def _describe_calibration(calibration) -> str:
    """What the calibration tokens came from, for the config's record."""
    if calibration is None or calibration == "packaged":
        return "packaged:lee"
    if isinstance(calibration, torch.Tensor):
        return "token ids"
    from hadacore.data import CALIBRATION_SOURCES

    if isinstance(calibration, str) and calibration in CALIBRATION_SOURCES:
        return f"packaged:{calibration}"
    if isinstance(calibration, (str, Path)):
        return f"file:{Path(calibration).name}"
    return "list of strings"


def convert(
    model_or_path,
    out_dir: str | Path,
    *,
    bits: int = 4,
    group_size: int = 128,
    method: str = "gptq",
    act_order: bool = True,
    rotate: str = "offline",
    tp: int = 1,
    calibration=None,
    samples: int = 128,
    seqlen: int = 512,
    seed: int = 0,
    w_clip: bool = True,
    sym: bool = True,
    static_groups: bool = False,
    gptaq: bool = False,
    gptaq_alpha: float = 0.25,
    percdamp: float = 0.01,
    force: bool = False,
    dtype: torch.dtype = torch.float16,
    format: str = "gptq",
    learn: LearnOptions | None = None,
    rotation_from: str | Path | None = None,
    tune: TuneOptions | None = None,
    tokenizer=None,
    max_shard_bytes: int | None = None,
) -> Path:
    """Convert a Llama-family model into a rotated W4A16 GPTQ checkpoint at ``out_dir``.

    ``model_or_path``: a Hugging Face directory (config.json + safetensors), a ``.gguf``
    file, or an in-memory transformers model (not modified). ``rotate``: "none" (plain
    GPTQ), "offline" (R1 + R2 folded into weights: still a plain GPTQ checkpoint),
    "online" (R4 alone: down_proj's input rotated at run time), "full" (offline + online).
    A checkpoint with online rotations loads only in hadacore (other loaders refuse it). ``calibration``
    (GPTQ only): a text file path, a list of strings, a LongTensor ``[samples, seqlen]`` of
    token ids, None for the packaged news text, or the name of a packaged text
    (``hadacore.data.CALIBRATION_SOURCES``: "lee" news, "wiki" Wikipedia articles disjoint
    from the evaluation ones). ``tp``: the tensor-parallel degree the
    act-order layout and R4 blocks are planned for. ``w_clip`` (default on): choose each group's
    range by clip search (shrink up to 20% to minimize the group's error) instead of min/max.
    ``sym=False``: asymmetric grids (per-group zero points; still a standard GPTQ checkpoint).
    GPTQ only: ``static_groups`` (group grids from the weight before GPTQ's updates, sorted
    ``g_idx``), ``gptaq`` (GPTAQ/GPTQv2: target the fp model's layer outputs, ``gptaq_alpha``
    scaling its update), ``percdamp`` (Hessian dampening, fraction of its mean diagonal).
    ``format``: "gptq" (GPTQ v1, act-order with g_idx; the default) or "compressed-tensors"
    (vLLM's ``pack-quantized``: no g_idx, so act-order runs with static groups; an online R4
    becomes a Sylvester transform over the largest power-of-two block of the intermediate
    size, which vLLM applies at tensor-parallel size 1). ``rotate="learned"``: ``full`` with R1
    and every layer's R2 optimised on the calibration text with the quantizer in the loop
    (``learn``: steps, lr, samples...; :mod:`hadacore.convert.learn`), written to
    ``out_dir/rotations/learned.safetensors``; ``rotation_from``: the output directory of an
    earlier learned conversion, whose rotations are folded instead of learning new ones.
    ``tune``: end-to-end tuning of the group scales after quantization
    (:mod:`hadacore.convert.tune`; ``TuneOptions(steps=N)``, off by default).
    Returns the output directory.
    """
    from hadacore.checkpoint.write import DEFAULT_MAX_SHARD_BYTES, atomic_output_dir, write_checkpoint
    from hadacore.convert.source import load_source

    if format == "compressed-tensors" and method == "gptq" and act_order and not static_groups:
        log.info("compressed-tensors has no g_idx: GPTQ runs act-order with static groups (actorder 'weight')")
        static_groups = True
    opts = ConvertOptions(bits=bits, group_size=group_size, method=method, act_order=act_order, rotate=rotate,
                          tp=tp, samples=samples, seqlen=seqlen, seed=seed, dtype=dtype, w_clip=w_clip, sym=sym,
                          static_groups=static_groups, gptaq=gptaq, gptaq_alpha=gptaq_alpha, percdamp=percdamp,
                          format=format, learn=learn or LearnOptions(), tune=tune or TuneOptions())
    rotations = None
    if rotation_from is not None:
        if rotate != "learned":
            raise ValueError(f"rotation_from needs rotate='learned' (got rotate={rotate!r})")
        rotations = LearnedRotations.load(rotation_from)
        rotations.record["from"] = str(rotation_from)
    protect = (model_or_path,) if isinstance(model_or_path, (str, os.PathLike)) else ()
    # Claimed before the slow part: a bad or unwritable OUT fails now, not after the conversion.
    with atomic_output_dir(out_dir, force=force, protect=protect) as work:
        src = load_source(model_or_path, tokenizer=tokenizer,
                          check=lambda shape: check_sizes(shape, rotate=rotate, tp=tp, group_size=group_size))
        learning = rotate == "learned" and rotations is None
        calibrated = opts.reads_calibration(learning)
        ids = _calibration_ids(calibration, src.tokenizer, opts, opts.calibration_windows(learning)) if calibrated else None
        log.info("converting %s: %s", src.description, {k: str(v) for k, v in asdict(opts).items()})
        qm = quantize_model(src.model, opts, ids, rotations=rotations)
        config = qm.checkpoint_config(src.description, _describe_calibration(calibration) if calibrated else None)
        names = write_checkpoint(qm.model, config, work, tokenizer=src.tokenizer,
                                 max_shard_bytes=max_shard_bytes or DEFAULT_MAX_SHARD_BYTES)
        if qm.rotations is not None:
            qm.rotations.save(work)
    log.info("wrote %s (%d safetensors file%s)", out_dir, len(names), "s" * (len(names) > 1))
    return Path(out_dir)

"""The one loader: a GPTQ checkpoint as a transformers causal LM, whole or as one TP rank's share.

``load(path)`` is the ``tp_size=1`` case of ``load(path, tp_rank=r, tp_size=n)``: the same
code reads the config (:class:`~hadacore.checkpoint.config.CheckpointConfig`, checked
against the tensors' metadata), builds the model skeleton on the meta device, and fills
it from the safetensors files, each rank reading only its slices
(:mod:`hadacore.checkpoint.read`).

Layout under tensor parallelism (Megatron): q/k/v and gate/up column-parallel, o_proj and
down_proj row-parallel (one all-reduce each); attention heads and KV heads split evenly;
embeddings, norms and lm_head replicated. Act-order handling:

- gate/up/down: ``strategy="naive" | "tp_aware"`` (:mod:`hadacore.distributed.plan`);
- q/k/v (column-parallel): each rank keeps every input column: nothing to do;
- o_proj (row-parallel): a permutation crossing heads cannot be folded into v_proj, so a
  rank keeps its contiguous head columns with their stored ``g_idx`` and the scales of
  every group those columns touch (replicated scales, vLLM's choice): exact, no
  collective. A converter that orders o_proj head-locally makes this a plain shard.

With ``tp_size == 1`` every linear is a plain :class:`~hadacore.quant.linear.QuantLinear`
(down_proj with the online R4 the checkpoint declares), whose state dict has the
checkpoint's own names.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.distributed as dist
from torch import nn

from hadacore.checkpoint.config import CheckpointConfig
from hadacore.checkpoint.read import ConvertedSource, SafetensorsSource, TensorSource, read_gptq, take
from hadacore.distributed.group import agree_on_success, check_group
from hadacore.distributed.layers import ColumnParallelQuantLinear, RowParallelQuantLinear
from hadacore.distributed.plan import STRATEGIES, plan_mlp_shard
from hadacore.quant.act_order import is_sorted_by_group
from hadacore.quant.linear import QuantLinear

__all__ = ["load"]

log = logging.getLogger(__name__)

_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")


def load(
    path: str | os.PathLike,
    *,
    tp_rank: int = 0,
    tp_size: int = 1,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    strategy: str = "tp_aware",
    group: dist.ProcessGroup | None = None,
) -> nn.Module:
    """A converted (or any Llama-family GPTQ) checkpoint as a transformers causal LM.

    ``tp_size > 1``: this rank's share; every rank of ``group`` (default: the world, already
    initialised) must call it, and if any rank fails all raise
    :class:`~hadacore.distributed.group.ShardLoadError` naming the failed ranks.
    ``strategy``: ``"tp_aware"`` (no all-gather in the MLP) or ``"naive"``. ``dtype`` (default:
    the checkpoint's) is the dtype of the float tensors (scales, norms, embeddings).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if tp_size > 1 and not dist.is_initialized():
        raise RuntimeError(f"tp_size={tp_size} needs an initialised default process group (torchrun + init_process_group)")
    model, error = None, None
    try:
        check_group(tp_rank, tp_size, group)
        cfg = CheckpointConfig.read(path)
        model = _build(os.fspath(path), cfg, tp_rank=tp_rank, tp_size=tp_size, strategy=strategy, group=group)
        model = model.to(device=device, dtype=dtype or cfg.dtype)
    except Exception as exc:  # reported to every rank below
        if tp_size > 1:
            log.error("rank %d failed to load its shard of %s: %s", tp_rank, path, exc)
        error = exc
    agree_on_success(error, tp_rank=tp_rank, tp_size=tp_size, group=group)
    return model


def _g_idx(src: TensorSource, prefix: str, group_size: int, bits: int) -> torch.Tensor:
    if src.has(f"{prefix}.g_idx"):
        return take(src, f"{prefix}.g_idx", {}).to(torch.int64)
    k = src.shape(f"{prefix}.qweight")[0] * (32 // bits)
    return torch.arange(k) // (k if group_size == -1 else group_size)


class _Builder:
    """Reads one rank's linears from ``src``."""

    def __init__(self, src: TensorSource, cfg: CheckpointConfig, path: str, tp_rank: int, tp_size: int,
                 strategy: str, group):
        self.src, self.cfg, self.path = src, cfg, path
        self.tp_rank, self.tp_size, self.strategy, self.group = tp_rank, tp_size, strategy, group
        self.bits, self.group_size = cfg.gptq.bits, cfg.gptq.group_size

    def quant(self, prefix: str, *, keep_bias: bool = True, online_block: int | None = None,
              **index) -> tuple[QuantLinear, torch.Tensor | None]:
        tensors = read_gptq(self.src, prefix, bits=self.bits, **index)
        bias = tensors.pop("bias", None)
        layer = QuantLinear.from_tensors(
            tensors, group_size=self.group_size, bits=self.bits, bias=bias if keep_bias else None,
            online_hadamard=online_block is not None,
            hadamard_block=None if online_block is None or online_block == layer_k(tensors, self.bits) else online_block,
            name=f"{self.path}: {prefix}",
        )
        return layer, None if keep_bias else bias

    def whole(self, layer: nn.Module, prefix: str) -> None:
        """tp_size == 1: every linear as the checkpoint stores it."""
        for parent, names in ((layer.self_attn, _ATTN), (layer.mlp, _MLP)):
            kind = "self_attn" if parent is layer.self_attn else "mlp"
            for name in names:
                online = self.cfg.online.r4_block if name == "down_proj" else None
                setattr(parent, name, self.quant(f"{prefix}.{kind}.{name}", online_block=online)[0])

    def attention(self, attn: nn.Module, prefix: str, heads: int, kv_heads: int, head_dim: int) -> None:
        kw = dict(tp_rank=self.tp_rank, tp_size=self.tp_size, group=self.group)
        hl, kvl, r = heads // self.tp_size, kv_heads // self.tp_size, self.tp_rank
        q_rows = torch.arange(r * hl * head_dim, (r + 1) * hl * head_dim)
        kv_rows = torch.arange(r * kvl * head_dim, (r + 1) * kvl * head_dim)
        for name, rows in (("q_proj", q_rows), ("k_proj", kv_rows), ("v_proj", kv_rows)):
            setattr(attn, name, ColumnParallelQuantLinear(self.quant(f"{prefix}.{name}", out_index=rows)[0], **kw))
        if not is_sorted_by_group(_g_idx(self.src, f"{prefix}.o_proj", self.group_size, self.bits)):
            log.info("%s.o_proj has act-order: shard-local g_idx with replicated scales (no collective)", prefix)
        o, o_bias = self.quant(f"{prefix}.o_proj", keep_bias=False, in_index=q_rows)
        attn.o_proj = RowParallelQuantLinear(o, bias=o_bias, **kw)

    def mlp(self, mlp: nn.Module, prefix: str) -> None:
        plan = plan_mlp_shard(
            _g_idx(self.src, f"{prefix}.down_proj", self.group_size, self.bits), tp_rank=self.tp_rank,
            tp_size=self.tp_size, strategy=self.strategy, hadamard_block=self.cfg.online.r4_block,
            group_size=self.group_size,
        )
        kw = dict(tp_rank=self.tp_rank, tp_size=self.tp_size, group=self.group)
        mlp.gate_proj = ColumnParallelQuantLinear(self.quant(f"{prefix}.gate_proj", out_index=plan.gate_up_rows)[0], **kw)
        mlp.up_proj = ColumnParallelQuantLinear(self.quant(f"{prefix}.up_proj", out_index=plan.gate_up_rows)[0], **kw)
        down, down_bias = self.quant(f"{prefix}.down_proj", keep_bias=False, in_index=plan.down_cols)
        mlp.down_proj = RowParallelQuantLinear(
            down, bias=down_bias, hadamard_block=plan.hadamard_block, local_perm=plan.local_perm,
            gather_index=plan.gather_index, **kw,
        )


def layer_k(tensors: dict[str, torch.Tensor], bits: int) -> int:
    return tensors["qweight"].shape[0] * (32 // bits)


def _build(path: str, cfg: CheckpointConfig, *, tp_rank: int, tp_size: int, strategy: str, group) -> nn.Module:
    from transformers import AutoModelForCausalLM

    src = SafetensorsSource(path)
    for file, metadata in src.metadata.items():
        cfg.check_metadata(metadata, file)
    layout = cfg.format if cfg.format == "compressed-tensors" else cfg.gptq.zero_layout
    if layout != "gptq":  # stored another way: read as GPTQ v1, exactly
        src = ConvertedSource(src, layout=layout, group_size=cfg.gptq.group_size, symmetric=cfg.gptq.sym)
    config = cfg.transformers_config()
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    if heads % tp_size or kv_heads % tp_size:
        raise ValueError(f"tp_size={tp_size} must divide both num_attention_heads ({heads}) and "
                         f"num_key_value_heads ({kv_heads})")
    if config.intermediate_size % tp_size:
        raise ValueError(f"tp_size={tp_size} must divide intermediate_size ({config.intermediate_size})")
    r4 = cfg.online.r4_block
    if r4 is not None and config.intermediate_size % r4:
        raise ValueError(f"{path}: r4_block_size {r4} does not divide intermediate_size {config.intermediate_size}")
    # This rank's model: its share of the heads (attention reshapes with -1 heads).
    config.head_dim = head_dim
    config.num_attention_heads, config.num_key_value_heads = heads // tp_size, kv_heads // tp_size
    config.intermediate_size //= tp_size
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    build = _Builder(src, cfg, path, tp_rank, tp_size, strategy, group)
    for i, layer in enumerate(model.model.layers):
        prefix = f"model.layers.{i}"
        if tp_size == 1:
            build.whole(layer, prefix)
        else:
            build.attention(layer.self_attn, f"{prefix}.self_attn", heads, kv_heads, head_dim)
            build.mlp(layer.mlp, f"{prefix}.mlp")
    # Float tensors, replicated: embeddings, norms, lm_head (absent when tied to the embedding).
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for name, param in list(model.named_parameters()):
        if not param.is_meta:
            continue
        if name == "lm_head.weight" and tied and not src.has(name):
            continue
        if not src.has(name):
            raise ValueError(f"{path}: checkpoint lacks {name}")
        module_name, _, leaf = name.rpartition(".")
        model.get_submodule(module_name)._parameters[leaf] = nn.Parameter(take(src, name, {}), requires_grad=False)
    if tied:
        model.tie_weights()
    with torch.device("cpu"):  # its inv_freq buffer was created on meta
        model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    still_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if still_meta:
        raise ValueError(f"{path}: tensors not found in the checkpoint: {still_meta[:8]}")
    if src.unread:
        raise ValueError(f"{path}: checkpoint does not match its config: unexpected tensors {src.unread[:5]}")
    if tp_size > 1:
        model.config.hadacore_tp = {"tp_rank": tp_rank, "tp_size": tp_size, "strategy": strategy, "r4_block": r4,
                                    "o_proj_act_order": "shard_local_g_idx"}
    return model.eval()

"""Build one rank's tensor-parallel Llama-family model from a GPTQ checkpoint.

Layout (Megatron): q/k/v and gate/up column-parallel, o_proj and down_proj row-parallel
(one all-reduce each); attention heads and KV heads split evenly across ranks;
embeddings, norms and lm_head replicated. Each rank reads only its slices of the
quantized weights (see :mod:`hadacore.distributed.shard_io`).

Act-order (``desc_act``) handling:

- gate/up/down: ``strategy="naive" | "tp_aware"`` (:mod:`hadacore.distributed.plan`);
- q/k/v (column-parallel): nothing to do, each rank keeps every input column;
- o_proj (row-parallel): a permutation crossing heads cannot be folded into v_proj, so a
  rank keeps its contiguous head columns with their stored ``g_idx`` and the scales of
  every group those columns touch (replicated scales, vLLM's choice): exact, no
  collective, at the cost of a ``g_idx`` gather in the dequantization. A converter
  that orders o_proj head-locally makes this a plain group-aligned shard.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from hadacore.distributed.layers import ColumnParallelQuantLinear, RowParallelQuantLinear
from hadacore.distributed.plan import STRATEGIES, MLPShardPlan, plan_mlp_shard
from hadacore.distributed.shard_io import DictSource, SafetensorsSource, TensorSource, read_gptq, take
from hadacore.quant.linear import QuantLinear
from hadacore.quant.permute import is_sorted_by_group

__all__ = ["load_sharded", "build_parallel_mlp", "agree_on_success", "ShardLoadError"]

log = logging.getLogger(__name__)


class ShardLoadError(RuntimeError):
    """Raised on every rank when any rank of the group failed to build its shard."""


def agree_on_success(error: BaseException | None, *, tp_rank: int, tp_size: int, group: dist.ProcessGroup | None = None) -> None:
    """All ranks learn whether every rank succeeded; raise :class:`ShardLoadError` on all if not.

    Without this, a rank that failed would leave the others blocked in their first
    collective. A rank that dies outright is caught by the process group's timeout
    (``init_process_group(timeout=...)``), which turns the wait into an error.
    """
    if tp_size == 1:
        if error is not None:
            raise error
        return
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"tp_size={tp_size} needs an initialised default process group (torchrun + init_process_group)")
    mine = None if error is None else f"{type(error).__name__}: {error}"
    reports: list[Any] = [None] * dist.get_world_size(group)
    try:
        dist.all_gather_object(reports, mine, group=group)
    except Exception as exc:  # a peer died (gloo: connection closed) or the group's timeout expired
        raise ShardLoadError(
            f"rank {tp_rank} could not confirm that every rank of the tp_size={tp_size} group loaded its shard "
            f"(a rank crashed or the process group timed out); this rank {'failed too: ' + mine if mine else 'succeeded'}; "
            f"collective error: {exc}"
        ) from (error or exc)
    failed = {r: msg for r, msg in enumerate(reports) if msg is not None}
    if failed:
        detail = "; ".join(f"rank {r}: {msg}" for r, msg in failed.items())
        raise ShardLoadError(f"loading the tp_size={tp_size} model failed on rank(s) {sorted(failed)} ({detail})") from error


def _check_group(tp_rank: int, tp_size: int, group: dist.ProcessGroup | None) -> None:
    if tp_size < 1 or not 0 <= tp_rank < tp_size:
        raise ValueError(f"need 0 <= tp_rank < tp_size, got tp_rank={tp_rank}, tp_size={tp_size}")
    if tp_size == 1:
        return
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    if (size, rank) != (tp_size, tp_rank):
        raise ValueError(f"tp_rank/tp_size ({tp_rank}/{tp_size}) disagree with the process group (rank {rank} of {size})")


def _g_idx(src: TensorSource, prefix: str, group_size: int, bits: int) -> torch.Tensor:
    if src.has(f"{prefix}.g_idx"):
        return take(src, f"{prefix}.g_idx", {}).to(torch.int64)
    k = src.shape(f"{prefix}.qweight")[0] * (32 // bits)
    return torch.arange(k) // (k if group_size == -1 else group_size)


def _quant(tensors: dict[str, torch.Tensor], group_size: int, bits: int, *, keep_bias: bool) -> tuple[QuantLinear, torch.Tensor | None]:
    bias = tensors.pop("bias", None)
    layer = QuantLinear.from_tensors(tensors, group_size=group_size, bits=bits, bias=bias if keep_bias else None)
    return layer, (None if keep_bias else bias)


def build_parallel_mlp(
    src: TensorSource | dict[str, torch.Tensor],
    prefix: str,
    *,
    tp_rank: int,
    tp_size: int,
    group_size: int,
    bits: int = 4,
    strategy: str = "tp_aware",
    hadamard_block: int | None = None,
    group: dist.ProcessGroup | None = None,
) -> tuple[ColumnParallelQuantLinear, ColumnParallelQuantLinear, RowParallelQuantLinear, MLPShardPlan]:
    """This rank's ``gate_proj, up_proj, down_proj`` (+ the plan) from ``{prefix}.{gate,up,down}_proj.*``.

    ``src`` is a checkpoint source or a dict of tensors (e.g. ``{"mlp.gate_proj.qweight": ...}``).
    ``hadamard_block``: down_proj's weight was rotated by ``I (x) H_block`` (online R4).
    """
    if isinstance(src, dict):
        src = DictSource(src)
    plan = plan_mlp_shard(
        _g_idx(src, f"{prefix}.down_proj", group_size, bits),
        tp_rank=tp_rank, tp_size=tp_size, strategy=strategy, hadamard_block=hadamard_block, group_size=group_size,
    )
    kw = dict(tp_rank=tp_rank, tp_size=tp_size, group=group)
    gate, _ = _quant(read_gptq(src, f"{prefix}.gate_proj", out_index=plan.gate_up_rows, bits=bits), group_size, bits, keep_bias=True)
    up, _ = _quant(read_gptq(src, f"{prefix}.up_proj", out_index=plan.gate_up_rows, bits=bits), group_size, bits, keep_bias=True)
    down, down_bias = _quant(read_gptq(src, f"{prefix}.down_proj", in_index=plan.down_cols, bits=bits), group_size, bits, keep_bias=False)
    return (
        ColumnParallelQuantLinear(gate, **kw),
        ColumnParallelQuantLinear(up, **kw),
        RowParallelQuantLinear(
            down, bias=down_bias, hadamard_block=plan.hadamard_block, local_perm=plan.local_perm,
            gather_index=plan.gather_index, **kw,
        ),
        plan,
    )


def _build_attention(attn: nn.Module, src: TensorSource, prefix: str, *, heads: int, kv_heads: int, head_dim: int,
                     tp_rank: int, tp_size: int, group_size: int, bits: int, group) -> None:
    kw = dict(tp_rank=tp_rank, tp_size=tp_size, group=group)
    hl, kvl = heads // tp_size, kv_heads // tp_size
    q_rows = torch.arange(tp_rank * hl * head_dim, (tp_rank + 1) * hl * head_dim)
    kv_rows = torch.arange(tp_rank * kvl * head_dim, (tp_rank + 1) * kvl * head_dim)
    for name, rows in (("q_proj", q_rows), ("k_proj", kv_rows), ("v_proj", kv_rows)):
        layer, _ = _quant(read_gptq(src, f"{prefix}.{name}", out_index=rows, bits=bits), group_size, bits, keep_bias=True)
        setattr(attn, name, ColumnParallelQuantLinear(layer, **kw))
    if not is_sorted_by_group(_g_idx(src, f"{prefix}.o_proj", group_size, bits)):
        log.info("%s.o_proj has act-order: shard-local g_idx with replicated scales (no collective)", prefix)
    o, o_bias = _quant(read_gptq(src, f"{prefix}.o_proj", in_index=q_rows, bits=bits), group_size, bits, keep_bias=False)
    attn.o_proj = RowParallelQuantLinear(o, bias=o_bias, **kw)


def _read_config(path: str) -> tuple[dict, dict, dict]:
    cfg_file = os.path.join(path, "config.json")
    if not os.path.exists(cfg_file):
        raise FileNotFoundError(f"{cfg_file} is missing: not a converted checkpoint directory")
    with open(cfg_file) as f:
        cfg = json.load(f)
    qcfg = cfg.pop("quantization_config", None)
    hc = cfg.pop("hadacore", None) or {}
    if not qcfg or qcfg.get("quant_method") != "gptq":
        raise ValueError(f"{cfg_file}: expected a quantization_config with quant_method 'gptq', got {qcfg!r}")
    if qcfg.get("checkpoint_format", "gptq") != "gptq":
        raise ValueError(f"{cfg_file}: only GPTQ v1 (checkpoint_format 'gptq') is supported, got {qcfg['checkpoint_format']!r}")
    return cfg, qcfg, hc


def _r4_block(hc: dict, intermediate: int) -> int | None:
    """down_proj's online R4 Hadamard block from the config's ``hadacore`` block (the converter's keys
    ``online.r4_down_proj`` and ``r4_block_size``), or None without online R4."""
    if not (hc.get("online") or {}).get("r4_down_proj", False):
        return None
    block = hc.get("r4_block_size")
    if not isinstance(block, int) or block <= 0 or intermediate % block:
        raise ValueError(f"hadacore.r4_block_size must be a positive divisor of intermediate_size {intermediate}, got {block!r}")
    return block


def _build_rank_model(path: str, *, tp_rank: int, tp_size: int, strategy: str, group) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg, qcfg, hc = _read_config(path)
    bits, group_size = int(qcfg["bits"]), int(qcfg["group_size"])
    config = AutoConfig.for_model(**cfg)
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    if heads % tp_size or kv_heads % tp_size:
        raise ValueError(
            f"tp_size={tp_size} must divide both num_attention_heads ({heads}) and num_key_value_heads ({kv_heads})"
        )
    if config.intermediate_size % tp_size:
        raise ValueError(f"tp_size={tp_size} must divide intermediate_size ({config.intermediate_size})")
    r4 = _r4_block(hc, config.intermediate_size)
    # This rank's model: its share of the heads (attention reshapes with -1 heads).
    config.head_dim = head_dim
    config.num_attention_heads, config.num_key_value_heads = heads // tp_size, kv_heads // tp_size
    config.intermediate_size //= tp_size
    src = SafetensorsSource(path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    common = dict(tp_rank=tp_rank, tp_size=tp_size, group_size=group_size, bits=bits, group=group)
    for i, layer in enumerate(model.model.layers):
        prefix = f"model.layers.{i}"
        _build_attention(layer.self_attn, src, f"{prefix}.self_attn", heads=heads, kv_heads=kv_heads, head_dim=head_dim, **common)
        mlp = layer.mlp
        mlp.gate_proj, mlp.up_proj, mlp.down_proj, _ = build_parallel_mlp(
            src, f"{prefix}.mlp", strategy=strategy, hadamard_block=r4, **common
        )
    # Replicated float tensors: embeddings, norms, lm_head.
    tied = getattr(config, "tie_word_embeddings", False)
    for name, param in list(model.named_parameters()):
        if not param.is_meta:
            continue
        if name == "lm_head.weight" and tied and not src.has(name):
            continue
        module_name, _, leaf = name.rpartition(".")
        module = model.get_submodule(module_name)
        module._parameters[leaf] = nn.Parameter(take(src, name, {}), requires_grad=False)
    if tied:
        model.tie_weights()
    with torch.device("cpu"):  # its inv_freq buffer was created on meta
        model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    still_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if still_meta:
        raise RuntimeError(f"tensors not found in the checkpoint: {still_meta[:8]}")
    model.config.hadacore_tp = {
        "tp_rank": tp_rank, "tp_size": tp_size, "strategy": strategy, "r4_block": r4,
        "o_proj_act_order": "shard_local_g_idx",
    }
    return model.eval()


def load_sharded(
    path: str | os.PathLike,
    *,
    tp_rank: int,
    tp_size: int,
    device: str | torch.device = "cpu",
    strategy: str = "tp_aware",
    group: dist.ProcessGroup | None = None,
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """This rank's share of a converted GPTQ checkpoint as a transformers causal LM.

    Reads only this rank's slices of the quantized weights (embeddings, norms and lm_head
    are replicated). Every rank of ``group`` (default: the world) must call it; if any rank
    fails, all raise :class:`ShardLoadError` naming the failed ranks and their errors.
    ``strategy``: ``"tp_aware"`` (no all-gather in the MLP) or ``"naive"`` (see
    :mod:`hadacore.distributed.plan`). ``dtype`` (default: the checkpoint's) casts the float
    tensors (scales, norms, embeddings); packed weights stay int32.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if tp_size > 1 and not dist.is_initialized():
        raise RuntimeError(f"tp_size={tp_size} needs an initialised default process group (torchrun + init_process_group)")
    model, error = None, None
    try:
        _check_group(tp_rank, tp_size, group)
        model = _build_rank_model(os.fspath(path), tp_rank=tp_rank, tp_size=tp_size, strategy=strategy, group=group)
        model = model.to(device=device, dtype=dtype)
    except Exception as exc:  # reported to every rank below
        log.error("rank %d failed to load its shard of %s: %s", tp_rank, path, exc)
        error = exc
    agree_on_success(error, tp_rank=tp_rank, tp_size=tp_size, group=group)
    return model

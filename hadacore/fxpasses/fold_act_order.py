"""Fold the act-order permutations of quantized layers (``g_idx`` not sorted) away.

The weight's input columns are sorted by group (``W' = W[:, perm]``), which makes every
group contiguous; the activation must then arrive as ``x[..., perm]``. In order of
preference that gather is
1. folded into the producers when the input is ``silu(gate(h)) * up(h)``: permuting the
   output rows of gate and up by ``perm`` yields ``x[..., perm]`` exactly (SiLU and the
   product act elementwise), so no gather exists at run time;
2. fused into an online Hadamard feeding the layer (its ``perm`` argument gathers the
   output columns at the store);
3. otherwise kept as a runtime ``index_select`` before the GEMM, with a log line.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch

from hadacore.fxpasses.block_graph import match_mlp
from hadacore.fxpasses.context import (
    LinearSite, PassContext, example_value, op_arguments, set_op_arguments, skip_dtype_casts,
)
from hadacore.fxpasses.stats import bump, record_skip
from hadacore.quant.act_order import permute_output_rows, sort_by_group

log = logging.getLogger("hadacore.compiler")


def _permute_producer_rows(ctx: PassContext, site: LinearSite, perm: torch.Tensor) -> None:
    """Reorder a producer's output features by ``perm`` (weight rows and bias)."""
    if site.kind == "gptq":
        site.gptq = permute_output_rows(site.gptq, perm, site.bits)
        site.gptq_nodes = None
    else:
        site.weight = site.weight[perm]
        site.node.update_arg(1, ctx.add_constant(f"{site.name}.weight_perm", site.weight, site.node))
    if site.bias_arg is not None:
        bias = ctx.constant(skip_dtype_casts(site.bias_arg))
        ev = example_value(site.bias_arg)
        bias = bias[perm].to(ev.dtype if ev is not None else bias.dtype)
        site.bias_arg = ctx.add_constant(f"{site.name}.bias_perm", bias, site.node)
        if site.kind == "float":
            site.node.update_arg(2, site.bias_arg)


def _fold_into_mlp(ctx: PassContext, site: LinearSite, perm: torch.Tensor) -> Optional[str]:
    """Try case 1; return why it does not apply, or None on success."""
    mlp = match_mlp(ctx, skip_dtype_casts(site.x))
    if mlp is None:
        return "input is not silu(gate) * up"
    gate, up = ctx.site(mlp.gate), ctx.site(mlp.up)
    if len(mlp.mul.users) != 1 or len(mlp.silu.users) != 1:
        return "the MLP product has other consumers"
    if len(gate.node.users) != 1 or len(up.node.users) != 1:
        return "gate/up outputs have other consumers"
    if any(s.bias_arg is not None and ctx.constant(skip_dtype_casts(s.bias_arg)) is None for s in (gate, up)):
        return "gate/up bias is not a constant"
    if any(s.rewritten or s.gather is not None for s in (gate, up)):
        return "gate/up already rewritten"
    _permute_producer_rows(ctx, gate, perm)
    _permute_producer_rows(ctx, up, perm)
    return None


def fold_act_order(ctx: PassContext) -> None:
    kept: dict[str, list[str]] = {}  # why -> layers whose act-order gather stays at run time
    for site in ctx.sites:
        if site.kind != "gptq":
            continue
        site.gptq, perm = sort_by_group(site.gptq, site.bits)
        if perm is None:
            continue
        site.gptq_nodes = None
        had = site.hadamard
        if had is not None:
            if len(had.users) == 1 and op_arguments(had)["perm"] is None:
                set_op_arguments(had, perm=ctx.add_constant(f"{site.name}.perm", perm.to(torch.int64), had))
                bump("gather_removed")
                log.debug("hadacore: %s act-order permutation fused into the Hadamard store", site.name)
                continue
            why = "the online Hadamard feeding it is shared or already permuted"
        else:
            why = _fold_into_mlp(ctx, site, perm)
            if why is None:
                bump("gather_removed")
                log.debug("hadacore: %s act-order permutation folded into gate/up rows", site.name)
                continue
        site.gather = perm
        bump("gather_kept")
        record_skip(f"act-order gather kept ({why})")
        kept.setdefault(why, []).append(site.name)
    for why, names in kept.items():  # one line per reason: the layers are rewritten, only the gather stays
        log.info("hadacore: %d layer(s) rewritten with their act-order gather kept at run time (%s), e.g. %s",
                 len(names), why, names[0])

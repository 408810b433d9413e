"""Rewrite every quantized linear site into one ``hadacore::w4a16_gemm`` node.

An online Hadamard feeding the layer stays a separate ``hadacore::hadamard`` node: the
rotation mixes the whole row (K up to 11008 and more) while the GEMM streams K in tiles
of at most a few hundred, so it does not fit inside one K tile. Fusing rotation into
the GEMM (a Hadamard-aware prologue) is a later optimization.
"""

from __future__ import annotations

import logging

import torch
from torch import fx

from hadacore.fxpasses.context import LinearSite, PassContext, call_op, example_value
from hadacore.fxpasses.stats import bump, skip

log = logging.getLogger("hadacore.compiler")


def gptq_arg_nodes(ctx: PassContext, site: LinearSite, before: fx.Node) -> dict[str, fx.Node | None]:
    """Graph nodes holding the site's GPTQ tensors; new constants if a pass changed them."""
    if site.gptq_nodes is not None:
        return site.gptq_nodes
    nodes = {k: ctx.add_constant(f"{site.name}.{k}", t, before) for k, t in site.gptq.items()}
    site.gptq_nodes = nodes
    return nodes


def gather_input(ctx: PassContext, site: LinearSite, x: fx.Node, before: fx.Node) -> fx.Node:
    """``x[..., perm]`` for a site whose weight columns were sorted but whose input could not be."""
    perm = ctx.add_constant(f"{site.name}.perm", site.gather.to(torch.int64), before)
    with ctx.graph.inserting_before(before):
        g = ctx.graph.call_function(torch.index_select, (x, -1, perm))
    g.meta.update({k: v for k, v in x.meta.items() if k == "example_value"})
    return g


def emit_w4a16(ctx: PassContext, site: LinearSite, x: fx.Node, before: fx.Node, bias=None) -> fx.Node:
    nodes = gptq_arg_nodes(ctx, site, before)
    if site.gather is not None:
        x = gather_input(ctx, site, x, before)
    if ctx.needs_grad:
        return _emit_dequant_linear(ctx, site, x, nodes, before, bias)
    with ctx.graph.inserting_before(before):
        return call_op(ctx.graph, torch.ops.hadacore.w4a16_gemm, x=x, **nodes, bias=bias, group_size=site.group_size,
                       split_k=ctx.options.split_k, deterministic=ctx.options.deterministic)


def _emit_dequant_linear(ctx, site, x, nodes, before, bias) -> fx.Node:
    """The differentiable form ``linear(x, dequantize(W).to(x.dtype), bias)`` for autograd graphs."""
    ev = example_value(x)
    with ctx.graph.inserting_before(before):
        w = call_op(ctx.graph, torch.ops.hadacore.gptq_dequantize, **nodes, group_size=site.group_size, bits=site.bits)
        if ev is not None:
            w = ctx.graph.call_method("to", (w, ev.dtype))
        return ctx.graph.call_function(torch._C._nn.linear, (x, w, bias))


def rewrite_w4a16(ctx: PassContext) -> None:
    for site in ctx.sites:
        if site.kind != "gptq" or site.rewritten:
            continue
        if ctx.needs_grad:
            skip("autograd graph (w4a16_gemm has no backward): kept dequantize -> linear", site.name)
            if site.gptq_nodes is not None and site.gather is None:
                continue  # the original pattern is already the differentiable form
        node = site.node
        new = emit_w4a16(ctx, site, site.x, node, site.bias_arg)
        new.meta["example_value"] = example_value(node)
        node.replace_all_uses_with(new)
        ctx.graph.erase_node(node)
        site.node, site.rewritten = new, True
        if not ctx.needs_grad:
            bump("linear_rewritten")
        log.debug("hadacore: %s -> w4a16_gemm", site.name)

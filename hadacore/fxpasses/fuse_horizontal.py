"""Horizontal fusion: quantized projections that read the same input with the same
quantization config (q/k/v, gate/up) become one ``w4a16_gemm`` over their weights
concatenated along N, followed by a split (``narrow`` views of the fused output)."""

from __future__ import annotations

import logging
from collections import defaultdict

import torch

from hadacore.fxpasses.context import PassContext, example_value, skip_dtype_casts
from hadacore.fxpasses.rewrite_w4a16 import emit_w4a16
from hadacore.fxpasses.stats import bump, skip
from hadacore.formats.gptq import concat_output_rows

log = logging.getLogger("hadacore.compiler")


def _key(site):
    g = site.gptq
    return (site.x, site.group_size, site.bits, g["scales"].dtype, tuple(g["qweight"].shape[:1]), site.bias_arg is None)


def fuse_horizontal(ctx: PassContext) -> None:
    if ctx.needs_grad:
        return  # autograd graphs keep per-layer dequantize -> linear (see rewrite_w4a16)
    groups = defaultdict(list)
    for s in ctx.sites:
        if s.kind == "gptq" and not s.rewritten and s.gather is None:
            groups[_key(s)].append(s)
    for key, sites in groups.items():
        if len(sites) < 2:
            continue
        names = [s.name for s in sites]
        if any(not torch.equal(s.gptq["g_idx"], sites[0].gptq["g_idx"]) for s in sites[1:]):
            skip("same input but different g_idx; not fused", ",".join(names))
            continue
        biases = None
        if sites[0].bias_arg is not None:
            biases = [ctx.constant(skip_dtype_casts(s.bias_arg)) for s in sites]
            if any(b is None for b in biases):
                skip("bias is not a constant; not fused", ",".join(names))
                continue
        sites.sort(key=lambda s: s.node)  # fx nodes compare by graph order
        first = sites[0].node
        fused = _FusedSite(name="+".join(names), gptq=concat_output_rows([s.gptq for s in sites]),
                           group_size=sites[0].group_size)
        bias_node = None
        if biases is not None:
            ev = example_value(sites[0].node)  # the bias is used in the output's dtype
            dt = ev.dtype if ev is not None else biases[0].dtype
            bias_node = ctx.add_constant(f"{fused.name}.bias", torch.cat(biases).to(dt), first)
        out = emit_w4a16(ctx, fused, sites[0].x, first, bias_node)
        offset, anchor = 0, out
        for s in sites:
            n = s.out_features
            with ctx.graph.inserting_after(anchor):
                part = ctx.graph.call_function(torch.narrow, (out, -1, offset, n))
            anchor = part
            part.meta["example_value"] = example_value(s.node)
            s.node.replace_all_uses_with(part)
            ctx.graph.erase_node(s.node)
            s.node, s.rewritten, s.fused_into = part, True, fused.name
            offset += n
            bump("linear_rewritten")
        bump("linear_fused", len(sites))
        log.debug("hadacore: fused %s into one w4a16_gemm (N=%d)", fused.name, offset)


class _FusedSite:
    """The minimal LinearSite surface :func:`emit_w4a16` needs."""

    def __init__(self, name, gptq, group_size):
        self.name, self.gptq, self.group_size = name, gptq, group_size
        self.gptq_nodes, self.gather = None, None

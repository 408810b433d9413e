"""Compile-time RTN quantization (``quantize="w4a16"``) of the float linears the graph reads.

A snapshot: the weights are quantized once, when the graph is compiled; the GPTQ
tensors become buffers of the GraphModule. Layers whose K is not a multiple of the group
size, or whose N is not a multiple of 8 (GPTQ packing), are left in float.
"""

from __future__ import annotations

import logging

from hadacore.fxpasses.context import PassContext
from hadacore.fxpasses.stats import bump, skip
from hadacore.quant.rtn import rtn_gptq_tensors

log = logging.getLogger("hadacore.compiler")


def quantize(ctx: PassContext) -> None:
    if ctx.options["quantize"] != "w4a16":
        return
    gs, bits, sym = ctx.options["group_size"], ctx.options["bits"], ctx.options["sym"]
    for site in ctx.sites:
        if site.kind != "float":
            continue
        n, k = site.weight.shape
        if not site.weight.dtype.is_floating_point or site.weight.dim() != 2:
            skip("weight is not a 2-D float tensor", site.name)
            continue
        if gs != -1 and k % gs:
            skip(f"K not a multiple of group_size {gs}", site.name)
            continue
        if n % (32 // bits) or k % (32 // bits):
            skip(f"N or K not a multiple of {32 // bits} (GPTQ packing)", site.name)
            continue
        site.gptq = rtn_gptq_tensors(site.weight.detach(), bits, gs, sym, scale_dtype=site.weight.dtype)
        site.gptq_nodes, site.kind, site.group_size, site.bits = None, "gptq", gs, bits
        site.weight = None
        bump("linear_quantized")
        log.debug("hadacore: quantized %s [%d x %d] to w4a16 (group %d)", site.name, n, k, gs)

"""Compile-time RTN quantization (``quantize="w4a16"``) of the float linears the graph reads.

A snapshot: the weights are quantized once, when the graph is compiled; the GPTQ
tensors become buffers of the GraphModule. Every float linear is quantized: one that
cannot be (K not a multiple of the group size, N or K not a multiple of the packing,
a non-finite weight) is a compile error naming it and the group sizes that would fit,
never a silent float layer. Layers matched by the ``skip_layers`` option are left in
float on purpose, each with a log line and a ``stats()["skipped"]`` entry.
"""

from __future__ import annotations

import fnmatch
import logging

import torch

from hadacore.fxpasses.context import PassContext
from hadacore.fxpasses.stats import bump, skip
from hadacore.quant.rtn import rtn_gptq_tensors

log = logging.getLogger("hadacore.compiler")

_CANDIDATE_GROUP_SIZES = (32, 64, 128, 256)


def _why_not(n: int, k: int, weight: torch.Tensor, group_size: int, bits: int) -> str | None:
    per = 32 // bits
    if not weight.dtype.is_floating_point:
        return f"its weight is {weight.dtype}, not floating point"
    if group_size != -1 and k % group_size:
        return f"its input size K={k} is not a multiple of group_size {group_size}"
    if n % per or k % per:
        return f"[N={n}, K={k}] are not multiples of {per} (GPTQ packing)"
    if not bool(torch.isfinite(weight).all()):
        return f"its weight has {int((~torch.isfinite(weight)).sum())} non-finite value(s) (NaN or Inf)"
    return None


def quantize(ctx: PassContext) -> None:
    opts = ctx.options
    if opts.quantize != "w4a16":
        return
    gs, bits, sym = opts.group_size, opts.bits, opts.sym
    todo, refused = [], []
    for site in ctx.sites:
        if site.kind != "float":
            continue
        if any(fnmatch.fnmatchcase(site.name, p) for p in opts.skip_layers):
            skip("matched skip_layers: kept in float", site.name)
            continue
        n, k = site.weight.shape
        why = _why_not(n, k, site.weight, gs, bits)
        if why is None:
            todo.append(site)
        else:
            refused.append((site, why))
    if refused:
        ks = {int(s.weight.shape[1]) for s in ctx.sites if s.kind == "float"}
        fit = [g for g in _CANDIDATE_GROUP_SIZES if all(k % g == 0 for k in ks)] + [-1]
        lines = "; ".join(f"{s.name}: {why}" for s, why in refused[:6])
        more = f" (and {len(refused) - 6} more)" if len(refused) > 6 else ""
        raise ValueError(
            f"hadacore: quantize='w4a16' cannot quantize {len(refused)} linear layer(s): {lines}{more}. Group sizes "
            f"that fit every layer of this graph: {fit} (-1 = per-channel); to keep layers in float on purpose, "
            f"name them in the 'skip_layers' option (glob patterns, e.g. ('lm_head',))")
    for site in todo:
        n, k = site.weight.shape
        site.gptq = rtn_gptq_tensors(site.weight.detach(), bits, gs, sym, scale_dtype=site.weight.dtype)
        site.gptq_nodes, site.kind, site.group_size, site.bits = None, "gptq", gs, bits
        site.weight = None
        bump("linear_quantized")
        log.debug("hadacore: quantized %s [%d x %d] to w4a16 (group %d)", site.name, n, k, gs)

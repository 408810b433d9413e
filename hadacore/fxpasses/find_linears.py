"""Find linear layers: float ``linear(x, W, b)`` with a parameter/buffer weight, and the
QuantLinear pattern ``[hadamard ->] gptq_dequantize -> (.to) -> linear``."""

from __future__ import annotations

import logging

import torch

from hadacore.formats.gptq import default_g_idx
from hadacore.fxpasses.context import LINEAR_TARGETS, LinearSite, PassContext, is_call, node_name, op_arguments, skip_dtype_casts
from hadacore.fxpasses.stats import bump, skip

log = logging.getLogger("hadacore.compiler")

_HADAMARD = torch.ops.hadacore.hadamard
_DEQUANT = torch.ops.hadacore.gptq_dequantize


def _layer_name(weight_node) -> str:
    name = node_name(weight_node)
    for suffix in (".weight", ".qweight"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def find_linears(ctx: PassContext) -> None:
    ctx.sites = []
    for node in ctx.graph.nodes:
        if not is_call(node, LINEAR_TARGETS):
            continue
        args = list(node.args) + [None] * (3 - len(node.args))
        x, w, b = args[0], args[1], node.kwargs.get("bias", args[2])
        src = skip_dtype_casts(w)
        if is_call(src, (_DEQUANT,)):
            site = _gptq_site(ctx, node, x, src, b)
        else:
            weight = ctx.constant(src) if src is w else None
            if weight is None:
                skip("weight is not a parameter or buffer", node.name)
                continue
            site = LinearSite(node=node, name=_layer_name(src), kind="float", x=x, weight=weight, bias_arg=b)
        if site is None:
            continue
        bump("linear_found")
        ctx.sites.append(site)
        log.debug("hadacore: found %s linear %s [%d -> %d]", site.kind, site.name, site.in_features, site.out_features)


def _gptq_site(ctx: PassContext, node, x, dq, b):
    a = op_arguments(dq)
    qweight, g_idx, group_size, bits = a["qweight"], a["g_idx"], a["group_size"], a["bits"]
    nodes = {k: a[k] for k in ("qweight", "qzeros", "scales", "g_idx")}
    tensors = {k: ctx.constant(v) for k, v in nodes.items() if v is not None}
    if any(t is None for t in tensors.values()) or "g_idx" not in tensors and g_idx is not None:
        skip("GPTQ tensors are not parameters or buffers", node.name)
        return None
    if bits != 4:
        skip(f"{bits}-bit weights (w4a16_gemm is 4-bit)", node.name)
        return None
    if len(dq.users) != 1:
        skip("dequantized weight has other users", node.name)
        return None
    if "g_idx" not in tensors:
        k = tensors["qweight"].shape[0] * 8
        tensors["g_idx"] = default_g_idx(k, group_size, device=tensors["qweight"].device)
        nodes["g_idx"] = None
    hadamard = x if is_call(x, (_HADAMARD,)) else None
    return LinearSite(
        node=node, name=_layer_name(qweight), kind="gptq", x=x, bias_arg=b, gptq=tensors, gptq_nodes=nodes,
        group_size=int(group_size), bits=int(bits), hadamard=hadamard,
    )

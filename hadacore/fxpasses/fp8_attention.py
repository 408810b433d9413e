"""FP8 attention (``fp8_attention=True``): R3 on Q and K fused with per-head FP8 e4m3
quantization of Q and K (the ``Q K^T`` product is FP8; V, P and the softmax stay 16/32-bit,
the contract of :mod:`hadacore.kernels.fp8`).

- An SDPA call without dropout (mask tensor or not) becomes one ``hadacore::fp8_attention``
  node (``rotate=True, quantize=True``): the R3 Hadamards the rotate pass put on Q and K
  fold into it. On CUDA that op runs the Triton kernels (fused R3 + quantize, then an FP8
  flash-attention kernel on sm89+); elsewhere its quantize-dequantize emulation.
- Any other attention (dropout, symbolic ``is_causal``/``scale``, the matmul-softmax-matmul form)
  keeps its own attention ops and gets ``hadacore::fp8_qdq(x, 1/sqrt(D))`` on Q and K: R3
  and the same per-head e4m3 round trip in one op (emulation on every device).
"""

from __future__ import annotations

import logging
import numbers

import torch
from torch import fx

from hadacore.fxpasses.context import AttentionBlock, PassContext, call_op, op_arguments
from hadacore.fxpasses.stats import bump

log = logging.getLogger("hadacore.compiler")

_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


def _sdpa_call(node: fx.Node) -> dict:
    call = dict(zip(_SDPA_ARGS, node.args))
    call.update(node.kwargs)
    return call


def _fuse_sdpa(ctx: PassContext, block: AttentionBlock, hq: fx.Node, hk: fx.Node) -> str | None:
    """Replace the SDPA by ``hadacore::fp8_attention``; return why not, or None."""
    call = _sdpa_call(block.node)
    if call.get("dropout_p", 0.0) not in (0, 0.0):
        return "attention has dropout"
    scale, causal = call.get("scale"), call.get("is_causal", False)
    if not (scale is None or isinstance(scale, numbers.Real)) or not isinstance(causal, bool):
        return "scale / is_causal are not constants"
    with ctx.graph.inserting_before(block.node):
        new = call_op(ctx.graph, torch.ops.hadacore.fp8_attention, q=op_arguments(hq)["x"], k=op_arguments(hk)["x"],
                      v=call["value"], is_causal=causal, scale=None if scale is None else float(scale), rotate=True,
                      quantize=True, attn_mask=call.get("attn_mask"))
    new.meta.update({k: v for k, v in block.node.meta.items() if k == "example_value"})
    block.node.replace_all_uses_with(new)
    ctx.graph.erase_node(block.node)
    for had in (hq, hk):
        if not had.users:
            ctx.graph.erase_node(had)
    block.node = new
    return None


def fp8_attention(ctx: PassContext) -> None:
    if not ctx.options.fp8_attention:
        return
    for block in ctx.attention:
        pair = ctx.r3.get(block.name)
        if pair is None:
            continue  # rotate_online logged why R3 was not applied
        why = _fuse_sdpa(ctx, block, *pair) if block.form == "sdpa" else "explicit matmul-softmax attention"
        if why is None:
            bump("fp8_attention_fused")
            log.debug("hadacore: %s -> hadacore::fp8_attention", block.name)
            continue
        log.info("hadacore: %s: FP8 Q/K by quantize-dequantize around the original attention (%s)", block.name, why)
        for had in pair:  # hadamard(x, s) -> fp8_qdq(x, s): R3 and the quantization in one op
            a = op_arguments(had)
            with ctx.graph.inserting_before(had):
                qdq = call_op(ctx.graph, torch.ops.hadacore.fp8_qdq, x=a["x"], hadamard_scale=float(a["scale"]))
            qdq.meta.update(had.meta)
            had.replace_all_uses_with(qdq)
            ctx.graph.erase_node(had)
            bump("fp8_qdq_inserted")

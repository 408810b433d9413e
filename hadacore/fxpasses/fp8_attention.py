"""FP8 attention (``fp8_attention=True``): Q and K get R3 fused with per-head FP8 e4m3
quantization, V gets per-head FP8 quantization.

The graph computes attention on quantize-dequantized Q/K/V (``hadacore::fp8_qdq``): on
CPU that is the emulation that lets accuracy be measured anywhere; on CUDA the same op
runs (a Triton FP8 attention template that consumes the FP8 tensors directly is not
built yet).
"""

from __future__ import annotations

import logging

import torch

from hadacore.fxpasses.context import PassContext
from hadacore.fxpasses.stats import bump

log = logging.getLogger("hadacore.compiler")


def fp8_attention(ctx: PassContext) -> None:
    if not ctx.options["fp8_attention"]:
        return
    for block in ctx.attention:
        pair = ctx.r3.get(block.name)
        if pair is None:
            continue  # rotate_online logged why R3 was not applied
        for had in pair:  # hadamard(x, s) -> fp8_qdq(x, s): R3 and the quantization in one op
            had.target = torch.ops.hadacore.fp8_qdq.default
            had.args = (had.args[0], float(had.args[1]))
            bump("fp8_qdq_inserted")
        v = block.v
        consumer = block.node if block.form == "sdpa" else next(
            (u for u in block.node.users if len(u.args) > 1 and u.args[1] is v), None)
        if consumer is None:
            continue
        with ctx.graph.inserting_before(consumer):
            qv = ctx.graph.call_function(torch.ops.hadacore.fp8_qdq.default, (v, 0.0))
        qv.meta.update({k: val for k, val in v.meta.items() if k == "example_value"})
        if block.form == "sdpa" and len(consumer.args) <= 2:
            consumer.update_kwarg("value", qv)
        else:
            consumer.update_arg(2 if block.form == "sdpa" else 1, qv)
        bump("fp8_qdq_inserted")

"""FX-level lowering: pick, per device, the implementation of each fused ``hadacore::*`` node.

The choice is recorded in ``node.meta["hadacore_lowering"]`` and logged.

- CUDA: the node keeps ``hadacore::w4a16_gemm``, whose CUDA registration launches the
  Triton kernel; the SplitK config is chosen at run time from the real M inside the op,
  so a dynamic batch/sequence never forces a recompile.
- CPU: the weight is prepared once, at compile time
  (``hadacore.lowering.w4a16.prepare_w4a16_cpu``: repacked for torch's int4 kernel plus a
  bf16 copy for larger M), the prepared tensors become graph constants, and the node
  becomes ``hadacore::w4a16_gemm_cpu`` (int4 kernel for small M, bf16 BLAS above; the
  choice is made per call inside the op, again without guards). W4A16 means 16-bit
  activations: on this path activations are computed in bf16 whatever the model dtype,
  so results match the fp32 reference to bf16 tolerance (~1e-2), not fp32's. Like
  compile-time quantization it snapshots the weights.

Shape conditions are checked on the (possibly symbolic) sizes with
``statically_known_true``, which never adds a guard: a condition that is not provable for
every size falls back to the general path instead of specialising the graph.
"""

from __future__ import annotations

import logging
from typing import Any

import sympy
import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from hadacore.fxpasses.cleanup import drop_unused_constants, eliminate_dead_code
from hadacore.fxpasses.context import PassContext, example_value, is_call
from hadacore.lowering.w4a16 import prepare_w4a16_cpu

__all__ = ["lower", "known_multiple"]

log = logging.getLogger("hadacore.compiler")

_W4A16 = (torch.ops.hadacore.w4a16_gemm,)


def known_multiple(size: Any, d: int) -> bool:
    """``size % d == 0`` provably for every value of a (possibly symbolic) size; no guard added."""
    if isinstance(size, int):
        return size % d == 0
    if isinstance(size, torch.SymInt):
        return statically_known_true(size % d == 0)
    return bool(sympy.Mod(size, d) == 0)


def _lower_w4a16(ctx: PassContext, node: fx.Node) -> str:
    x = example_value(node.args[0])
    device = x.device.type if x is not None else "cpu"
    k = x.shape[-1] if x is not None else None
    if device == "cuda":
        # The Triton SplitK kernel masks any M/N/K tail; the config is picked per call.
        return "cuda:triton-w4a16" + ("" if k is None or not known_multiple(k, 64) else " (K%64==0)")
    if device != "cpu":
        return f"{device}:native"
    _, qweight, qzeros, scales, g_idx, bias, group_size = node.args[:7]
    tensors = [ctx.constant(a) for a in (qweight, qzeros, scales)]
    gi = ctx.constant(g_idx) if g_idx is not None else None
    if any(t is None for t in tensors) or (g_idx is not None and gi is None):
        return "cpu:native (weights are not constants)"
    prepared = prepare_w4a16_cpu(*tensors, gi, group_size)
    names = ("packed", "scales_and_zeros", "weight", "perm")
    args = [None if t is None else ctx.add_constant(f"{node.name}.{n}", t, node) for n, t in zip(names, prepared.op_args()[:4])]
    with ctx.graph.inserting_before(node):
        new = ctx.graph.call_function(
            torch.ops.hadacore.w4a16_gemm_cpu.default,
            (node.args[0], *args, bias, prepared.int4_group_size, prepared.out_features, prepared.int4_max_m),
        )
    new.meta.update(node.meta)
    node.replace_all_uses_with(new)
    ctx.graph.erase_node(node)
    choice = "cpu:prepared " + ("int4+bf16" if prepared.packed is not None else "bf16")
    new.meta["hadacore_lowering"] = choice
    return choice


def lower(ctx: PassContext) -> fx.GraphModule:
    """Pick the per-device implementation of every fused node (see the module docstring)."""
    for node in list(ctx.graph.nodes):
        if is_call(node, _W4A16):
            name = node.name
            node.meta["hadacore_lowering"] = choice = _lower_w4a16(ctx, node)
            log.debug("hadacore: %s lowered to %s", name, choice)
    eliminate_dead_code(ctx.graph)
    drop_unused_constants(ctx)
    ctx.gm.recompile()
    return ctx.gm

"""FX-level lowering: pick, per device, the implementation of each fused ``hadacore::*`` node.

The choice is recorded in ``node.meta["hadacore_lowering"]`` and logged. CUDA nodes keep
the op, whose CUDA registration launches the Triton kernel (SplitK config chosen at run
time from the real M, so a dynamic batch/sequence never forces a recompile). CPU nodes use
the native path: a prepared-weight int4 kernel when ``hadacore.lowering.w4a16`` offers one
(``prepare_cpu_w4a16``), else the op's generic native implementation.

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

from hadacore.fxpasses.context import PassContext, example_value, is_call

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
        # The Triton SplitK kernel masks any M/N/K tail; a K that is provably a multiple of
        # the group size lets its K loop skip the group-boundary checks.
        return "cuda:triton-w4a16" + ("" if k is None or not known_multiple(k, 64) else " (K%64==0)")
    try:
        from hadacore.lowering import w4a16 as native
    except ImportError:  # pragma: no cover
        native = None
    if native is not None and hasattr(native, "prepare_cpu_w4a16"):
        return "cpu:prepared-int4"
    return "cpu:native"


def lower(ctx: PassContext) -> fx.GraphModule:
    """Annotate every fused node with its per-device implementation."""
    for node in ctx.graph.nodes:
        if is_call(node, _W4A16):
            node.meta["hadacore_lowering"] = choice = _lower_w4a16(ctx, node)
            log.debug("hadacore: %s lowered to %s", node.name, choice)
    ctx.gm.recompile()
    return ctx.gm

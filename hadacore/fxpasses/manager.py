"""The pass manager: the ordered pass list (lowering last), each run counted, graphs logged before/after."""

from __future__ import annotations

import logging
from typing import Callable

from torch import fx

from hadacore.fxpasses.context import PassContext
from hadacore.fxpasses.stats import count_pass

log = logging.getLogger("hadacore.compiler")

Pass = Callable[[PassContext], None]


def default_passes(*, lower: bool = True) -> list[tuple[str, Pass]]:
    """The passes in the order they run. Analysis first, then the rewrites that need the
    float weights (rotation), then quantization, then the ones that move GPTQ tensors
    (permutation, horizontal fusion), then the final op rewrites, and last ``lower``, which
    picks each fused op's per-device implementation (``lower=False`` leaves the generic,
    exact ops: what pass tests compare at fp32 tolerances)."""
    from hadacore.fxpasses.block_graph import build_block_graph
    from hadacore.fxpasses.cleanup import cleanup
    from hadacore.fxpasses.find_attention import find_attention
    from hadacore.fxpasses.find_linears import find_linears
    from hadacore.fxpasses.fp8_attention import fp8_attention
    from hadacore.fxpasses.fuse_horizontal import fuse_horizontal
    from hadacore.fxpasses.quantize import quantize
    from hadacore.fxpasses.rotate import rotate_online
    from hadacore.fxpasses.fold_act_order import fold_act_order
    from hadacore.fxpasses.lower import lower as lower_pass
    from hadacore.fxpasses.rewrite_w4a16 import rewrite_w4a16

    passes = [
        ("find_linears", find_linears),
        ("find_attention", find_attention),
        ("block_graph", build_block_graph),
        ("rotate_online", rotate_online),
        ("quantize", quantize),
        ("fold_act_order", fold_act_order),
        ("fuse_horizontal", fuse_horizontal),
        ("rewrite_w4a16", rewrite_w4a16),
        ("fp8_attention", fp8_attention),
        ("cleanup", cleanup),
    ]
    return passes + [("lower", lower_pass)] if lower else passes


def run_passes(ctx: PassContext, passes: list[tuple[str, Pass]] | None = None) -> fx.GraphModule:
    """Run ``passes`` (default: :func:`default_passes`) over ``ctx.gm`` in order."""
    if log.isEnabledFor(logging.DEBUG):
        log.debug("hadacore: graph before passes:\n%s", ctx.gm.print_readable(print_output=False))
    for name, fn in passes if passes is not None else default_passes():
        fn(ctx)
        count_pass(name)
    if log.isEnabledFor(logging.DEBUG):
        log.debug("hadacore: graph after passes:\n%s", ctx.gm.print_readable(print_output=False))
    return ctx.gm

"""The last pass: lower each fused ``hadacore::*`` node to its per-device implementation.

The choice is recorded in ``node.meta["hadacore_lowering"]`` and logged.

- CUDA: the node keeps ``hadacore::w4a16_gemm``, whose CUDA registration launches the
  Triton kernel; the SplitK config is chosen at run time from the real M inside the op,
  so a dynamic batch/sequence never forces a recompile.
- CPU: the weight is prepared once, at compile time
  (:func:`hadacore.kernels.cpu.w4a16.prepare_w4a16_cpu`: repacked for torch's int4 kernel plus a
  bf16 copy for larger M) and the prepared tensors become graph constants. When M (rows
  of x) provably lies on one side of ``int4_max_m`` for every size, as in a static decode
  step (M = batch) or a fixed-length prefill, the node becomes that path's plain aten
  code (:func:`~hadacore.kernels.cpu.w4a16.int4_linear` or ``bf16_linear``), which
  AOTAutograd traces: Inductor fuses its casts and gather into the neighbouring kernels
  and calls the int4 kernel directly, and only that path's tensors are kept. Otherwise
  (dynamic M) it becomes ``hadacore::w4a16_gemm_cpu``, which picks the path per call,
  without guards. W4A16 means 16-bit activations: on this path activations are computed
  in bf16 whatever the model dtype, so results match the fp32 reference to bf16
  tolerance (~1e-2), not fp32's. Like compile-time quantization it snapshots the weights.
- CPU Hadamard: when x is provably small (decode-sized; ``use_matmul_form``),
  ``hadacore::hadamard`` becomes
  :func:`~hadacore.kernels.cpu.hadamard.hadamard_by_matmuls`: the same factor matrices as
  graph constants and a few matmuls that Inductor compiles (no Python op dispatch per
  call, which costs more than the transform itself at decode sizes). Larger inputs keep
  the op, whose blocked native path keeps its work buffers in L2.

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
from hadacore.fxpasses.context import PassContext, example_value, is_call, op_arguments
from hadacore.kernels.checks import check_perm_values
from hadacore.kernels.cpu.hadamard import hadamard_by_matmuls, matmul_plan, use_matmul_form
from hadacore.kernels.cpu.w4a16 import bf16_linear, default_int4_max_m, int4_linear, prepare_w4a16_cpu
from hadacore.quant.act_order import sort_by_group

__all__ = ["lower", "known_multiple"]

log = logging.getLogger("hadacore.compiler")

_W4A16 = (torch.ops.hadacore.w4a16_gemm,)
_HADAMARD = (torch.ops.hadacore.hadamard,)


def known_multiple(size: Any, d: int) -> bool:
    """``size % d == 0`` provably for every value of a (possibly symbolic) size; no guard added."""
    if isinstance(size, int):
        return size % d == 0
    if isinstance(size, torch.SymInt):
        return statically_known_true(size % d == 0)
    return bool(sympy.Mod(size, d) == 0)


def _replace(ctx: PassContext, node: fx.Node, fn: Any, args: tuple) -> fx.Node:
    """``fn(*args)`` in place of ``node`` (same meta), which is erased."""
    with ctx.graph.inserting_before(node):
        new = ctx.graph.call_function(fn, args)
    new.meta.update(node.meta)
    node.replace_all_uses_with(new)
    ctx.graph.erase_node(node)
    return new


def _lower_w4a16(ctx: PassContext, node: fx.Node) -> tuple[fx.Node, str]:
    a = op_arguments(node)
    x = example_value(a["x"])
    device = x.device.type if x is not None else "cpu"
    k = x.shape[-1] if x is not None else None
    if device == "cuda":
        # The Triton SplitK kernel masks any M/N/K tail; the config is picked per call.
        return node, "cuda:triton-w4a16" + ("" if k is None or not known_multiple(k, 64) else " (K%64==0)")
    if device != "cpu":
        return node, f"{device}:native"
    bias, group_size = a["bias"], a["group_size"]
    tensors = {name: ctx.constant(a[name]) for name in ("qweight", "qzeros", "scales", "g_idx")}
    if any(t is None and a[name] is not None for name, t in tensors.items()):
        return node, "cpu:native (weights are not constants)"
    gptq, perm = sort_by_group({k: t for k, t in tensors.items() if t is not None})  # act-order: x gathered
    # Which side of the int4/bf16 threshold M lies on, if that is provable for every size:
    # then only that path's tensors are prepared and the node becomes its plain aten code.
    m, limit = _rows(x), default_int4_max_m(gptq["qweight"].shape[0] * 8)  # 4-bit: 8 weights per int32 of K
    small = m is not None and statically_known_true(m <= limit)
    large = m is not None and statically_known_true(m > limit)
    prepared = prepare_w4a16_cpu(gptq["qweight"], gptq["qzeros"], gptq["scales"], gptq.get("g_idx"), group_size,
                                 perm=perm, dense=False if small else None, int4=not large, int4_max_m=limit)
    args = {
        name: None if t is None else ctx.add_constant(f"{node.name}.{name}", t, node)
        for name, t in zip(("packed", "scales_and_zeros", "weight", "perm"), prepared.op_args()[:4])
    }
    x_node = a["x"]
    if prepared.weight is None:
        choice = f"cpu:int4 (M <= {limit} known at compile time)"
        new = _replace(ctx, node, int4_linear, (
            x_node, args["packed"], args["scales_and_zeros"], args["perm"], bias,
            prepared.int4_group_size, prepared.out_features,
        ))
    elif prepared.packed is None:
        choice = "cpu:bf16 BLAS" + (f" (M > {limit} known at compile time)" if large else "")
        new = _replace(ctx, node, bf16_linear, (x_node, args["weight"], bias))
    else:
        choice = "cpu:prepared int4+bf16, dispatch on M per call"
        new = _replace(ctx, node, torch.ops.hadacore.w4a16_gemm_cpu.default, (
            x_node, *args.values(), bias, prepared.int4_group_size, prepared.out_features, prepared.int4_max_m,
        ))
    return new, choice


def _rows(x: Any) -> Any:
    """M = rows of x (product of its leading dims; symbolic under dynamic shapes), or None."""
    if x is None:
        return None
    m = 1
    for d in x.shape[:-1]:
        m = m * d
    return m


def _lower_hadamard(ctx: PassContext, node: fx.Node) -> tuple[fx.Node, str]:
    a = op_arguments(node)
    x = example_value(a["x"])
    if x is None or x.device.type != "cpu":
        return node, "op" if x is None else f"{x.device.type}:op"
    n = x.shape[-1]
    if not isinstance(n, int) or n < 2 or not statically_known_true(use_matmul_form(_rows(x), n)):
        return node, "cpu:op (x not known to be small)"
    perm = a["perm"]
    if perm is not None:  # the op checks its values per call; the matmul form once, here
        value = ctx.constant(perm)
        if value is None:
            return node, "cpu:op (perm is not a constant)"
        check_perm_values(value, n)
    matrices, afters = matmul_plan(n, float(a["scale"]), x.dtype, x.device, signed=a["signs"] is not None)
    mats = [ctx.add_constant(f"{node.name}.h{i}", h, node) for i, h in enumerate(matrices)]
    new = _replace(ctx, node, hadamard_by_matmuls, (a["x"], a["signs"], perm, mats, afters))
    return new, "cpu:matmuls " + "x".join(str(h.shape[0]) for h in matrices) + f" ({matrices[0].dtype})"


def lower(ctx: PassContext) -> fx.GraphModule:
    """Pick the per-device implementation of every fused node (see the module docstring)."""
    for node in list(ctx.graph.nodes):
        lower_node = _lower_w4a16 if is_call(node, _W4A16) else _lower_hadamard if is_call(node, _HADAMARD) else None
        if lower_node is not None:
            name = node.name
            carrier, choice = lower_node(ctx, node)  # the node itself, or the one that replaced it
            carrier.meta["hadacore_lowering"] = choice
            log.debug("hadacore: %s lowered to %s", name, choice)
    eliminate_dead_code(ctx.graph)
    drop_unused_constants(ctx)
    ctx.gm.recompile()
    return ctx.gm

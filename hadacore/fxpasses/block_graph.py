"""The block graph (networkx): which linear feeds which, through which ops.

Nodes are linear sites (by layer name) and attention cores; an edge ``a -> b`` carries
the ops between them (``ops``: sorted op names). On top of it: MLP triples
``(gate, up, down)`` where ``down`` reads ``silu(gate(x)) * up(x)``, and residual adds
(an ``add`` one of whose operands is a linear's output).
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Any, Optional

import networkx as nx
import torch
from torch import fx

from hadacore.fxpasses.context import MUL_TARGETS, SILU_TARGETS, PassContext, is_call, op_arguments, skip_dtype_casts

_ADD = (operator.add, torch.add, torch.ops.aten.add.Tensor)
_LIMIT = 256


@dataclasses.dataclass
class MLPBlock:
    gate: str
    up: str
    down: str
    mul: fx.Node  # silu(gate) * up, the down projection's input
    silu: fx.Node


def _op_name(node: fx.Node) -> str:
    return str(node.target) if node.op == "call_method" else getattr(node.target, "__name__", str(node.target))


def _producers(ctx: PassContext, start: Any, stop: dict) -> dict[str, set[str]]:
    """Sites/attention cores reaching ``start`` backwards, with the ops on the way."""
    found: dict[str, set[str]] = {}
    stack: list[tuple[fx.Node, frozenset]] = [(start, frozenset())] if isinstance(start, fx.Node) else []
    seen: set[fx.Node] = set()
    while stack and len(seen) < _LIMIT:
        node, ops = stack.pop()
        if node in stop:
            found.setdefault(stop[node], set()).update(ops)
            continue
        if node in seen or node.op not in ("call_function", "call_method"):
            continue
        seen.add(node)
        stack.extend((a, ops | {_op_name(node)}) for a in node.all_input_nodes)
    return found


def match_mlp(ctx: PassContext, x: Any) -> Optional[MLPBlock]:
    """``x == silu(gate_out) * up_out`` (either operand order), with gate/up linear sites."""
    if not is_call(x, MUL_TARGETS, "mul") or len(x.args) != 2:
        return None
    a, b = x.args
    for s, u in ((a, b), (b, a)):
        if is_call(s, SILU_TARGETS):
            gate, up = ctx.site_of_output(s.args[0]), ctx.site_of_output(u)
            if gate is not None and up is not None and gate is not up:
                return MLPBlock(gate=gate.name, up=up.name, down="", mul=x, silu=s)
    return None


def build_block_graph(ctx: PassContext) -> None:
    g = nx.DiGraph()
    stop: dict[fx.Node, str] = {}
    for s in ctx.sites:
        g.add_node(s.name, kind=s.kind, in_features=s.in_features, out_features=s.out_features)
        stop[s.node] = s.name
    for a in ctx.attention:
        g.add_node(a.name + ".attn", kind="attention", form=a.form, head_dim=a.head_dim)
        for proj in (a.q_proj, a.k_proj, a.v_proj):
            if proj:
                g.add_edge(proj, a.name + ".attn", ops=[])
        if a.o_proj:
            g.add_edge(a.name + ".attn", a.o_proj, ops=[])
        stop[a.node] = a.name + ".attn"
    for s in ctx.sites:
        for src, ops in _producers(ctx, s.x, stop).items():
            if not g.has_edge(src, s.name):
                g.add_edge(src, s.name, ops=sorted(ops))
    ctx.mlps = []
    for s in ctx.sites:
        x = op_arguments(s.hadamard)["x"] if s.hadamard is not None else s.x
        mlp = match_mlp(ctx, skip_dtype_casts(x))
        if mlp is not None:
            mlp.down = s.name
            ctx.mlps.append(mlp)
            g.nodes[mlp.gate]["role"], g.nodes[mlp.up]["role"], g.nodes[s.name]["role"] = "gate", "up", "down"
    g.graph["residual_adds"] = [
        n.name for n in ctx.graph.nodes
        if is_call(n, _ADD) and any(isinstance(a, fx.Node) and skip_dtype_casts(a) in stop for a in n.args)
    ]
    ctx.block_graph = g

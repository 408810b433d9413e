"""Find attention blocks: ``F.scaled_dot_product_attention`` calls and the explicit
``matmul -> (scale/mask) -> softmax -> matmul`` form, with the q/k/v projections that feed
them (through view/transpose/RoPE/GQA-repeat ops) and the o_proj that consumes them."""

from __future__ import annotations

import logging
import operator
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import fx

from hadacore.fxpasses.context import MATMUL_TARGETS, SDPA_TARGETS, AttentionBlock, PassContext, example_value, is_call
from hadacore.fxpasses.stats import bump, skip

log = logging.getLogger("hadacore.compiler")

_SOFTMAX = (F.softmax, torch.softmax, torch.ops.aten._softmax.default, torch.ops.aten.softmax.int)
# Ops allowed between the scores matmul and the softmax (scaling, masking, casts, dropout).
_SCORE_FUNCS = (operator.mul, operator.truediv, operator.add, torch.mul, torch.div, torch.add, F.dropout)
_SCORE_METHODS = ("to", "float", "__mul__", "__truediv__", "__add__", "mul", "div", "add")
# View-like ops between attention output and o_proj.
_VIEW_METHODS = ("view", "reshape", "transpose", "permute", "contiguous", "to", "flatten")
_VIEW_FUNCS = (torch.transpose, torch.reshape, torch.flatten, torch.permute)
_LIMIT = 256


def _arg(node: fx.Node, i: int, name: str) -> Any:
    return node.args[i] if len(node.args) > i else node.kwargs.get(name)


def projections_feeding(ctx: PassContext, start: Any) -> list[str]:
    """Names of the linear sites whose outputs reach ``start`` through non-linear ops
    (views, RoPE arithmetic, GQA repeat), searching backwards without crossing a linear."""
    outputs = {s.node: s.name for s in ctx.sites}
    found: list[str] = []
    seen: set[fx.Node] = set()
    stack = [start] if isinstance(start, fx.Node) else []
    while stack and len(seen) < _LIMIT:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node in outputs:
            found.append(outputs[node])
            continue
        if node.op not in ("call_function", "call_method") or is_call(node, MATMUL_TARGETS + SDPA_TARGETS):
            continue
        stack.extend(a for a in node.all_input_nodes)
    return sorted(set(found))


def consumer_projection(ctx: PassContext, start: fx.Node) -> Optional[str]:
    """The linear site reading ``start`` through view-like ops only (the o_proj)."""
    inputs = {s.x: s.name for s in ctx.sites}
    frontier = [start]
    for _ in range(16):
        nxt = []
        for node in frontier:
            if node in inputs:
                return inputs[node]
            for user in node.users:
                if is_call(user, _VIEW_FUNCS, None) or (user.op == "call_method" and user.target in _VIEW_METHODS):
                    nxt.append(user)
                elif any(s.x is node and s.node is user for s in ctx.sites):
                    return next(s.name for s in ctx.sites if s.node is user)
        frontier = nxt
    return None


def _is_transpose_last2(node: Any) -> bool:
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_method" and node.target == "transpose" or is_call(node, (torch.transpose,)):
        dims = [d for d in node.args[1:3]]
        ev = example_value(node)
        nd = ev.dim() if ev is not None else 4
        return sorted(d % nd for d in dims if isinstance(d, int)) == [nd - 2, nd - 1]
    return False


def _matmul_softmax_blocks(ctx: PassContext) -> list[tuple[fx.Node, Any, Any, Any, bool]]:
    out = []
    for sm in ctx.graph.nodes:
        if not (is_call(sm, _SOFTMAX) or sm.op == "call_method" and sm.target == "softmax"):
            continue
        node = sm.args[0]
        for _ in range(8):  # walk back over scaling / masking / casts
            if is_call(node, MATMUL_TARGETS):
                break
            if isinstance(node, fx.Node) and (is_call(node, _SCORE_FUNCS) or node.op == "call_method" and node.target in _SCORE_METHODS):
                node = node.args[0]
            else:
                node = None
                break
        if not is_call(node, MATMUL_TARGETS):
            continue
        q, kt = node.args[0], node.args[1]
        pv = [u for u in sm.users if is_call(u, MATMUL_TARGETS) and u.args[0] is sm]
        if len(pv) != 1:
            skip("softmax output is not multiplied by V", sm.name)
            continue
        transposed = _is_transpose_last2(kt)
        out.append((sm, q, kt.args[0] if transposed else kt, pv[0].args[1], not transposed, pv[0]))
    return out


def find_attention(ctx: PassContext) -> None:
    ctx.attention = []
    cores: list[tuple[fx.Node, str, Any, Any, Any, bool, fx.Node]] = []
    for node in ctx.graph.nodes:
        if is_call(node, SDPA_TARGETS):
            cores.append((node, "sdpa", _arg(node, 0, "query"), _arg(node, 1, "key"), _arg(node, 2, "value"), False, node))
    for sm, q, k, v, kt, out in _matmul_softmax_blocks(ctx):
        cores.append((sm, "matmul_softmax", q, k, v, kt, out))
    for i, (node, form, q, k, v, k_transposed, out) in enumerate(cores):
        qv = example_value(q)
        head_dim = qv.shape[-1] if qv is not None else None
        if not isinstance(head_dim, int):
            skip("attention head_dim is not a static int", node.name)
            continue
        block = AttentionBlock(node=node, form=form, q=q, k=k, v=v, head_dim=head_dim, k_is_transposed=k_transposed)
        for attr, start in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
            found = projections_feeding(ctx, start)
            setattr(block, attr, found[0] if len(found) == 1 else None)
        block.o_proj = consumer_projection(ctx, out)
        block.name = block.q_proj.rsplit(".", 1)[0] if block.q_proj else f"attention{i}"
        ctx.attention.append(block)
        bump("attention_found")
        log.debug("hadacore: attention %s (%s): q=%s k=%s v=%s o=%s head_dim=%d", block.name, form,
                  block.q_proj, block.k_proj, block.v_proj, block.o_proj, head_dim)

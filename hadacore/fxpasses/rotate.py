"""Online rotations (``rotate="online"``; R3 also for ``fp8_attention``).

- R4: ``hadamard(h, 1/sqrt(K))`` before each down_proj (found structurally: the linear
  that reads ``silu(gate(x)) * up(x)``), with ``W_down <- W_down H / sqrt(K)`` so the layer
  computes the same function: ``(h H)(W H)^T / K = h W^T`` since ``H H^T = K I``.
- R3: ``hadamard(., 1/sqrt(head_dim))`` on Q and K after RoPE: ``(q H)(k H)^T / d = q k^T``,
  so scores are unchanged; it spreads outliers before FP8 quantization. K is rotated
  before a GQA repeat (the transform commutes with repeating whole rows), so a static
  cache's K costs kv_heads, not heads, rotations per step; with FP8 attention it is
  rotated as attention reads it, where the FP8 pass fuses it with the quantization.
"""

from __future__ import annotations

import logging
import math
import operator

import torch
from torch import fx

from hadacore.fxpasses.context import AttentionBlock, PassContext, example_value, is_call
from hadacore.fxpasses.stats import bump, skip
from hadacore.hadamard import check_hadamard_size

log = logging.getLogger("hadacore.compiler")

_HADAMARD = torch.ops.hadacore.hadamard.default


def insert_hadamard(ctx: PassContext, x: fx.Node, n: int, before: fx.Node) -> fx.Node:
    with ctx.graph.inserting_before(before):
        h = ctx.graph.call_function(_HADAMARD, (x, 1.0 / math.sqrt(n)))
    if "example_value" in x.meta:
        h.meta["example_value"] = x.meta["example_value"]
    bump("hadamard_inserted")
    return h


def rotate_weight_input(w: torch.Tensor) -> torch.Tensor:
    """``W H / sqrt(K)`` with the very op the runtime rotation uses (fp32 accumulation)."""
    return torch.ops.hadacore.hadamard(w.float(), 1.0 / math.sqrt(w.shape[1])).to(w.dtype)


def _rotate_down_proj(ctx: PassContext, mlp) -> None:
    site = ctx.site(mlp.down)
    if site.kind != "float":
        skip("down_proj already quantized: its weight cannot be rotated here" if site.hadamard is None
             else "down_proj already carries an online Hadamard", site.name)
        return
    k = site.in_features
    check_hadamard_size(k, what=f"R4 on {site.name} (intermediate size)")
    had = insert_hadamard(ctx, site.x, k, site.node)
    site.weight = rotate_weight_input(site.weight)
    w_node = ctx.add_constant(f"{site.name}.weight_r4", site.weight, site.node)
    site.node.update_arg(0, had)
    site.node.update_arg(1, w_node)
    site.x, site.hadamard = had, had


def _replace_q_k(block: AttentionBlock, hq: fx.Node, hk: fx.Node, k_consumer: fx.Node) -> None:
    node = block.node
    if block.form == "sdpa":
        for i, key, new in ((0, "query", hq), (1, "key", hk)):
            if len(node.args) > i:
                node.update_arg(i, new)
            else:
                node.update_kwarg(key, new)
    else:
        scores = _scores_matmul(block)
        scores.update_arg(0, hq)
        k_consumer.update_arg(0, hk)


def _scores_matmul(block: AttentionBlock) -> fx.Node:
    from hadacore.fxpasses.find_attention import _MATMUL
    from hadacore.fxpasses.context import is_call

    node = block.node.args[0]
    while not is_call(node, _MATMUL):
        node = node.args[0]
    return node


def _moves_whole_rows(node: fx.Node, d: int) -> bool:
    """Whether ``node`` only rearranges or repeats whole last-dim rows of its first input
    (GQA's ``k[:, :, None].expand(...).reshape(...)``): then a transform along the last dim
    commutes with it. Needs example values; anything unrecognised answers False."""
    out, src = example_value(node), example_value(node.args[0]) if node.args else None
    if out is None or src is None or out.shape[-1] != d or src.shape[-1] != d:
        return False
    if node.op == "call_method" and node.target in ("expand", "reshape", "view", "contiguous"):
        return True  # the last dim keeps its size, so every output row is an input row
    if is_call(node, (operator.getitem,)):
        idx = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
        if any(i is Ellipsis or not (i is None or isinstance(i, (int, slice))) for i in idx):
            return False
        indexed = [i for i in idx if i is not None]
        return len(indexed) < src.dim() or indexed[-1] == slice(None)
    return False


def _rotated_before_repeat(ctx: PassContext, k: fx.Node, d: int, before: fx.Node) -> tuple[fx.Node, fx.Node]:
    """``(hadamard node, K as attention reads it)`` with the rotation applied before any
    row-repeating views (GQA): on the KV heads, not on their repeated copies."""
    chain = []
    src = k
    while isinstance(src, fx.Node) and len(chain) < 8 and _moves_whole_rows(src, d):
        chain.append(src)
        src = src.args[0]
    had = insert_hadamard(ctx, src, d, before)
    out = had
    for node in reversed(chain):  # re-apply the views to the rotated K (originals stay for any other user)
        with ctx.graph.inserting_before(before):
            out = ctx.graph.node_copy(node, lambda a, node=node, out=out: out if a is node.args[0] else a)
    return had, out


def _r3(ctx: PassContext, block: AttentionBlock) -> None:
    if block.form != "sdpa" and block.k_is_transposed:
        skip("attention scores read K already transposed; R3 needs K itself", block.name)
        return
    check_hadamard_size(block.head_dim, what=f"R3 on attention {block.name} (head_dim)")
    if block.form == "sdpa":
        anchor, k_consumer = block.node, block.node
    else:
        anchor = _scores_matmul(block)
        k_consumer = anchor.args[1]  # the transpose of K
        anchor = k_consumer
    hq = insert_hadamard(ctx, block.q, block.head_dim, anchor)
    if ctx.options["fp8_attention"]:  # the FP8 pass fuses R3 with the quantization of K as attention reads it
        hk = k_in = insert_hadamard(ctx, block.k, block.head_dim, anchor)
    else:  # R3 before the GQA repeat: heads/kv_heads times less work on the (whole, cached) K
        hk, k_in = _rotated_before_repeat(ctx, block.k, block.head_dim, anchor)
    _replace_q_k(block, hq, k_in, k_consumer)
    ctx.r3[block.name] = (hq, hk)
    bump("attention_rewritten")


def rotate_online(ctx: PassContext) -> None:
    r4 = ctx.options["rotate"] == "online"
    r3 = r4 or ctx.options["fp8_attention"]
    if r4:
        for mlp in ctx.mlps:
            _rotate_down_proj(ctx, mlp)
    if r3:
        for block in ctx.attention:
            _r3(ctx, block)

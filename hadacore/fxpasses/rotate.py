"""Online rotations (``rotate="online"``; R3 also for ``fp8_attention``).

- R4: ``hadamard(h, 1/sqrt(K))`` before each down_proj (found structurally: the linear
  that reads ``silu(gate(x)) * up(x)``), with ``W_down <- W_down H / sqrt(K)`` so the layer
  computes the same function: ``(h H)(W H)^T / K = h W^T`` since ``H H^T = K I``.
- R3: ``hadamard(., 1/sqrt(head_dim))`` on Q and K after RoPE: ``(q H)(k H)^T / d = q k^T``,
  so scores are unchanged; it spreads outliers before FP8 quantization. Where K is rotated:
  - ``rotated_kv_cache=True``: where it is written into the KV cache (QuaRot's place), so
    the cache holds rotated keys and a step rotates only its new rows. Every writer of the
    cache must then rotate too (the option's contract). A cache whose writes this pass
    cannot account for is an error: rotating at read there would double-rotate the keys
    other graphs wrote.
  - otherwise as attention reads it, before any GQA repeat (the transform commutes with
    repeating whole rows): a static cache's whole K, on kv_heads rather than heads;
  - with FP8 attention, as attention reads it, where the FP8 pass fuses it with the
    quantization.
"""

from __future__ import annotations

import contextlib
import logging
import math
import operator

import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from hadacore.fxpasses.context import MATMUL_TARGETS, AttentionBlock, PassContext, call_op, example_value, is_call
from hadacore.fxpasses.stats import bump, skip
from hadacore.hadamard import check_hadamard_size

log = logging.getLogger("hadacore.compiler")


def insert_hadamard(ctx: PassContext, x: fx.Node, n: int, before: fx.Node) -> fx.Node:
    with ctx.graph.inserting_before(before):
        h = call_op(ctx.graph, torch.ops.hadacore.hadamard, x=x, scale=1.0 / math.sqrt(n))
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
    node = block.node.args[0]
    while not is_call(node, MATMUL_TARGETS):
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


def _row_moves(k: fx.Node, d: int) -> tuple[list[fx.Node], fx.Node]:
    """``(views, source)``: the row-moving views (:func:`_moves_whole_rows`) K went through,
    outermost first, and the tensor they start from."""
    chain, src = [], k
    while isinstance(src, fx.Node) and len(chain) < 8 and _moves_whole_rows(src, d):
        chain.append(src)
        src = src.args[0]
    return chain, src


def _rotated_before_repeat(ctx: PassContext, k: fx.Node, d: int, before: fx.Node) -> tuple[fx.Node, fx.Node]:
    """``(hadamard node, K as attention reads it)`` with the rotation applied before any
    row-repeating views (GQA): on the KV heads, not on their repeated copies."""
    chain, src = _row_moves(k, d)
    had = insert_hadamard(ctx, src, d, before)
    out = had
    for node in reversed(chain):  # re-apply the views to the rotated K (originals stay for any other user)
        with ctx.graph.inserting_before(before):
            out = ctx.graph.node_copy(node, lambda a, node=node, out=out: out if a is node.args[0] else a)
    return had, out


def _cache_writes(k: fx.Node, d: int, reader: fx.Node) -> tuple[list[fx.Node], str]:
    """``(index_copy_ nodes, "")`` when attention reads K straight out of a KV-cache buffer
    (through row-moving views only) whose only writes in this graph are
    ``buf.index_copy_(seq_dim, pos, new_k)`` (HF's ``StaticCache``); ``([], "")`` when K
    does not come from a buffer (no cache: rotating K where attention reads it is the
    same); else ``([], why not)``. Any other use of the buffer (another reader, another
    in-place op, a view that could alias it) means this pass cannot vouch for what the
    cache holds."""
    chain, buf = _row_moves(k, d)
    if not (isinstance(buf, fx.Node) and (buf.op in ("placeholder", "get_attr") or is_call(buf, (torch.zeros,)))):
        return [], ""
    first_read = chain[-1] if chain else reader
    ndim = example_value(buf).dim() if example_value(buf) is not None else 0
    writes = []
    for user in buf.users:
        if user is first_read or user.op == "output":
            continue
        is_write = (user.op == "call_method" and user.target == "index_copy_" and len(user.args) == 4
                    and not user.kwargs and user.args[0] is buf and not user.users and ndim > 0
                    and isinstance(user.args[1], int) and user.args[1] % ndim != ndim - 1)
        if not is_write:
            return [], f"the cache buffer has another use ({user.format_node()})"
        writes.append(user)
    if not writes:
        return [], "nothing writes the cache buffer in this graph"
    return writes, ""


def _with_example(node: fx.Node, fn, *inputs: fx.Node) -> fx.Node:
    """Set ``node``'s example value to ``fn`` of its inputs' (under their fake mode)."""
    evs = [example_value(i) for i in inputs]
    if all(ev is not None for ev in evs):
        mode = getattr(evs[0], "fake_mode", None)
        with mode if mode is not None else contextlib.nullcontext():
            node.meta["example_value"] = fn(*evs)
    return node


def _rotate_q_and_written_k(ctx: PassContext, q: fx.Node, write: fx.Node, d: int,
                            anchor: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """R3 on Q and on the K that ``write`` stores, as one Hadamard over both concatenated
    along the head axis: one matmul instead of two per decode step. ``(Q, K)`` rotated, or
    None when their shapes or places in the graph do not line up."""
    k = write.args[3]
    qv, kv = example_value(q), example_value(k)
    if qv is None or kv is None or qv.dim() != 4 or kv.dim() != 4 or qv.dtype != kv.dtype:
        return None
    heads, kv_heads = qv.shape[1], kv.shape[1]
    if not (isinstance(heads, int) and isinstance(kv_heads, int)) or not all(
            statically_known_true(a == b) for i, (a, b) in enumerate(zip(qv.shape, kv.shape)) if i != 1):
        return None
    if not (isinstance(k, fx.Node) and q < write and k < write < anchor):  # fx nodes compare by graph order
        return None
    with ctx.graph.inserting_before(write):
        both = _with_example(ctx.graph.call_function(torch.cat, ([q, k], 1)), lambda a, b: torch.cat([a, b], 1), q, k)
    had = insert_hadamard(ctx, both, d, write)
    with ctx.graph.inserting_before(write):
        hq = _with_example(ctx.graph.call_function(torch.narrow, (had, 1, 0, heads)), lambda h: h.narrow(1, 0, heads), had)
        hk = _with_example(ctx.graph.call_function(torch.narrow, (had, 1, heads, kv_heads)),
                           lambda h: h.narrow(1, heads, kv_heads), had)
    return hq, hk


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
    d = block.head_dim
    writes, why = _cache_writes(block.k, d, k_consumer) if ctx.options.rotated_kv_cache else ([], "")
    if why:
        raise ValueError(f"hadacore: rotated_kv_cache: cannot rotate K where {block.name} writes its KV cache: "
                         f"{why}. Other graphs may store rotated keys in the same cache, so rotating K as "
                         f"attention reads it would not be exact either; compile with rotated_kv_cache=False")
    if writes:  # the cache holds rotated keys; attention reads them as they are
        k_in = block.k
        both = _rotate_q_and_written_k(ctx, block.q, writes[0], d, anchor) if len(writes) == 1 else None
        if both is not None:
            hq, hk = both
            writes[0].update_arg(3, hk)
        else:
            hq = insert_hadamard(ctx, block.q, d, anchor)
            for w in writes:
                hk = insert_hadamard(ctx, w.args[3], d, w)
                w.update_arg(3, hk)
    else:
        hq = insert_hadamard(ctx, block.q, d, anchor)
        if ctx.options.fp8_attention:  # the FP8 pass fuses R3 with the quantization of K as attention reads it
            hk = k_in = insert_hadamard(ctx, block.k, d, anchor)
        else:  # R3 before the GQA repeat: heads/kv_heads times less work on the (whole, cached) K
            hk, k_in = _rotated_before_repeat(ctx, block.k, d, anchor)
    _replace_q_k(block, hq, k_in, k_consumer)
    ctx.r3[block.name] = (hq, hk)  # for the FP8 pass (never on with rotated_kv_cache, whose hq/hk may be views)
    bump("attention_rewritten")


def rotate_online(ctx: PassContext) -> None:
    r4 = ctx.options.rotate == "online"
    r3 = r4 or ctx.options.fp8_attention
    if r4:
        for mlp in ctx.mlps:
            _rotate_down_proj(ctx, mlp)
    if r3:
        for block in ctx.attention:
            _r3(ctx, block)

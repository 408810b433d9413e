"""Drop what the rewrites left dead, check the graph, regenerate the code."""

from __future__ import annotations

import operator

from torch import fx

from hadacore.fxpasses.context import PassContext


def _mutates(node: fx.Node) -> bool:
    """Dynamo-level graphs keep in-place ops as method/function calls (``index_copy_``,
    ``add_``, ``setitem``): a static KV cache's writes have no users, yet must stay."""
    if node.is_impure():
        return True
    if node.op == "call_function" and node.target in (operator.setitem, operator.delitem):
        return True
    if node.op in ("call_method", "call_function"):
        name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
        return name.endswith("_") and not name.endswith("__")
    return False


def eliminate_dead_code(graph: fx.Graph) -> None:
    """Drop nodes the rewrites left unused, but never an in-place op (see :func:`_mutates`)."""
    graph.eliminate_dead_code(is_impure_node=_mutates)


def cleanup(ctx: PassContext) -> None:
    eliminate_dead_code(ctx.graph)
    drop_unused_constants(ctx)
    ctx.graph.lint()
    ctx.gm.recompile()


def drop_unused_constants(ctx: PassContext) -> None:
    # Constants attached by earlier passes but no longer read (e.g. superseded by a fused
    # weight): drop them so the compiled module does not keep them alive.
    used = {n.target for n in ctx.graph.nodes if n.op == "get_attr"}
    for name in [b for b, _ in ctx.gm.named_buffers(recurse=False) if b.startswith("_hadacore_") and b not in used]:
        delattr(ctx.gm, name)
        getattr(ctx.gm, "_param_name_to_source", {}).pop(name, None)

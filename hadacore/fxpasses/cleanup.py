"""Drop what the rewrites left dead, check the graph, regenerate the code."""

from __future__ import annotations

from hadacore.fxpasses.context import PassContext


def cleanup(ctx: PassContext) -> None:
    ctx.graph.eliminate_dead_code()
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

"""The ``torch.compile`` backend: ``torch.compile(model, backend="hadacore", options={...})``.

Pipeline (docs/design.md, "The compiler"): the Dynamo FX graph goes through the passes in
``hadacore.fxpasses`` (find linears and attention, build the block graph, rotate,
quantize, fold act-order permutations, fuse, rewrite into ``hadacore::*`` ops, and last
lower each fused node to its per-device implementation), then Inductor's ``compile_fx``
compiles the whole graph. The rewrite happens before AOTAutograd, so the rewritten graph
is what Inductor's FX graph cache and AOTAutograd's cache key on.

Compile-time quantization (``quantize="w4a16"``) snapshots the weights when the graph is
compiled: later in-place weight updates are not seen until the model is recompiled
(``torch._dynamo.reset()`` or a fresh ``torch.compile``).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, Optional

import torch
from torch import fx

from hadacore.options import CompileOptions

__all__ = ["hadacore_backend"]

log = logging.getLogger("hadacore.compiler")


def _register_torch_logs() -> None:
    """Make ``TORCH_LOGS="+hadacore"`` show the compiler's debug log (graphs before/after
    the passes, every find and rewrite); ``TORCH_LOGS="hadacore"`` shows the INFO lines
    (what was left alone and why). Uses torch's private logging registry: best effort."""
    try:
        from torch._logging import _internal

        _internal.register_log("hadacore", "hadacore.compiler")
        if "hadacore" in os.environ.get("TORCH_LOGS", ""):
            _internal._init_logs()  # TORCH_LOGS was parsed at torch import, before this name existed
    except Exception as e:  # pragma: no cover - a torch without the registry
        log.debug("hadacore: TORCH_LOGS integration unavailable: %s", e)


_register_torch_logs()

_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def _refuse_last_recompile(opts: CompileOptions) -> None:
    """Never let Dynamo fall back to the eager function where that is another model.

    Past ``torch._dynamo.config.recompile_limit`` graphs of one function, Dynamo runs the
    function eagerly, with only a generic warning. When the compiled graph computes
    another function (compile-time quantization, a rotated KV cache, FP8 attention) that
    silently swaps the model. Dynamo never calls the backend for that fallback, so the
    compile that would fill the last slot raises instead, saying what to change.
    """
    if not opts.changes_model:
        return
    from torch._guards import CompileContext

    compile_id = CompileContext.current_compile_id()
    limit = torch._dynamo.config.recompile_limit
    if compile_id is None or compile_id.frame_compile_id is None or compile_id.frame_compile_id + 1 < limit:
        return
    raise RuntimeError(
        f"hadacore: this function now needs graph {compile_id.frame_compile_id + 1} and Dynamo's recompile_limit is "
        f"{limit}. Past the limit Dynamo would run the eager model, which is not the model these options compile "
        f"(quantize={opts.quantize!r}, rotated_kv_cache={opts.rotated_kv_cache}, fp8_attention={opts.fp8_attention}), "
        "without a word. Compile with dynamic=True (one graph for all sizes), or raise "
        "torch._dynamo.config.recompile_limit")


def hadacore_backend(
    gm: fx.GraphModule,
    example_inputs: list,
    *,
    mode: Optional[str] = None,
    options: Optional[dict[str, Any]] = None,
    **kwargs: Any,
) -> Callable:
    """Dynamo backend. ``torch.compile`` passes ``mode=`` and ``options=``; options may also
    be given as keyword arguments (e.g. through ``functools.partial``)."""
    from hadacore.fxpasses import PassContext, run_passes
    from hadacore.fxpasses.stats import bump

    if mode not in _MODES:
        raise ValueError(f"hadacore: unknown mode {mode!r}; accepted: {_MODES[1:]}")
    opts = CompileOptions.from_mapping({**(options or {}), **kwargs})
    _refuse_last_recompile(opts)
    bump("graphs_compiled")
    ctx = PassContext(gm, example_inputs, opts)
    run_passes(ctx)
    if not opts.inductor:
        return gm.forward
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx

    patches = list_mode_options(mode) if mode not in (None, "default") else {}
    return compile_fx(gm, example_inputs, config_patches=patches or None)

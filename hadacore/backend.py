"""The ``torch.compile`` backend: ``torch.compile(model, backend="hadacore", options={...})``.

Pipeline (DESIGN.md, "The compiler"): the Dynamo FX graph goes through the passes in
``hadacore.fxpasses`` (find linears and attention, build the block graph, rotate,
quantize, permute, fuse, rewrite into ``hadacore::*`` ops), then ``hadacore.lowering.fx``
picks the per-device implementation of each fused node, then Inductor's ``compile_fx``
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

__all__ = ["hadacore_backend", "DEFAULT_OPTIONS", "validate_options"]

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

#: Every option and its default.
DEFAULT_OPTIONS: dict[str, Any] = {
    "quantize": None,  # None | "w4a16": RTN-quantize float linears at compile time
    "group_size": 128,  # quantization group size (positive, or -1 for per-channel)
    "bits": 4,
    "sym": True,
    "rotate": "none",  # "none" | "online": R4 before down_proj, R3 on Q/K after RoPE
    # True: R3 rotates K where it is written into the KV cache, so the cache holds rotated keys
    # and a step's R3 work no longer grows with the cache. Exact only when every writer of the
    # cache is compiled with these options (StaticDecoder compiles its prefill then).
    "rotated_kv_cache": False,
    "fp8_attention": False,  # R3 + per-head FP8 e4m3 Q/K/V (emulated by quantize-dequantize on CPU)
    "split_k": "auto",  # "auto" | positive int: SplitK factor of the W4A16 GEMM (CUDA)
    "deterministic": False,  # fixed-order SplitK reduction
    "inductor": True,  # False: run the rewritten graph eagerly (debugging)
}

_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def _bad(key: str, value: Any, accepted: str) -> ValueError:
    return ValueError(f"hadacore option {key!r}: got {value!r}, accepted: {accepted}")


def validate_options(options: Optional[dict[str, Any]]) -> dict[str, Any]:
    """Defaults merged with ``options``; ``ValueError`` for unknown keys or bad values."""
    options = dict(options or {})
    unknown = sorted(set(options) - set(DEFAULT_OPTIONS))
    if unknown:
        raise ValueError(f"unknown hadacore option(s) {unknown}; valid options: {sorted(DEFAULT_OPTIONS)}")
    opts = {**DEFAULT_OPTIONS, **options}
    if opts["quantize"] not in (None, "w4a16"):
        raise _bad("quantize", opts["quantize"], "None or 'w4a16'")
    gs = opts["group_size"]
    if isinstance(gs, bool) or not isinstance(gs, int) or not (gs > 0 or gs == -1):
        raise _bad("group_size", gs, "a positive int or -1 (per-channel)")
    if opts["bits"] != 4 or isinstance(opts["bits"], bool):
        raise _bad("bits", opts["bits"], "4 (the W4A16 GEMM is 4-bit)")
    if opts["rotate"] not in ("none", "online"):
        raise _bad("rotate", opts["rotate"], "'none' or 'online'")
    sk = opts["split_k"]
    if sk != "auto" and (isinstance(sk, bool) or not isinstance(sk, int) or sk < 1):
        raise _bad("split_k", sk, "'auto' or a positive int")
    for key in ("sym", "rotated_kv_cache", "fp8_attention", "deterministic", "inductor"):
        if not isinstance(opts[key], bool):
            raise _bad(key, opts[key], "True or False")
    if opts["rotated_kv_cache"] and opts["rotate"] != "online":
        raise ValueError("hadacore option 'rotated_kv_cache': needs rotate='online' (it moves R3's rotation of K)")
    if opts["rotated_kv_cache"] and opts["fp8_attention"]:
        raise ValueError("hadacore options 'rotated_kv_cache' and 'fp8_attention' cannot be combined yet: FP8 "
                         "attention rotates and quantizes K in one step as attention reads it")
    return opts


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
    from hadacore.lowering.fx import lower

    if mode not in _MODES:
        raise ValueError(f"hadacore: unknown mode {mode!r}; accepted: {_MODES[1:]}")
    opts = validate_options({**(options or {}), **kwargs})
    bump("graphs_compiled")
    ctx = PassContext(gm, example_inputs, opts)
    run_passes(ctx)
    lower(ctx)
    if log.isEnabledFor(logging.DEBUG):
        log.debug("hadacore: graph after lowering:\n%s", gm.print_readable(print_output=False))
    if not opts["inductor"]:
        return gm.forward
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx

    patches = list_mode_options(mode) if mode not in (None, "default") else {}
    return compile_fx(gm, example_inputs, config_patches=patches or None)

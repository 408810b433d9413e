"""Greedy decoding over a static KV cache, with a compiled decode step and honest timings.

Used by the demo and ``benchmarks/e2e.py``. The decode step (one token, fixed shapes) is
compiled, so the first decode call's extra time is its compile time. Prefill runs eagerly,
except where hadacore's options make the compiled model another function than the eager
one (compile-time quantization, a rotated KV cache, FP8 attention:
``CompileOptions.changes_model``): the KV cache must then be written by the compiled model
only, so prefill is compiled too, and both with ``fullgraph=True`` so nothing can fall
back to eager. Needs the ``hf`` extra.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from hadacore.options import CompileOptions

__all__ = ["StaticDecoder", "DecodeResult"]


@dataclass
class DecodeResult:
    tokens: torch.Tensor  # [batch, new_tokens]
    prefill_s: float
    step_s: list[float] = field(default_factory=list)  # per decode step, after the first

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens per second per sequence, from the median decode step."""
        return 1.0 / statistics.median(self.step_s) if self.step_s else float("nan")


class StaticDecoder:
    """Greedy decoding for a transformers causal LM with a ``StaticCache``.

    ``backend=None`` runs the decode step eagerly; otherwise it is ``torch.compile``d
    with that backend and ``options``. ``compile_s`` is the first step's time minus the
    median step time (set after the first :meth:`generate`); a compiled prefill's compile
    time is in ``DecodeResult.prefill_s``.
    """

    def __init__(self, model: nn.Module, *, max_len: int, batch: int = 1, backend: str | None = None,
                 options: dict | None = None):
        from transformers import StaticCache

        self.model = model
        self.batch = batch
        self.cache = StaticCache(config=model.config, max_cache_len=max_len)
        self.compile_s: float | None = None

        def step(ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
            out = model(input_ids=ids, position_ids=pos, past_key_values=self.cache, use_cache=True)
            return out.logits[:, -1]

        def prefill(ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:  # its own code object, own graphs
            return step(ids, pos)

        compiled_only = backend == "hadacore" and CompileOptions.from_mapping(options).changes_model
        # dynamic=False: batch and cache length are fixed per decoder, so each decoder gets a graph
        # specialised to its shapes. Otherwise Dynamo's automatic-dynamic would mark the batch
        # dynamic as soon as a second decoder (another batch size) compiled the same step code.
        # torch.compile pops some keys (guard_filter_fn) from options: each call gets a copy.
        self._step = (torch.compile(step, backend=backend, options=dict(options or {}), fullgraph=compiled_only,
                                    dynamic=False) if backend else step)
        # A prompt length is a new prefill shape: automatic-dynamic makes it symbolic at the second.
        self._prefill = (torch.compile(prefill, backend=backend, options=dict(options or {}), fullgraph=True)
                         if compiled_only else step)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int) -> DecodeResult:
        if input_ids.dim() != 2 or input_ids.shape[0] != self.batch:
            raise ValueError(f"input_ids must be [{self.batch}, prompt_len], got {tuple(input_ids.shape)}")
        self.cache.reset()
        prompt_len = input_ids.shape[1]
        t0 = time.perf_counter()
        pos = torch.arange(prompt_len).expand(self.batch, -1)
        logits = self._prefill(input_ids, pos)
        prefill_s = time.perf_counter() - t0
        tokens = [logits.argmax(-1)]
        times = []
        for i in range(max_new_tokens - 1):
            pos = torch.full((self.batch, 1), prompt_len + i, dtype=torch.long)
            t0 = time.perf_counter()
            logits = self._step(tokens[-1][:, None], pos)
            tokens.append(logits.argmax(-1))
            times.append(time.perf_counter() - t0)
        result = DecodeResult(torch.stack(tokens, 1), prefill_s, times[1:])
        if self.compile_s is None and times:
            self.compile_s = max(times[0] - statistics.median(times[1:] or times), 0.0)
        return result

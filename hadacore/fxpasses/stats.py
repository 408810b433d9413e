"""Compiler counters: what the passes found, rewrote, and why they left things alone.

One process-wide counter set, read with ``hadacore.stats()`` and cleared with
``hadacore.reset_stats()``. Reasons for leaving a pattern alone are counted under
``stats()["skipped"][reason]``.
"""

from __future__ import annotations

import collections
import logging
from typing import Any

__all__ = ["stats", "reset_stats", "bump", "skip", "KNOWN_COUNTERS"]

log = logging.getLogger("hadacore.compiler")

#: Counters always present in ``stats()`` (zero when nothing happened).
KNOWN_COUNTERS = (
    "graphs_compiled",
    "linear_found",
    "linear_rewritten",
    "linear_quantized",
    "linear_fused",
    "attention_found",
    "attention_rewritten",
    "hadamard_inserted",
    "gather_removed",
    "gather_kept",
    "fp8_attention_fused",
    "fp8_qdq_inserted",
)

_counters: collections.Counter[str] = collections.Counter()
_skipped: collections.Counter[str] = collections.Counter()
_pass_runs: collections.Counter[str] = collections.Counter()


def bump(name: str, n: int = 1) -> None:
    """Add ``n`` to counter ``name``."""
    _counters[name] += n


def count_pass(name: str) -> None:
    _pass_runs[name] += 1


def record_skip(reason: str) -> None:
    """Count ``reason`` in ``stats()["skipped"]`` without a log line (the caller logs)."""
    _skipped[reason] += 1


def skip(reason: str, what: str) -> None:
    """Record that ``what`` (a layer or node name) was left alone, and log why (one line)."""
    record_skip(reason)
    log.info("hadacore: left %s alone: %s", what, reason)


def stats() -> dict[str, Any]:
    """Counters since the last :func:`reset_stats`: ``{counter: int, ..., "skipped": {reason: int},
    "passes": {pass name: runs}}``."""
    out: dict[str, Any] = {name: 0 for name in KNOWN_COUNTERS}
    out.update(_counters)
    out["skipped"] = dict(_skipped)
    out["passes"] = dict(_pass_runs)
    return out


def reset_stats() -> None:
    """Zero every counter."""
    _counters.clear()
    _skipped.clear()
    _pass_runs.clear()

"""What more than one benchmark script measures the same way."""

from __future__ import annotations

import time

import torch


def read_bandwidth(buf: torch.Tensor | None = None, reps: int = 7) -> float:
    """Bytes/s of ``buf.sum()`` (default buffer: 1 GiB of fp32), best of ``reps``.

    The buffer must be larger than the last-level cache (480 MiB of L3 on this project's
    hosts), so the sum reads DRAM. Best, not median: the memory floor is what the memory can
    do; on a loaded machine the median under-reads it, and a model then seems to beat its
    floor."""
    buf = torch.ones((1 << 30) // 4) if buf is None else buf
    buf.sum()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        buf.sum()
        best = min(best, time.perf_counter() - t0)
    return buf.numel() * buf.element_size() / best

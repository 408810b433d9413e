"""A tensor-parallel group's ranks agree on success or fail together."""

from __future__ import annotations

from typing import Any

import torch.distributed as dist

__all__ = ["ShardLoadError", "agree_on_success", "check_group"]


class ShardLoadError(RuntimeError):
    """Raised on every rank when any rank of the group failed to build its shard."""


def agree_on_success(error: BaseException | None, *, tp_rank: int, tp_size: int, group: dist.ProcessGroup | None = None) -> None:
    """All ranks learn whether every rank succeeded; raise :class:`ShardLoadError` on all if not.

    Without this, a rank that failed would leave the others blocked in their first
    collective. A rank that dies outright is caught by the process group's timeout
    (``init_process_group(timeout=...)``), which turns the wait into an error.
    """
    if tp_size == 1:
        if error is not None:
            raise error
        return
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"tp_size={tp_size} needs an initialised default process group (torchrun + init_process_group)")
    mine = None if error is None else f"{type(error).__name__}: {error}"
    reports: list[Any] = [None] * dist.get_world_size(group)
    try:
        dist.all_gather_object(reports, mine, group=group)
    except Exception as exc:  # a peer died (gloo: connection closed) or the group's timeout expired
        raise ShardLoadError(
            f"rank {tp_rank} could not confirm that every rank of the tp_size={tp_size} group loaded its shard "
            f"(a rank crashed or the process group timed out); this rank {'failed too: ' + mine if mine else 'succeeded'}; "
            f"collective error: {exc}"
        ) from (error or exc)
    failed = {r: msg for r, msg in enumerate(reports) if msg is not None}
    if failed:
        detail = "; ".join(f"rank {r}: {msg}" for r, msg in failed.items())
        raise ShardLoadError(f"loading the tp_size={tp_size} model failed on rank(s) {sorted(failed)} ({detail})") from error


def check_group(tp_rank: int, tp_size: int, group: dist.ProcessGroup | None) -> None:
    if tp_size < 1 or not 0 <= tp_rank < tp_size:
        raise ValueError(f"need 0 <= tp_rank < tp_size, got tp_rank={tp_rank}, tp_size={tp_size}")
    if tp_size == 1:
        return
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    if (size, rank) != (tp_size, tp_rank):
        raise ValueError(f"tp_rank/tp_size ({tp_rank}/{tp_size}) disagree with the process group (rank {rank} of {size})")

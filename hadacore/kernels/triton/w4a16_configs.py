"""Launch configurations for the Triton W4A16 GEMM (`hadacore.kernels.triton.w4a16`).

One table, keyed by M bucket, picks the kernel and its tile shape; a few rules then
fit the tile to the problem (N, K, group size, dtype). Everything is overridable:
``split_k=`` forces the split (and with it the kernel), ``config=`` overrides any field.

**Untuned on hardware.** No GPU was available when this table was written. The entries
start from the published choices of the reference kernels (FIELD_NOTES.md):

- the SplitK paper (applied-ai ``splitk_dequant_gemm.py``): 16x32x128 tiles, split_k 4,
  3 stages, 4 warps for skinny M on A100/H100;
- gemlite: GEMV at M = 1, split-K for 1 < M <= 64, data-parallel above; BLOCK_K <=
  group size and group-aligned split ranges;

and were then adjusted only by what the compiler reports without running anything:
each row compiles for sm_90 (Triton 3.9, ptxas ``-v``) with no register spills
(16x32x128: 110 registers; 64x128x64 needed 8 warps: with 4 it spilled 16 bytes).

======  =======  =======  =======  =======  =======  =====  ======
M       kernel   BLOCK_M  BLOCK_N  BLOCK_K  SPLIT_K  warps  stages
======  =======  =======  =======  =======  =======  =====  ======
1       gemv     1        64       128      8        8      2
2-16    splitk   16       32       128      4        4      3
17-32   splitk   32       64       128      4        4      3
33-64   splitk   64       64       128      2        4      3
65-128  dp       64       128      64       1        8      4
> 128   dp       128      128      64       1        8      3
======  =======  =======  =======  =======  =======  =====  ======

Fitting rules (applied in :func:`select_w4a16_config`, also to overrides):

- BLOCK_N <= next_pow2(N), BLOCK_M <= next_pow2(M), BLOCK_K <= next_pow2(K); dot
  operands never below 16 on any side (``tl.dot``'s minimum), GEMV has BLOCK_M = 1.
- Contiguous groups (no act-order): BLOCK_K is cut to the largest power of two that
  divides the group size, so a K-block never straddles two groups and each group's
  scales/zeros are loaded once. If that power of two is below 16 (an odd group size
  such as 40), the kernel falls back to per-k group lookup (still exact).
- SplitK ranges are contiguous and aligned to the group size (or to BLOCK_K for
  per-channel / per-k layouts); SPLIT_K is capped by the number of aligned units in K
  and then recomputed so that no split is empty.
- fp32 activations (dot kernels): the ieee fp32 ``tl.dot`` runs on FMA units and
  spills heavily at fp16 tile sizes (up to 17 KB at 64x64x128), so tiles shrink to
  BLOCK_M, BLOCK_N <= 64, BLOCK_K <= 32, 8 warps, <= 2 stages. fp32 is the exactness
  path, not a speed target.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

import torch

__all__ = [
    "W4A16Config",
    "KERNELS",
    "CONFIG_KEYS",
    "M_BUCKETS",
    "m_bucket",
    "select_w4a16_config",
    "split_k_ranges",
]

KERNELS = ("gemv", "splitk", "dp")
MIN_DOT = 16  # tl.dot needs every operand side >= 16


@dataclass(frozen=True)
class W4A16Config:
    """One launch configuration of the W4A16 GEMM.

    ``kernel``: ``"gemv"`` (M-rows x N-tiles x SPLIT_K programs, broadcast-multiply +
    reduce, no tensor cores), ``"splitk"`` (M-tiles x N-tiles x SPLIT_K, ``tl.dot``,
    partials reduced by atomics or a fixed-order second pass) or ``"dp"``
    (data-parallel: M-tiles x N-tiles, full K loop, single store). ``group_m``: tile
    swizzle width of the data-parallel kernel (L2 reuse at large M).
    """

    kernel: str
    block_m: int
    block_n: int
    block_k: int
    split_k: int
    num_warps: int
    num_stages: int
    group_m: int = 8


CONFIG_KEYS = tuple(f.name for f in dataclasses.fields(W4A16Config))

# (largest M in the bucket, config); None = unbounded. See the module docstring.
M_BUCKETS: tuple[tuple[int | None, W4A16Config], ...] = (
    (1, W4A16Config("gemv", 1, 64, 128, 8, 8, 2)),
    (16, W4A16Config("splitk", 16, 32, 128, 4, 4, 3)),
    (32, W4A16Config("splitk", 32, 64, 128, 4, 4, 3)),
    (64, W4A16Config("splitk", 64, 64, 128, 2, 4, 3)),
    (128, W4A16Config("dp", 64, 128, 64, 1, 8, 4)),
    (None, W4A16Config("dp", 128, 128, 64, 1, 8, 3)),
)


def m_bucket(m: int) -> int:
    """Index into :data:`M_BUCKETS` of the bucket holding ``m`` rows."""
    for i, (upper, _) in enumerate(M_BUCKETS):
        if upper is None or m <= upper:
            return i
    raise AssertionError("unreachable: the last bucket is unbounded")


def _next_pow2(v: int) -> int:
    return 1 << max(0, (int(v) - 1).bit_length())


def _pow2_divisor(v: int) -> int:
    """Largest power of two dividing ``v`` (v > 0)."""
    return v & -v


def _is_pow2(v: int) -> bool:
    return v > 0 and v & (v - 1) == 0


def _device_key(device: torch.device) -> str:
    """Device part of the cache key; per-architecture tables would hang off this."""
    if device.type == "cuda" and torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(device)
        return f"cuda:sm{major}{minor}"
    return device.type  # "cpu": the Triton interpreter


def _validate_override(config: dict) -> None:
    unknown = sorted(set(config) - set(CONFIG_KEYS))
    if unknown:
        raise ValueError(f"unknown W4A16 config keys {unknown}; accepted: {list(CONFIG_KEYS)}")
    if "kernel" in config and config["kernel"] not in KERNELS:
        raise ValueError(f"config['kernel'] must be one of {KERNELS}, got {config['kernel']!r}")
    for key in ("block_m", "block_n", "block_k", "num_warps", "group_m"):
        v = config.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not _is_pow2(v)):
            raise ValueError(f"config[{key!r}] must be a power of two, got {v!r}")
    for key in ("split_k", "num_stages"):
        v = config.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"config[{key!r}] must be a positive int, got {v!r}")
    for key in ("block_n", "block_k"):
        if config.get(key) is not None and config[key] < MIN_DOT:
            raise ValueError(f"config[{key!r}] must be >= {MIN_DOT} (tl.dot minimum), got {config[key]}")


def select_w4a16_config(
    m: int,
    n: int,
    k: int,
    group_size: int,
    dtype: torch.dtype,
    device: torch.device,
    *,
    act_order: bool = False,
    split_k: int | str = "auto",
    config: dict | None = None,
) -> W4A16Config:
    """The launch configuration for ``[m, k] @ W4[k, n]`` (see the module docstring).

    ``act_order``: groups are looked up per k (unsorted ``g_idx``), so BLOCK_K is not
    tied to the group size. ``split_k``: ``"auto"`` or a positive int; an int selects
    the kernel too (1 -> data-parallel, >1 -> SplitK; GEMV stays GEMV at M = 1).
    ``config``: dict of :class:`W4A16Config` fields that override everything else.
    The returned ``split_k`` is the requested one capped by K; the launcher aligns it
    with :func:`split_k_ranges`.
    """
    if split_k != "auto" and (isinstance(split_k, bool) or not isinstance(split_k, int) or split_k < 1):
        raise ValueError(f"split_k must be 'auto' or a positive int, got {split_k!r}")
    override = dict(config or {})
    _validate_override(override)
    key_override = tuple(sorted(override.items()))
    return _select_cached(
        m_bucket(m), min(_next_pow2(m), 1 << 30), n, k, group_size, dtype, _device_key(device),
        act_order, split_k, key_override,
    )


@functools.lru_cache(maxsize=1024)
def _select_cached(bucket, m_pow2, n, k, group_size, dtype, device_key, act_order, split_k, override_items):
    cfg = M_BUCKETS[bucket][1]
    override = dict(override_items)
    if override.get("kernel", cfg.kernel) != cfg.kernel:
        cfg = _family_default(override["kernel"])
    if split_k != "auto":
        # An explicit split picks the kernel too, unless config names one (GEMV stays GEMV).
        kernel = cfg.kernel if "kernel" in override or cfg.kernel == "gemv" else ("splitk" if split_k > 1 else "dp")
        cfg = dataclasses.replace(cfg, kernel=kernel, split_k=split_k)
    cfg = dataclasses.replace(cfg, **override)
    if cfg.kernel == "dp":
        if cfg.split_k != 1 and ("split_k" in override or split_k != "auto"):
            raise ValueError(f"the data-parallel kernel does not split K (split_k={cfg.split_k}); use kernel='splitk'")
        cfg = dataclasses.replace(cfg, split_k=1)

    # Fit the tile to the problem.
    if cfg.kernel == "gemv":
        block_m = 1
    else:
        if cfg.block_m < MIN_DOT:
            raise ValueError(f"block_m must be >= {MIN_DOT} for the {cfg.kernel!r} kernel (tl.dot), got {cfg.block_m}")
        block_m = cfg.block_m if "block_m" in override else min(cfg.block_m, max(MIN_DOT, m_pow2))
    block_n = min(cfg.block_n, max(MIN_DOT, _next_pow2(n)))
    block_k = min(cfg.block_k, max(MIN_DOT, _next_pow2(k)))
    if group_size > 0 and not act_order and "block_k" not in override:
        aligned = _pow2_divisor(group_size)
        if aligned >= MIN_DOT:
            block_k = min(block_k, aligned)
    num_warps, num_stages = cfg.num_warps, cfg.num_stages
    if dtype == torch.float32 and cfg.kernel != "gemv":
        # Only where the user did not choose: the fp32 FMA dot's register budget.
        block_m = block_m if "block_m" in override else min(block_m, 64)
        block_n = block_n if "block_n" in override else min(block_n, 64)
        block_k = block_k if "block_k" in override else min(block_k, 32)
        num_warps = num_warps if "num_warps" in override else 8
        num_stages = num_stages if "num_stages" in override else min(num_stages, 2)
    return dataclasses.replace(
        cfg, block_m=block_m, block_n=block_n, block_k=block_k, num_warps=num_warps, num_stages=num_stages,
        split_k=max(1, min(cfg.split_k, math.ceil(k / block_k))) if k else 1,
    )


def _family_default(kernel: str) -> W4A16Config:
    """Defaults when ``config['kernel']`` switches family: the first table row of that kernel."""
    return next(row for _, row in M_BUCKETS if row.kernel == kernel)


def split_k_ranges(k: int, split_k: int, align: int) -> tuple[int, int]:
    """``(split_k, k_per_split)``: contiguous K ranges that are multiples of ``align``.

    Split ``pid`` owns ``[pid * k_per_split, min((pid + 1) * k_per_split, k))``. The
    returned ``split_k`` is the number of non-empty ranges (<= the requested one).
    """
    if k <= 0:
        return 1, max(align, 1)
    units = math.ceil(k / align)
    split_k = max(1, min(split_k, units))
    k_per_split = math.ceil(units / split_k) * align
    return math.ceil(k / k_per_split), k_per_split

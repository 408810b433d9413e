"""Hadamard transform benchmark: prints tables of times and ratios (not a test).

CPU: ``hadacore.hadamard_transform`` (the native blocked Kronecker path) against
  * the memory floor: ``copy_`` of the same tensor into a preallocated buffer (one read,
    one write: what any out-of-place transform must at least move);
  * dense ``x @ H_n`` in x's dtype (what a user would otherwise write);
  * the pure-PyTorch ``hadamard-transform`` package (powers of two only).
GPU (only when CUDA is available): ``hadacore.kernels.triton.hadamard.hadamard_triton`` against
``clone`` and dense matmul.

Ratios are "this time / hadacore time" for the alternatives (above 1 = hadacore faster)
and "hadacore time / floor time" for the floor. Times are medians of repeats in one
process. Usage::

    python benchmarks/hadamard.py            # full table (~5 min on 2 cores)
    python benchmarks/hadamard.py --quick    # fewer sizes and repeats
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import time
from datetime import datetime, timezone
from typing import Callable, Optional

import torch

import hadacore
from hadacore.kernels.cpu.hadamard import factor_plan

try:  # pure-PyTorch package, pip name "hadamard-transform"; normalised output
    from hadamard_transform import hadamard_transform as pkg_hadamard_transform
except ImportError:  # pragma: no cover - optional comparison
    pkg_hadamard_transform = None

SIZES = (64, 128, 576, 1536, 4096, 11008, 14336, 16384)
TOTALS = (4096, 1 << 20, 1 << 24)
DTYPES = (torch.float32, torch.bfloat16)
#: Dense x @ H_n is skipped where H_n alone would exceed this many bytes ...
DENSE_MAX_BYTES = 1 << 30
#: ... or where its flop count would take seconds per repeat on 2 cores (it is then
#: tens to hundreds of times slower than the transform anyway).
DENSE_MAX_FLOP = 1e10


def _median_ms(fn: Callable[[], object], repeats: int, sync: Callable[[], None] = lambda: None) -> float:
    fn()  # warm-up: caches, allocator, BLAS threads
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def _repeats(total: int, quick: bool) -> int:
    if total >= 1 << 24:
        return 3 if quick else 5
    if total >= 1 << 20:
        return 5 if quick else 15
    return 20 if quick else 100


def _plan_str(n: int) -> str:
    m, fs = factor_plan(n)
    parts = ([f"H{m}"] if m > 1 else []) + [str(f) for f in fs]
    return "x".join(parts)


def _fmt_ratio(r: Optional[float]) -> str:
    return "-" if r is None else f"{r:.2f}"


def cpu_table(quick: bool) -> None:
    sizes = (64, 576, 4096, 14336) if quick else SIZES
    totals = (4096, 1 << 20) if quick else TOTALS
    print(f"\n## CPU: {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
          f"load average {os.getloadavg()[0]:.1f} at start")
    print("ms = hadacore median; floor = hadacore / copy_; dense, pkg = their time / hadacore "
          "(>1: hadacore faster)")
    hdr = f"{'n':>6} {'plan':>12} {'elems':>6} {'dtype':>5} | {'ms':>8} {'copy ms':>8} {'floor x':>7} | {'dense ms':>9} {'vs dense':>8} | {'pkg ms':>8} {'vs pkg':>7}"
    print(hdr)
    print("-" * len(hdr))
    notes = set()
    misses = []
    for n in sizes:
        for total in totals:
            rows = max(1, total // n)
            reps = _repeats(rows * n, quick)
            for dtype in DTYPES:
                x = torch.randn(rows, n).to(dtype)
                buf = torch.empty_like(x)
                t_ours = _median_ms(lambda: hadacore.hadamard_transform(x), reps)
                t_copy = _median_ms(lambda: buf.copy_(x), reps)

                t_dense: Optional[float] = None
                dense_why = ""
                if n * n * x.element_size() > DENSE_MAX_BYTES:
                    dense_why = "H>1GiB"
                elif 2.0 * rows * n * n > DENSE_MAX_FLOP:
                    dense_why = "skip"
                    notes.add(f"dense 'skip': more than {DENSE_MAX_FLOP:.0e} flop per call (seconds per repeat)")
                else:
                    h = hadacore.hadamard_matrix(n, dtype)
                    t_dense = _median_ms(lambda: x @ h, max(1, reps // 2) if 2.0 * rows * n * n < 1e9 else 2)
                    del h

                t_pkg: Optional[float] = None
                if pkg_hadamard_transform is not None and n & (n - 1) == 0:
                    t_pkg = _median_ms(lambda: pkg_hadamard_transform(x), max(1, reps // 2))

                label = {4096: "4K", 1 << 20: "1M", 1 << 24: "16M"}[total]
                dense_ms = f"{t_dense:9.2f}" if t_dense is not None else f"{dense_why:>9}"
                pkg_ms = f"{t_pkg:8.2f}" if t_pkg is not None else f"{'n/a':>8}"
                print(
                    f"{n:>6} {_plan_str(n):>12} {label:>6} {str(dtype)[6:]:>5} | {t_ours:8.3f} {t_copy:8.3f} "
                    f"{t_ours / t_copy:7.1f} | {dense_ms} {_fmt_ratio(t_dense and t_dense / t_ours):>8} | "
                    f"{pkg_ms} {_fmt_ratio(t_pkg and t_pkg / t_ours):>7}",
                    flush=True,
                )
                if n >= 512 and t_dense is not None and t_dense < t_ours:
                    misses.append(f"n={n} {label} {dtype}: slower than dense ({t_ours:.2f} vs {t_dense:.2f} ms)")
                if total >= 1 << 20 and t_pkg is not None and t_pkg < 2 * t_ours:
                    misses.append(f"n={n} {label} {dtype}: under 2x vs hadamard-transform ({t_pkg / t_ours:.2f}x)")
    for note in sorted(notes):
        print(f"note: {note}")
    print("pkg n/a: the hadamard-transform package supports powers of two only")
    print("targets (dense for n >= 512, 2x pkg at >= 1M elements): " + ("all met" if not misses else "MISSED"))
    for miss in misses:
        print(f"  missed: {miss}")


def gpu_table(quick: bool) -> None:
    if not torch.cuda.is_available():
        print("\n## GPU: skipped (no CUDA device)")
        return
    from hadacore.kernels.triton.hadamard import hadamard_triton

    dev = torch.device("cuda")
    sync = torch.cuda.synchronize
    print(f"\n## GPU: {torch.cuda.get_device_name(dev)}")
    print("ratios: their time / triton time (>1: triton faster); clone is the memory floor")
    sizes = (128, 1024, 4096, 14336) if quick else (64, 128, 256, 512, 576, 1024, 1536, 2048, 4096, 5120,
                                                   8192, 11008, 14336, 16384, 28672, 32768)
    rows_list = (1, 4096) if quick else (1, 16, 4096, 65536)
    print("err: relative Frobenius error of the Triton output vs an fp32 dense matmul on the GPU")
    hdr = f"{'n':>6} {'rows':>6} {'dtype':>8} | {'triton ms':>9} {'clone ms':>8} {'clone/tr':>8} | {'dense ms':>8} {'dense/tr':>8} | {'err':>7}"
    print(hdr)
    print("-" * len(hdr))
    for n in sizes:
        for rows in rows_list:
            if rows * n > 1 << 28:
                continue
            for dtype in (torch.float16, torch.bfloat16):
                x = torch.randn(rows, n, device=dev).to(dtype)
                reps = 20 if quick else 100
                t_tr = _median_ms(lambda: hadamard_triton(x, 1.0), reps, sync)
                t_clone = _median_ms(lambda: x.clone(), reps, sync)
                t_dense = None
                err = "-"
                if n * n * x.element_size() <= DENSE_MAX_BYTES:
                    h = hadacore.hadamard_matrix(n, dtype).to(dev)
                    t_dense = _median_ms(lambda: x @ h, reps, sync)
                    ref = x[:256].float() @ h.float()
                    err = f"{((hadamard_triton(x[:256], 1.0).float() - ref).norm() / ref.norm()).item():7.1e}"
                    del h, ref
                dense_ms = f"{t_dense:8.3f}" if t_dense is not None else f"{'H>1GiB':>8}"
                print(f"{n:>6} {rows:>6} {str(dtype)[6:]:>8} | {t_tr:9.4f} {t_clone:8.4f} {t_clone / t_tr:8.2f} | "
                      f"{dense_ms} {_fmt_ratio(t_dense and t_dense / t_tr):>8} | {err:>7}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer sizes and repeats")
    ap.add_argument("--no-gpu", action="store_true", help="skip the GPU section")
    ap.add_argument("--no-cpu", action="store_true", help="skip the CPU section")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads (default: torch's; 1 is steadier on a busy machine)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"# hadacore Hadamard benchmark, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, torch {torch.__version__}")
    if not args.no_cpu:
        cpu_table(args.quick)
    if not args.no_gpu:
        gpu_table(args.quick)


if __name__ == "__main__":
    main()

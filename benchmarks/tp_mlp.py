"""Tensor-parallel act-order MLP: naive (all-gather + global permutation) vs TP-aware.

Llama-70B MLP shard shapes (hidden 8192, intermediate 28672, W4 g128) on gloo over
loopback, one process per rank, all ranks on this machine. Each rank holds random GPTQ
shards of the right shapes (timing does not depend on the values) prepared once for the
CPU W4A16 op the compiler emits (``hadacore::w4a16_gemm_cpu``: torch's int4 kernel at
small M, bf16 BLAS above), wrapped in hadacore's column/row-parallel layers:

- ``naive``: gate/up shards -> silu*mul -> all-gather [M, I] -> this rank's columns of the
  global act-order permutation -> down shard -> all-reduce;
- ``tp_aware``: gate/up shards (rows permuted offline) -> silu*mul -> down shard -> all-reduce.

The two are timed alternately in one process group (same weights, same threads), each
step bracketed by barriers; a step's time is the slowest rank's; the table shows medians.

    python benchmarks/tp_mlp.py                      # tp 2 and 4, M 1 and 16
    python benchmarks/tp_mlp.py --tp 2 --m 1 --repeats 20 --intermediate 14336
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from hadacore.distributed import ColumnParallelQuantLinear, RowParallelQuantLinear
from hadacore.distributed.layers import _all_gather
from hadacore.kernels.cpu.w4a16 import prepare_w4a16_cpu


class PreparedLinear(nn.Module):
    """A GPTQ shard prepared once for ``hadacore::w4a16_gemm_cpu`` (what the compiler emits on CPU)."""

    def __init__(self, k: int, n: int, group_size: int, g_idx: torch.Tensor | None, gen: torch.Generator):
        super().__init__()
        qweight = torch.randint(-(2**31), 2**31 - 1, (k // 8, n), dtype=torch.int32, generator=gen)
        qzeros = torch.full((k // group_size, n // 8), 0x77777777, dtype=torch.int32)  # zero 8: symmetric
        scales = (torch.rand(k // group_size, n, generator=gen) * 1e-2 + 1e-3).to(torch.bfloat16)
        self.prepared = prepare_w4a16_cpu(qweight, qzeros, scales, g_idx, group_size)
        self.in_features, self.out_features = k, n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.prepared(x)


class MLP(nn.Module):
    def __init__(self, gate: nn.Module, up: nn.Module, down: nn.Module):
        super().__init__()
        self.gate, self.up, self.down = gate, up, down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.nn.functional.silu(self.gate(x)) * self.up(x))


def _rank_main(rank: int, world: int, port: int, args: argparse.Namespace, out: dict) -> None:
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(minutes=10))
    hidden, inter, gs = args.hidden, args.intermediate, args.group_size
    local = inter // world
    gen = torch.Generator().manual_seed(1000 + rank)
    g_idx = torch.arange(local, dtype=torch.int32) // gs  # the down shard is group-sorted in both strategies
    t0 = time.perf_counter()
    kw = dict(tp_rank=rank, tp_size=world)
    gate = ColumnParallelQuantLinear(PreparedLinear(hidden, local, gs, None, gen), **kw)
    up = ColumnParallelQuantLinear(PreparedLinear(hidden, local, gs, None, gen), **kw)
    down_local = PreparedLinear(local, hidden, gs, g_idx, gen)
    # The global act-order permutation (same on every rank): rank r takes its slice of it.
    perm = torch.randperm(inter, generator=torch.Generator().manual_seed(7))
    naive = MLP(gate, up, RowParallelQuantLinear(down_local, gather_index=perm[rank * local:(rank + 1) * local], **kw))
    aware = MLP(gate, up, RowParallelQuantLinear(down_local, **kw))
    prep_s = time.perf_counter() - t0
    results = {}
    for m in args.m:
        x = torch.randn(m, hidden, generator=torch.Generator().manual_seed(m)).to(torch.bfloat16)
        times = {"naive": [], "tp_aware": []}
        with torch.no_grad():
            for it in range(args.warmup + args.repeats):
                for name, mlp in (("naive", naive), ("tp_aware", aware)) if it % 2 else (("tp_aware", aware), ("naive", naive)):
                    dist.barrier()
                    t = time.perf_counter()
                    y = mlp(x)
                    float(y[0, 0])  # waits for the all-reduce
                    dt = torch.tensor([time.perf_counter() - t], dtype=torch.float64)
                    dist.all_reduce(dt, op=dist.ReduceOp.MAX)
                    if it >= args.warmup:
                        times[name].append(dt.item())
        # the communication alone: what naive adds (all-gather of the [M, I/tp] activation)
        h = torch.randn(local, m).to(torch.bfloat16)
        gathers = []
        for it in range(args.warmup + args.repeats):
            dist.barrier()
            t = time.perf_counter()
            g = _all_gather(h, 0, dist.group.WORLD)
            float(g[0, 0])
            dt = torch.tensor([time.perf_counter() - t], dtype=torch.float64)
            dist.all_reduce(dt, op=dist.ReduceOp.MAX)
            if it >= args.warmup:
                gathers.append(dt.item())
        results[m] = {k: statistics.median(v) for k, v in times.items()}
        results[m].update({f"{k}_min": min(v) for k, v in times.items()})
        results[m]["all_gather"] = statistics.median(gathers)
    if rank == 0:
        out[world] = {"results": results, "prep_s": prep_s}
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tp", type=int, nargs="+", default=[2, 4])
    p.add_argument("--m", type=int, nargs="+", default=[1, 16])
    p.add_argument("--hidden", type=int, default=8192)
    p.add_argument("--intermediate", type=int, default=28672)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    args = p.parse_args()
    manager = mp.get_context("spawn").Manager()
    out = manager.dict()
    for tp in args.tp:
        if args.intermediate % (tp * args.group_size):
            raise SystemExit(f"intermediate {args.intermediate} does not split into {tp} group-aligned shards")
        mp.start_processes(_rank_main, args=(tp, _free_port(), args, out), nprocs=tp, start_method="spawn")
    print(f"TP MLP act-order, hidden {args.hidden}, intermediate {args.intermediate}, W4 g{args.group_size}, bf16 "
          f"activations, gloo/loopback, {args.threads} thread(s)/rank, {os.cpu_count()} CPUs, "
          f"median of {args.repeats} (slowest rank per step)")
    print("median and min over steps; all-gather: the [M, I/tp] collective alone (median)")
    print(f"{'tp':>3} {'M':>4} {'naive ms':>10} {'tp_aware ms':>12} {'ratio':>7} "
          f"{'naive min':>10} {'aware min':>10} {'ratio':>7} {'all-gather ms':>14}")
    for tp in args.tp:
        for m, r in out[tp]["results"].items():
            print(f"{tp:>3} {m:>4} {r['naive'] * 1e3:>10.2f} {r['tp_aware'] * 1e3:>12.2f} {r['naive'] / r['tp_aware']:>7.2f} "
                  f"{r['naive_min'] * 1e3:>10.2f} {r['tp_aware_min'] * 1e3:>10.2f} {r['naive_min'] / r['tp_aware_min']:>7.2f} "
                  f"{r['all_gather'] * 1e3:>14.3f}")
    print("ratio = naive / tp_aware (> 1: the TP-aware plan is faster); build time per rank: "
          + ", ".join(f"tp={tp} {out[tp]['prep_s']:.0f}s" for tp in args.tp))


if __name__ == "__main__":
    main()

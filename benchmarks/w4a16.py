"""W4A16 GEMM benchmark: prints tables of ms and ratios (not a test).

    python benchmarks/w4a16.py            # CPU table (+ GPU table when CUDA is present), ~4 min
    python benchmarks/w4a16.py --quick    # one shape, three M values

CPU columns (bf16 activations unless the column says otherwise; ms, min over repeats,
because the machine is shared and the minimum is the least disturbed run):

- ``hadacore``: ``hadacore::w4a16_gemm_cpu`` on a prepared weight (what the compiler
  emits): the int4 kernel for M <= int4_max_m, bf16 BLAS above.
- ``int4``: the same op with only the int4 weight kept (``dense=False``).
- ``bf16 lin`` / ``fp32 lin``: ``F.linear`` on a dense weight of that dtype (the user's
  unquantized alternatives; fp32 with fp32 activations).
- ``deq+lin``: ``hadacore.w4a16_matmul`` on CPU = dequantize every call + BLAS (the
  generic op, and what eager ``QuantLinear`` costs).
- ``floor``: bytes the int4 path must read (packed weight + bf16 scales/zeros) divided by
  the read bandwidth measured here on a buffer larger than the last-level cache.

Weights are cold by default (a buffer larger than the LLC is read before each timed
call): in a model the weights exceed the cache; ``--hot`` times them cache-resident.

Ratios: ``floor/hc`` (1.0 = at the memory floor) and ``hc/best`` (hadacore over the best
alternative among bf16 lin, fp32 lin, deq+lin; <= 1.10 is the target).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

import hadacore
from hadacore.kernels.cpu.w4a16 import DEFAULT_INT4_MAX_M, SHORT_K_INT4_MAX_M, prepare_w4a16_cpu
from hadacore.formats.gptq import dequantize_gptq, pack_gptq

from _common import read_bandwidth

CPU_SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (7168, 8192)]  # (N, K); 7168 = 28672 / 4
CPU_MS = [1, 4, 16, 64, 256]
GPU_SHAPES = [(4096, 4096), (8192, 8192), (11008, 4096), (4096, 11008), (14336, 4096), (4096, 14336)]
GPU_MS = [1, 2, 4, 8, 16, 32, 64]
GROUP = 128


class CpuTimer:
    """Min wall time in ms over repeats. ``cold``: before each timed call, read a buffer
    larger than the last-level cache, so weights come from DRAM as they do in a model whose
    weights exceed the cache (this host's L3 is hundreds of MiB: hot timings flatter BLAS)."""

    def __init__(self, cold: bool, flush_bytes: int = 768 << 20):
        self.cold = cold
        self.flush = torch.ones(flush_bytes // 4)

    def read_bandwidth(self) -> float:
        """GB/s of ``sum`` over the flush buffer (larger than the LLC)."""
        return read_bandwidth(self.flush, reps=6) / 1e9

    def __call__(self, fn, reps: int = 6, cold: bool | None = None) -> float:
        return self.many([fn], reps, cold)[0]

    def many(self, fns, reps: int = 6, cold: bool | None = None) -> list[float]:
        """Time several functions round-robin (each rep runs all), so load that drifts
        during the run hits every column alike."""
        cold = self.cold if cold is None else cold
        for fn in fns:
            fn()
        best = [float("inf")] * len(fns)
        for _ in range(reps):
            for i, fn in enumerate(fns):
                if cold:
                    self.flush.sum()
                t = time.perf_counter()
                fn()
                best[i] = min(best[i], time.perf_counter() - t)
        return [b * 1e3 for b in best]


def random_gptq(n: int, k: int, gs: int, sym: bool, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.int32)
    groups = k // gs
    zeros = torch.full((groups, n), 8, dtype=torch.int32) if sym else torch.randint(1, 16, (groups, n), generator=gen, dtype=torch.int32)
    scales = (torch.rand(groups, n, generator=gen) * 0.02 + 0.001).half()
    return pack_gptq(q, scales, zeros, None)


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref).norm() / ref.norm()).item()


def cpu_errors() -> None:
    """The numerics of each CPU path against fp64 (the int4 kernel's bf16 scales/zeros)."""
    n, k = 4096, 4096
    print(f"\nCPU accuracy, [{n} x {k}] group {GROUP}, M=16, relative Frobenius error vs fp64 x @ dequant(W).T")
    print(f"{'zeros':>6} {'x dtype':>9} {'int4':>9} {'bf16 BLAS':>10} {'generic':>9}")
    for sym in (True, False):
        t = random_gptq(n, k, GROUP, sym, seed=1)
        args = (t["qweight"], t["qzeros"], t["scales"], t["g_idx"])
        w = dequantize_gptq(*args, GROUP, dtype=torch.float64)
        int4 = prepare_w4a16_cpu(*args, GROUP, dense=False)
        blas = prepare_w4a16_cpu(*args, GROUP, int4_max_m=0)
        for dtype in (torch.bfloat16, torch.float32):
            x = torch.randn(16, k).to(dtype)
            ref = x.double() @ w.T
            print(
                f"{'sym' if sym else 'asym':>6} {str(dtype)[6:]:>9} {rel_err(int4(x), ref):9.2e} "
                f"{rel_err(blas(x), ref):10.2e} {rel_err(hadacore.w4a16_matmul(x, *args, group_size=GROUP), ref):9.2e}"
            )


def cpu_table(shapes, ms, with_generic: bool, cold: bool, reps: int) -> None:
    timer = CpuTimer(cold)
    bw = timer.read_bandwidth()
    print(f"CPU: torch {torch.__version__}, {torch.get_num_threads()} threads, read bandwidth {bw:.1f} GB/s "
          f"(sum over 768 MiB); {'cold' if cold else 'hot'} weights; int4_max_m = {SHORT_K_INT4_MAX_M} for K < 2048, else {DEFAULT_INT4_MAX_M}; "
          f"group {GROUP}, symmetric; ms = min of {reps} round-robin runs")
    head = f"{'N':>6} {'K':>6} {'M':>4} | {'hadacore':>9} {'int4':>9} {'bf16 lin':>9} {'fp32 lin':>9} {'deq+lin':>9} {'floor':>7} | {'floor/hc':>8} {'hc/best':>7}"
    print(head)
    print("-" * len(head))
    for n, k in shapes:
        t = random_gptq(n, k, GROUP, sym=True, seed=n + k)
        args = (t["qweight"], t["qzeros"], t["scales"], t["g_idx"])
        t0 = time.perf_counter()
        prepared = prepare_w4a16_cpu(*args, GROUP)
        prep_s = time.perf_counter() - t0
        int4 = prepare_w4a16_cpu(*args, GROUP, dense=False)
        w32 = dequantize_gptq(*args, GROUP, dtype=torch.float32)
        w16 = w32.bfloat16()
        floor_ms = (int4.packed.numel() + int4.scales_and_zeros.numel() * 2) / bw / 1e6
        deq_ms = None
        for m in ms:
            x = torch.randn(m, k, dtype=torch.bfloat16)
            x32 = x.float()
            cols = {
                "hc": lambda: prepared(x),
                "int4": lambda: int4(x),
                "bf16": lambda: F.linear(x, w16),
                "fp32": lambda: F.linear(x32, w32),
            }
            r = dict(zip(cols, timer.many(list(cols.values()), reps)))
            if with_generic:
                r["deq"] = timer(lambda: hadacore.w4a16_matmul(x, *args, group_size=GROUP), reps=1)
            best = min(v for key, v in r.items() if key in ("bf16", "fp32", "deq"))
            deq = f"{r['deq']:9.2f}" if "deq" in r else f"{'-':>9}"
            print(
                f"{n:6d} {k:6d} {m:4d} | {r['hc']:9.3f} {r['int4']:9.3f} {r['bf16']:9.3f} {r['fp32']:9.3f} {deq} "
                f"{floor_ms:7.3f} | {floor_ms / r['hc']:8.2f} {r['hc'] / best:7.2f}"
            )
        print(f"{'':>13}prepare {prep_s:.2f} s; prepared {prepared.nbytes / 2**20:.0f} MiB "
              f"(int4 only {int4.nbytes / 2**20:.0f} MiB, bf16 weight {w16.numel() * 2 / 2**20:.0f} MiB)")


def gpu_table(shapes, ms) -> None:
    import triton.testing

    from hadacore.kernels.triton.w4a16 import w4a16_matmul_triton

    dev = torch.device("cuda")
    buf = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
    copy_ms = triton.testing.do_bench(lambda: buf.clone())
    hbm = 2 * buf.numel() / copy_ms / 1e6
    del buf
    print(f"\nGPU: {torch.cuda.get_device_name()}, copy bandwidth {hbm:.0f} GB/s (1 GiB clone); group {GROUP}, fp16")
    head = (f"{'N':>6} {'K':>6} {'M':>3} | {'splitk':>7} {'dp':>7} {'auto':>7} {'cublas':>7} {'int4mm':>7} | "
            f"{'GB/s':>6} {'%copy':>5} {'dp/sk':>6} {'cub/best':>8}")
    print(head)
    print("-" * len(head))
    for n, k in shapes:
        t = {key: v.to(dev) for key, v in random_gptq(n, k, GROUP, sym=True, seed=n + k).items()}
        args = (t["qweight"], t["qzeros"], t["scales"], t["g_idx"])
        w16 = dequantize_gptq(*args, GROUP, dtype=torch.float16)
        int4mm = _torch_int4mm(w16, args, n, k)
        nbytes = t["qweight"].numel() * 4 + t["scales"].numel() * 2 + t["qzeros"].numel() * 4
        for m in ms:
            x = torch.randn(m, k, dtype=torch.float16, device=dev)
            r = {}
            for name, kw in (("splitk", {"split_k": 4}), ("dp", {"split_k": 1}), ("auto", {})):
                try:
                    r[name] = triton.testing.do_bench(lambda: w4a16_matmul_triton(x, *args, group_size=GROUP, **kw))
                except Exception as e:  # a config the launcher rejects: show it, keep going
                    print(f"  {name} failed at M={m}: {type(e).__name__}: {e}")
                    r[name] = float("nan")
            r["cublas"] = triton.testing.do_bench(lambda: F.linear(x, w16))
            r["int4mm"] = triton.testing.do_bench(lambda: int4mm(x)) if int4mm else float("nan")
            best_hc = min(r["splitk"], r["dp"], r["auto"])
            gbs = nbytes / best_hc / 1e6
            print(
                f"{n:6d} {k:6d} {m:3d} | {r['splitk']:7.4f} {r['dp']:7.4f} {r['auto']:7.4f} {r['cublas']:7.4f} {r['int4mm']:7.4f} | "
                f"{gbs:6.0f} {100 * gbs / hbm:5.0f} {r['dp'] / r['splitk']:6.2f} {r['cublas'] / best_hc:8.2f}"
            )


def _torch_int4mm(w16: torch.Tensor, args, n: int, k: int):
    """torch's CUDA tinygemm on the same weight (bf16 activations), or None if unavailable."""
    from hadacore.formats.gptq import unpack_gptq

    try:
        q, s, z, _ = unpack_gptq({"qweight": args[0], "qzeros": args[1], "scales": args[2]})
        packed_u8 = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)  # [N, K/2], even k in the high nibble
        packed = torch.ops.aten._convert_weight_to_int4pack(packed_u8.contiguous(), 8)
        sz = torch.stack([s.float(), (8 - z.float()) * s.float()], dim=-1).bfloat16().contiguous()

        def run(x):
            return torch.ops.aten._weight_int4pack_mm(x.bfloat16(), packed, GROUP, sz)

        xt = torch.randn(4, k, device=w16.device, dtype=torch.bfloat16)
        err = rel_err(run(xt), xt.double() @ w16.double().T)
        if err > 2e-2:
            print(f"  torch int4mm disagrees with dequant (rel err {err:.1e}); column left out")
            return None
        return run
    except Exception as e:
        print(f"  torch int4mm unavailable: {type(e).__name__}: {e}")
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one shape (4096x4096), M in {1, 16, 256}")
    ap.add_argument("--no-generic", action="store_true", help="skip the slow dequantize-per-call column")
    ap.add_argument("--skip-cpu", action="store_true")
    ap.add_argument("--hot", action="store_true", help="time with weights left in cache (default: cold)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--reps", type=int, default=6, help="timed runs per cell (the minimum is shown)")
    opts = ap.parse_args()
    torch.manual_seed(0)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    if not opts.skip_cpu:
        shapes, ms = (CPU_SHAPES[:1], [1, 16, 256]) if opts.quick else (CPU_SHAPES, CPU_MS)
        cpu_table(shapes, ms, with_generic=not opts.no_generic, cold=not opts.hot, reps=opts.reps)
        cpu_errors()
    if torch.cuda.is_available():
        gpu_shapes, gpu_ms = (GPU_SHAPES[:1], [1, 16, 64]) if opts.quick else (GPU_SHAPES, GPU_MS)
        gpu_table(gpu_shapes, gpu_ms)
    else:
        print("\nGPU: no CUDA device; GPU table skipped")


if __name__ == "__main__":
    main()

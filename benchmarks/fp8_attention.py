"""FP8 attention with R3: accuracy table (anywhere) and GPU timing table (not a test).

Accuracy (CPU or GPU): relative Frobenius error of ``hadacore::fp8_attention`` against
fp64 exact attention, with and without R3, on Gaussian Q/K and on Q/K whose outlier
channels (shared by Q and K, as in LLM attention sinks) are ``factor`` times larger.

Timing (CUDA only): the whole op (R3 + quantize + attention kernel), its two parts, and
the same kernel on bf16 Q/K, against ``F.scaled_dot_product_attention`` on bf16 (what a
user would otherwise run). Ratios are "SDPA time / this time" (above 1 = faster than
SDPA). Usage::

    python benchmarks/fp8_attention.py            # accuracy; + timings when CUDA is present
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F

import hadacore.ops  # noqa: F401  (hadacore::hadamard)
from hadacore.ops import fp8_attention


def exact(q, k, v, causal):
    q, k, v = (t.double() for t in (q, k, v))
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if causal:
        keep = torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).tril()
        s = s.masked_fill(~keep, float("-inf"))
    return s.softmax(-1) @ v


def rel(x, ref):
    return ((x.double() - ref).norm() / ref.norm()).item()


def accuracy_table(device: str) -> None:
    print("\naccuracy: relative Frobenius error vs fp64 (B=1, H=8, S=256, D=128, causal, fp32 in)")
    print(f"{'outlier factor':>15} {'FP8 + R3':>10} {'FP8 only':>10} {'R3 gain':>8}")
    for factor in (1.0, 3.0, 10.0, 30.0, 100.0):
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, 8, 256, 128, generator=g).to(device) for _ in range(3))
        q[..., [3, 50, 77]] *= factor
        k[..., [3, 50, 77]] *= factor
        ref = exact(q, k, v, True)
        e_r3 = rel(fp8_attention(q, k, v, is_causal=True), ref)
        e_plain = rel(fp8_attention(q, k, v, is_causal=True, rotate=False), ref)
        print(f"{factor:>15g} {e_r3:>10.4f} {e_plain:>10.4f} {e_plain / e_r3:>7.2f}x")


def timing_table() -> None:
    from triton.testing import do_bench

    from hadacore.kernels.triton.fp8_attention import attention_fwd_triton, r3_quantize_fp8_triton

    print(f"\nGPU timings (ms, median of do_bench) on {torch.cuda.get_device_name()}, bf16 in/out")
    cols = ("sdpa bf16", "fp8 op", "r3+quant", "fp8 kernel", "bf16 kernel", "sdpa/op", "sdpa/kern")
    print(f"{'B,Hq,Hkv,S,D,causal':>24} " + " ".join(f"{c:>11}" for c in cols))
    for b, hq, hkv, s, d in ((1, 32, 32, 2048, 128), (1, 32, 8, 4096, 128), (4, 32, 8, 1024, 128), (1, 32, 8, 8192, 128)):
        for causal in (False, True):
            q = torch.randn(b, hq, s, d, device="cuda", dtype=torch.bfloat16)
            k = torch.randn(b, hkv, s, d, device="cuda", dtype=torch.bfloat16)
            v = torch.randn(b, hkv, s, d, device="cuda", dtype=torch.bfloat16)
            sc = 1.0 / math.sqrt(d)
            (q8, sq), (k8, sk) = r3_quantize_fp8_triton(q, rotate=True), r3_quantize_fp8_triton(k, rotate=True)
            ones_q = torch.ones(b, hq, device="cuda")
            ones_k = torch.ones(b, hkv, device="cuda")
            t = {
                "sdpa bf16": do_bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=hq != hkv)),
                "fp8 op": do_bench(lambda: fp8_attention(q, k, v, is_causal=causal)),
                "r3+quant": do_bench(lambda: (r3_quantize_fp8_triton(q, rotate=True), r3_quantize_fp8_triton(k, rotate=True))),
                "fp8 kernel": do_bench(lambda: attention_fwd_triton(
                    q8, k8, v, sq, sk, is_causal=causal, scale=sc, out_dtype=q.dtype)),
                "bf16 kernel": do_bench(lambda: attention_fwd_triton(
                    q, k, v, ones_q, ones_k, is_causal=causal, scale=sc, out_dtype=q.dtype)),
            }
            row = [t[c] for c in cols[:5]] + [t["sdpa bf16"] / t["fp8 op"], t["sdpa bf16"] / t["fp8 kernel"]]
            print(f"{f'{b},{hq},{hkv},{s},{d},{int(causal)}':>24} " + " ".join(f"{x:>11.3f}" for x in row))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    accuracy_table(device)
    if device == "cuda":
        timing_table()
    else:
        print("\n(no CUDA: GPU timing table skipped)")


if __name__ == "__main__":
    main()

"""Compile time and steady-state forward time: hadacore (W4A16) vs Inductor fp32 vs eager.

Models: a tiny Llama (transformers LlamaForCausalLM, random weights) and one
Llama-7B-shaped decoder layer (hidden 4096, intermediate 11008, 32 heads of 128), fp32,
at M tokens in {1, 16, 128} (batch 1, sequence M). hadacore compiles with
``options={"quantize": "w4a16", "group_size": 128}`` (RTN at compile time; on CPU the
W4A16 GEMMs run the prepared int4 kernel for small M and bf16 BLAS above).

Compile time is the first call's wall time (Dynamo + passes + Inductor), with a fresh
Dynamo and an empty Inductor cache directory. M=1 compiles its own graph (Dynamo
specialises size-1 dims); M=16 and 128 share one graph marked dynamic in the sequence.

    python benchmarks/compile.py            # both models
    python benchmarks/compile.py --only layer --iters 5 --threads 2
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="hadacore_bench_"))

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers.models.llama import modeling_llama  # noqa: E402

import hadacore  # noqa: E402

MS = (1, 16, 128)


class DecoderLayer(torch.nn.Module):
    """One LlamaDecoderLayer with its rotary embedding: hidden [1, M, H] -> [1, M, H]."""

    def __init__(self, cfg):
        super().__init__()
        self.layer = modeling_llama.LlamaDecoderLayer(cfg, 0)
        self.rotary = modeling_llama.LlamaRotaryEmbedding(cfg)

    def forward(self, h):
        pos = torch.arange(h.shape[1], device=h.device)[None]
        return self.layer(h, position_embeddings=self.rotary(h, pos))


def llama_cfg(**kw):
    cfg = transformers.LlamaConfig(**kw)
    cfg._attn_implementation = "sdpa"
    return cfg


def build(which: str):
    torch.manual_seed(0)
    if which == "tiny":
        cfg = llama_cfg(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256)
        model = transformers.LlamaForCausalLM(cfg).eval()
        return (lambda ids: model(ids).logits), (lambda m: torch.randint(0, 128, (1, m))), model
    cfg = llama_cfg(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                    head_dim=128, max_position_embeddings=256)
    layer = DecoderLayer(cfg).eval()
    return layer, (lambda m: torch.randn(1, m, 4096)), layer


def timed(fn, x, iters: int) -> float:
    """Best-of-``iters`` seconds per call after two warm-up calls (the shared 2-core
    machine makes the median a measure of the neighbours' load)."""
    for _ in range(2):
        fn(x)
    ts = []
    for _ in range(iters):
        t = time.perf_counter()
        fn(x)
        ts.append(time.perf_counter() - t)
    return min(ts)


def run(which: str, iters: int) -> list[dict]:
    fn, make_input, module = build(which)
    rows = []
    variants = {
        "eager fp32": None,
        "inductor fp32": dict(backend="inductor"),
        "hadacore w4a16": dict(backend="hadacore", options={"quantize": "w4a16", "group_size": 128 if which == "layer" else 32}),
    }
    for name, kw in variants.items():
        torch._dynamo.reset()
        compiled = fn if kw is None else torch.compile(fn, **kw)
        for m in MS:
            x = make_input(m)
            if m > 1:
                torch._dynamo.mark_dynamic(x, 1)
            with torch.no_grad():
                t0 = time.perf_counter()
                compiled(x)
                first = time.perf_counter() - t0
                t = timed(compiled, x, iters)
            rows.append({"model": which, "variant": name, "M": m, "first_s": first, "fwd_ms": t * 1e3})
            print(f"  {which:5s} {name:15s} M={m:4d} first call {first:7.2f} s  forward {t * 1e3:9.3f} ms", flush=True)
    return rows


def table(rows: list[dict]) -> None:
    print()
    print("| model | M | eager fp32 ms | Inductor fp32 ms | hadacore w4a16 ms | Inductor/hadacore | eager/hadacore | compile s (inductor / hadacore) |")
    print("|---|---|---|---|---|---|---|---|")
    by = {(r["model"], r["variant"], r["M"]): r for r in rows}
    for model in dict.fromkeys(r["model"] for r in rows):
        for m in MS:
            e, i, h = (by[(model, v, m)] for v in ("eager fp32", "inductor fp32", "hadacore w4a16"))
            print(f"| {model} | {m} | {e['fwd_ms']:.3f} | {i['fwd_ms']:.3f} | {h['fwd_ms']:.3f} | "
                  f"{i['fwd_ms'] / h['fwd_ms']:.2f}x | {e['fwd_ms'] / h['fwd_ms']:.2f}x | "
                  f"{i['first_s']:.1f} / {h['first_s']:.1f} |")
    print("\n'compile s' is the first call at that M (M=16 compiles the dynamic graph; M=128 reuses it).")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=("tiny", "layer"))
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: on a shared, oversubscribed 2-core machine OpenMP "
                         "barriers make multi-threaded timings measure the neighbours' load)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, cache {os.environ['TORCHINDUCTOR_CACHE_DIR']}")
    rows = []
    for which in ("tiny", "layer"):
        if args.only in (None, which):
            rows += run(which, args.iters if which == "tiny" else max(3, args.iters // 2))
    hadacore.reset_stats()
    table(rows)


if __name__ == "__main__":
    main()

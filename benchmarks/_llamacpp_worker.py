"""llama.cpp's side of ``benchmarks/llamacpp.py``: runs in the benchmark's own virtual
environment (llama-cpp-python), never imports hadacore, prints one JSON line.

    python _llamacpp_worker.py quantize SRC DST FTYPE [--requant]
    python _llamacpp_worker.py {decode,prefill,ppl} --model M.gguf --ids ids.npy --threads N [...]

Only llama.cpp's low-level C API is used (``llama_decode`` on hand-filled batches): no
sampler, no Python-side sampling. Timings cover the ``llama_decode`` calls alone (CPU
decode is synchronous); the greedy pick is a numpy argmax on a zero-copy view of the
logits, outside the timed region. Token ids come from hadacore's tokenizer (``--ids``),
so both engines see the same tokens.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import statistics
import sys
import time

import llama_cpp as L
import numpy as np


@L.llama_log_callback
def _quiet(level, text, user_data):  # llama.cpp logs every load to stderr
    pass


class Context:
    """One model + context with a batch of up to ``n_batch`` tokens over ``n_seq`` sequences."""

    def __init__(self, path: str, threads: int, n_ctx: int, n_batch: int, n_seq: int = 1):
        L.llama_backend_init()
        mp = L.llama_model_default_params()
        self.model = L.llama_model_load_from_file(path.encode(), mp)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        self.n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))
        cp = L.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_seq_max = n_ctx, n_batch, n_batch, n_seq
        cp.n_threads = cp.n_threads_batch = threads
        self.ctx = L.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise RuntimeError("llama_init_from_model failed")
        self.batch = L.llama_batch_init(n_batch, 0, 1)
        self.seconds = 0.0  # time inside llama_decode

    def clear(self) -> None:
        L.llama_memory_clear(L.llama_get_memory(self.ctx), True)

    def decode(self, tokens, positions, seqs, logits) -> None:
        b = self.batch
        for i, (t, p, s, o) in enumerate(zip(tokens, positions, seqs, logits)):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = int(t), int(p), 1, int(o)
            b.seq_id[i][0] = int(s)
        b.n_tokens = len(tokens)
        t0 = time.perf_counter()
        rc = L.llama_decode(self.ctx, b)
        self.seconds += time.perf_counter() - t0
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")

    def row(self, i: int) -> np.ndarray:
        return np.ctypeslib.as_array(L.llama_get_logits_ith(self.ctx, i), shape=(self.n_vocab,))

    def rows(self, n: int) -> np.ndarray:
        return np.ctypeslib.as_array(L.llama_get_logits(self.ctx), shape=(n, self.n_vocab))

    def close(self) -> None:
        L.llama_batch_free(self.batch)
        L.llama_free(self.ctx)
        L.llama_model_free(self.model)


def decode(a, ids: np.ndarray) -> dict:
    """Greedy decode of ``a.batch`` sequences (own seq_id, own prompt), one token each per step."""
    n, p = a.batch, a.prompt_len
    ctx = Context(a.model, a.threads, n_ctx=n * (p + a.warmup + a.tokens + 8), n_batch=max(n * p, 32), n_seq=n)
    prompts = [ids[s % len(ids)][:p] for s in range(n)]
    ctx.decode([t for pr in prompts for t in pr], [i for _ in prompts for i in range(p)],
               [s for s in range(n) for _ in range(p)], [i == p - 1 for _ in prompts for i in range(p)])
    last = [int(ctx.row((s + 1) * p - 1).argmax()) for s in range(n)]
    steps = []
    for step in range(a.warmup + a.tokens):
        before = ctx.seconds
        ctx.decode(last, [p + step] * n, range(n), [1] * n)
        last = [int(ctx.row(s).argmax()) for s in range(n)]
        if step >= a.warmup:
            steps.append(ctx.seconds - before)
    ctx.close()
    med = statistics.median(steps)
    return {"batch": n, "tokens": a.tokens, "step_ms": 1e3 * med, "tok_s_per_seq": 1 / med}


def prefill(a, ids: np.ndarray) -> dict:
    n = a.prefill_len
    ctx = Context(a.model, a.threads, n_ctx=n + 8, n_batch=n)
    tokens = ids.reshape(-1)[:n]
    times = []
    for rep in range(1 + a.reps):  # one warm-up
        ctx.clear()
        before = ctx.seconds
        ctx.decode(tokens, range(n), [0] * n, [i == n - 1 for i in range(n)])
        if rep:
            times.append(ctx.seconds - before)
    ctx.close()
    return {"prefill_len": n, "tok_s": n / statistics.median(times)}


def perplexity(a, ids: np.ndarray) -> dict:
    """exp(mean NLL) with each window scored on its own: hadacore.convert.evaluate.perplexity."""
    windows = ids[: a.windows]
    n = windows.shape[1]
    ctx = Context(a.model, a.threads, n_ctx=n + 8, n_batch=n)
    nll, count = 0.0, 0
    for w in windows:
        ctx.clear()
        ctx.decode(w, range(n), [0] * n, [1] * n)
        logits = ctx.rows(n)[:-1].astype(np.float64)
        top = logits.max(1, keepdims=True)
        lse = top[:, 0] + np.log(np.exp(logits - top).sum(1))
        nll += float((lse - logits[np.arange(n - 1), w[1:].astype(np.int64)]).sum())
        count += n - 1
    ctx.close()
    return {"windows": len(windows), "seqlen": n, "ppl": math.exp(nll / count)}


def quantize(a) -> dict:
    name = "LLAMA_FTYPE_ALL_F32" if a.ftype == "F32" else f"LLAMA_FTYPE_MOSTLY_{a.ftype}"
    L.llama_backend_init()
    qp = L.llama_model_quantize_default_params()
    qp.ftype, qp.nthread, qp.allow_requantize = getattr(L, name), 2, a.requant
    rc = L.llama_model_quantize(a.src.encode(), a.dst.encode(), ctypes.byref(qp))
    if rc != 0:
        raise SystemExit(f"llama_model_quantize {a.src} -> {a.dst} ({name}) returned {rc}")
    return {"dst": a.dst, "ftype": a.ftype}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="mode", required=True)
    q = sub.add_parser("quantize")
    q.add_argument("src")
    q.add_argument("dst")
    q.add_argument("ftype", help="F16, Q4_0, Q4_K_M, ... (llama_cpp.LLAMA_FTYPE_MOSTLY_*)")
    q.add_argument("--requant", action="store_true", help="the source has quantized tensors")
    for mode in ("decode", "prefill", "ppl"):
        m = sub.add_parser(mode)
        m.add_argument("--model", required=True)
        m.add_argument("--ids", required=True, help="[n, seqlen] int token ids (.npy)")
        m.add_argument("--threads", type=int, default=1)
        m.add_argument("--batch", type=int, default=1)
        m.add_argument("--prompt-len", type=int, default=16)
        m.add_argument("--tokens", type=int, default=64)
        m.add_argument("--warmup", type=int, default=2)
        m.add_argument("--prefill-len", type=int, default=512)
        m.add_argument("--reps", type=int, default=3)
        m.add_argument("--windows", type=int, default=8)
    a = p.parse_args()
    L.llama_log_set(_quiet, None)
    if a.mode == "quantize":
        out = quantize(a)
    else:
        ids = np.load(a.ids)
        out = {"decode": decode, "prefill": prefill, "ppl": perplexity}[a.mode](a, ids)
    print(json.dumps({"mode": a.mode, **out}))


if __name__ == "__main__":
    sys.exit(main())

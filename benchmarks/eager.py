"""Eager-mode W4A16: a user who has not compiled yet (prints tables, not a test).

    python benchmarks/eager.py                 # both parts
    python benchmarks/eager.py --layer-only    # part 1 only (no model conversion)
    python benchmarks/eager.py --threads 1

1. One ``QuantLinear`` at M=1 on the Llama-7B MLP shapes (N x K = 4096 x 11008 and
   11008 x 4096, group 128), eager forward, against torch's own int4 kernel
   (``_weight_int4pack_mm_for_cpu``) called directly on the very tensors the layer
   prepared, and against the plain dequantize + linear reference. Target: the layer
   within 1.2x of the bare kernel.
2. Eager greedy decode of SmolLM2-135M-Instruct at batch 1 (static KV cache, no compile):
   the fp32 model against its W4A16 checkpoint (RTN g64, rotate full: R1/R2 folded, R4
   online) loaded with ``hadacore.load``. Target: at least 2x eager fp32.

Medians of ``--reps`` timed runs after warm-up; the two sides of each ratio alternate in
one process, so a drifting load on a shared machine moves both.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch


def _median_time(fn, reps: int, inner: int = 1) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        times.append((time.perf_counter() - t0) / inner)
    return statistics.median(times)


def layer_table(reps: int) -> None:
    from hadacore.quant.linear import QuantLinear

    print("## 1. QuantLinear at M=1, eager (ms; ratio over the bare int4 kernel on the same prepared weight)\n")
    print("| N x K | x dtype | QuantLinear | bare int4 kernel | ratio | dequantize + linear (reference) |")
    print("|---|---|---|---|---|---|")
    for n, k in ((4096, 11008), (11008, 4096)):
        torch.manual_seed(0)
        lin = torch.nn.Linear(k, n, bias=False)
        layer = QuantLinear.from_linear(lin, group_size=128, sym=False).eval()
        del lin
        for dtype in (torch.bfloat16, torch.float32):
            x = torch.randn(1, k, dtype=dtype)
            with torch.no_grad():
                layer(x)  # prepares the layer's int4 form once
                prepared = _int4_form(layer)  # the same preparation, for the bare kernel
                xb = x.to(torch.bfloat16)

                def bare():
                    return torch.ops.aten._weight_int4pack_mm_for_cpu(
                        xb, prepared.packed, prepared.int4_group_size, prepared.scales_and_zeros)

                ours, kernel = [], []
                for _ in range(reps):  # alternate: both see the same load
                    ours.append(_median_time(lambda: layer(x), 1, 20))
                    kernel.append(_median_time(bare, 1, 20))
                ref = _median_time(lambda: layer.reference(x), 3)
            q, b = statistics.median(ours), statistics.median(kernel)
            print(f"| {n} x {k} | {str(dtype).removeprefix('torch.')} | {q * 1e3:.3f} | {b * 1e3:.3f} | "
                  f"{q / b:.2f}x | {ref * 1e3:.2f} |")
    print()


def _int4_form(layer):
    """The int4 form the layer prepares for small M (same function, same tensors)."""
    from hadacore.kernels.cpu.w4a16 import prepare_w4a16_cpu
    from hadacore.quant.act_order import sort_by_group

    gptq, _ = sort_by_group({"qweight": layer.qweight, "qzeros": layer.qzeros, "scales": layer.scales,
                             "g_idx": layer.g_idx})
    return prepare_w4a16_cpu(gptq["qweight"], gptq["qzeros"], gptq["scales"], gptq["g_idx"], layer.group_size,
                             dense=False)


def decode_table(reps: int, tokens: int) -> None:
    import hadacore
    from hadacore.convert.cli import default_model_path
    from hadacore.convert.source import load_source
    from hadacore.generate import StaticDecoder

    src = load_source(default_model_path())
    fp32, tok = src.model, src.tokenizer
    with tempfile.TemporaryDirectory() as tmp:
        out = hadacore.convert(fp32, f"{tmp}/w4", method="rtn", group_size=64, rotate="full", sym=False,
                               tokenizer=tok)
        loaded = {dt: hadacore.load(out, dtype=dt) for dt in (torch.float32, torch.bfloat16)}
    prompt = tok("The capital of France is", return_tensors="pt")["input_ids"]
    max_len = prompt.shape[1] + tokens + 1
    decoders = {"fp32 (float model)": StaticDecoder(fp32, max_len=max_len)}
    for dt, m in loaded.items():
        decoders[f"W4A16 checkpoint, {str(dt).removeprefix('torch.')} activations"] = StaticDecoder(m, max_len=max_len)
    rates = {name: [] for name in decoders}
    for _ in range(reps):
        for name, dec in decoders.items():  # alternate rows within each round
            rates[name].append(dec.generate(prompt, tokens).decode_tokens_per_s)
    base = statistics.median(rates["fp32 (float model)"])
    print(f"## 2. SmolLM2-135M eager greedy decode, batch 1, {tokens} tokens, {torch.get_num_threads()} thread(s)\n")
    print("| model | tok/s (median of rounds) | vs eager fp32 | rounds |")
    print("|---|---|---|---|")
    for name, r in rates.items():
        med = statistics.median(r)
        print(f"| {name} | {med:.1f} | {med / base:.2f}x | {', '.join(f'{v:.1f}' for v in r)} |")
    print()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--layer-only", action="store_true")
    p.add_argument("--decode-only", action="store_true")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)\n")
    if not a.decode_only:
        layer_table(a.reps)
    if not a.layer_only:
        decode_table(a.reps, a.tokens)


if __name__ == "__main__":
    main()

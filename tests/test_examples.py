"""The examples run, at a tiny size, so they never rot (tp_generate.py: tests/test_distributed.py)."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _run(script: str, *args: str) -> str:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, str(EXAMPLES / script), *args], capture_output=True, text=True,
                          timeout=600, env=env)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def _stats(stdout: str) -> dict:
    line = next(l for l in stdout.splitlines() if l.startswith("hadacore:"))
    return ast.literal_eval(line.split(":", 1)[1].strip())


def test_quickstart_quantizes_rotates_and_fuses_every_layer():
    out = _run("quickstart.py", "--tiny", "--new-tokens", "4")
    # 2 layers x 7 linears + lm_head, all quantized; q/k/v and gate/up fused (one site each, two rewritten);
    # per layer R4 before down_proj and R3 on Q and K
    s = _stats(out)
    graphs = s.pop("graphs_compiled")  # generate compiles prefill and decode
    assert graphs >= 2 and s == {"linear_found": 15 * graphs, "linear_quantized": 15 * graphs,
                                 "linear_rewritten": 15 * graphs, "hadamard_inserted": 6 * graphs}, (graphs, s)


def test_convert_and_generate_compiled_matches_eager():
    out = _run("convert_and_generate.py", "--tiny", "--new-tokens", "6")
    assert "eager and compiled tokens match" in out, out
    s = _stats(out)
    graphs = s["graphs_compiled"]  # every QuantLinear fused; the untied lm_head stays float
    assert graphs >= 2 and (s["linear_found"], s["linear_rewritten"]) == (15 * graphs, 14 * graphs), s

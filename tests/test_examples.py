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


@pytest.mark.parametrize("script", ["quickstart.py", "convert_and_generate.py"])
def test_example_runs_and_rewrites(script):
    out = _run(script, "--tiny", "--new-tokens", "4")
    tokens = ast.literal_eval(next(l for l in out.splitlines() if l.startswith("generated:")).split(":", 1)[1].strip())
    assert len(tokens) == 4
    stats = _stats(out)
    assert stats["linear_rewritten"] > 0, stats

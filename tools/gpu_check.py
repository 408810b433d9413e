"""``make gpu-check``: every gpu-marked test and the GPU benchmarks, as one Markdown report.

    python tools/gpu_check.py [--out gpu-report.md] [--budget-s 450]

Run on a CUDA machine (the Makefile target sets it up from nothing, offline: a venv with
the system's torch and Triton, hadacore installed into it without dependencies). Each
step has its share of the time budget (default 7.5 minutes in all) and a step that
overruns is stopped and reported as such; the report is written whatever happens, so
one run always says where things stand. Sections: device and versions; pass/fail of
every gpu-marked test (from pytest's JUnit XML); each benchmark's table as it printed.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# (title, command, share of the budget): tests first, then the benchmarks' GPU sections.
STEPS = (
    ("gpu-marked tests", [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
                          "--junitxml", "{junit}"], 0.45),
    ("Hadamard transform (benchmarks/hadamard.py --no-cpu --quick)",
     [sys.executable, "benchmarks/hadamard.py", "--no-cpu", "--quick"], 0.15),
    ("W4A16 GEMM (benchmarks/w4a16.py --skip-cpu)", [sys.executable, "benchmarks/w4a16.py", "--skip-cpu"], 0.2),
    ("FP8 attention (benchmarks/fp8_attention.py)", [sys.executable, "benchmarks/fp8_attention.py"], 0.2),
)


def _run(cmd: list[str], timeout: float) -> tuple[int | str, str, float]:
    t0 = time.monotonic()
    try:
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                           env={**os.environ, "PYTHONUNBUFFERED": "1"})
        return p.returncode, p.stdout + p.stderr, time.monotonic() - t0
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        return f"stopped after {timeout:.0f} s (its share of the budget)", out, time.monotonic() - t0


def _versions() -> list[str]:
    import torch

    lines = [f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}",
             f"- host: {platform.node()}, Python {platform.python_version()}",
             f"- torch {torch.__version__} (CUDA {torch.version.cuda})"]
    try:
        import triton

        lines.append(f"- triton {triton.__version__}")
    except ImportError:
        lines.append("- triton: not importable")
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        lines.append(f"- device: {p.name}, {p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}, "
                     f"{p.multi_processor_count} SMs")
    else:
        lines.append("- device: **no CUDA device visible**")
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout.strip()
        lines.append(f"- driver: {smi or 'unknown'}")
    except (OSError, subprocess.TimeoutExpired):
        lines.append("- driver: nvidia-smi not available")
    return lines


def _junit_table(path: Path) -> tuple[list[str], dict[str, int]]:
    counts = {"passed": 0, "failed": 0, "error": 0, "skipped": 0}
    rows = ["| test | result |", "|---|---|"]
    if not path.exists():
        return ["(no JUnit report: pytest did not finish)"], counts
    for case in ET.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        if case.find("failure") is not None:
            result = "**failed**"
            counts["failed"] += 1
        elif case.find("error") is not None:
            result = "**error**"
            counts["error"] += 1
        elif case.find("skipped") is not None:
            result = "skipped: " + (case.find("skipped").get("message") or "")[:80]
            counts["skipped"] += 1
        else:
            result = "passed"
            counts["passed"] += 1
        rows.append(f"| `{name}` | {result} |")
    return rows, counts


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="gpu-report.md")
    ap.add_argument("--budget-s", type=float, default=450.0, help="total seconds for all steps")
    a = ap.parse_args()
    out = ROOT / a.out
    junit = ROOT / "gpu-junit.xml"
    junit.unlink(missing_ok=True)
    report = ["# hadacore GPU check", "", *_versions(), ""]
    failed = False
    for title, cmd, share in STEPS:
        cmd = [c.format(junit=junit) for c in cmd]
        rc, text, secs = _run(cmd, a.budget_s * share)
        report += [f"## {title}", "", f"`{' '.join(cmd[1:])}`: exit {rc}, {secs:.0f} s", ""]
        if title == "gpu-marked tests":
            rows, counts = _junit_table(junit)
            report += [", ".join(f"{v} {k}" for k, v in counts.items()), ""]
            failures = [r for r in rows if "**" in r]
            report += (["Failures:", "", *rows[:2], *failures, ""] if failures else [])
            report += ["<details><summary>every test</summary>", "", *rows, "", "</details>", ""]
            report += ["```", text[-6000:], "```", ""]
        else:
            report += ["```", text.strip()[-12000:], "```", ""]
        failed |= rc != 0
        out.write_text("\n".join(report))  # after each step: a stopped run still leaves a report
    print("\n".join(report))
    print(f"\nreport: {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

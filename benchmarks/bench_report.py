#!/usr/bin/env python
"""`vitscope report RUN` in a fresh process: PNG only (the default) and with --svg, optionally
against an older checkout's report (``--baseline-src OLD/src``), median of --repeats.

Usage: .venv/bin/python benchmarks/bench_report.py RUN [--repeats 3] [--baseline-src PATH]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def wall(code: str, env: dict[str, str]) -> float:
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, env=env)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--baseline-src", type=Path, help="src/ folder of an older checkout to compare with")
    a = ap.parse_args()
    out = Path(tempfile.mkdtemp(prefix="vitscope-report-"))
    env = dict(os.environ)
    cases = {
        "report (PNG)": (f"from vitscope.report import write_report; write_report({str(a.run)!r}, {str(out / 'png')!r})", env),
        "report --svg (PNG + SVG)": (f"from vitscope.report import write_report; write_report({str(a.run)!r}, {str(out / 'svg')!r}, svg=True)", env),
    }
    if a.baseline_src:
        old = {**env, "PYTHONPATH": str(a.baseline_src)}
        cases["baseline (PNG + SVG, older checkout)"] = (f"from vitscope.report import write_report; write_report({str(a.run)!r}, {str(out / 'old')!r})", old)
    times = {k: [] for k in cases}
    for _ in range(a.repeats):
        for name, (code, e) in cases.items():
            times[name].append(wall(code, e))
    for name, v in times.items():
        print(f"{name:40s} median {statistics.median(v):5.1f} s (min {min(v):.1f}, max {max(v):.1f}, n={a.repeats})")


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""What a user waits for before anything happens: `vitscope --help`, and reading one table of a run
with vitscope against pandas alone (each a fresh process, median of --repeats).

Usage: .venv/bin/python benchmarks/bench_imports.py RUN [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path


def wall(cmd: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="a finished run folder")
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    exe = Path(sys.executable)
    table = a.run / "heads.parquet"
    cases = {
        "vitscope --help": [str(exe.with_name("vitscope")), "--help"],
        "pandas: read heads.parquet": [str(exe), "-c", f"import pandas as pd; pd.read_parquet({str(table)!r})"],
        "vitscope: open_run(run).heads": [str(exe), "-c", f"import vitscope; vitscope.open_run({str(a.run)!r}).heads"],
        "import torch (for scale)": [str(exe), "-c", "import torch"],
    }
    times = {name: [] for name in cases}
    for _ in range(a.repeats):  # interleaved, so a busy moment hits every case alike
        for name, cmd in cases.items():
            times[name].append(wall(cmd))
    med = {name: statistics.median(v) for name, v in times.items()}
    for name, v in med.items():
        print(f"{name:34s} median {v:5.2f} s  (min {min(times[name]):.2f}, max {max(times[name]):.2f}, n={a.repeats})")
    print(f"open_run + table / pandas alone: {med['vitscope: open_run(run).heads'] / med['pandas: read heads.parquet']:.2f}x")


if __name__ == "__main__":
    main()

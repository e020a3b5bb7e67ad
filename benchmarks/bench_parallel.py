#!/usr/bin/env python
"""Speed-up of ``vitscope analyze`` with N processes (torchrun, gloo, 1 thread each) over 1 process
(1 thread), and whether the two runs are equal.

Both runs analyse the same ``--images`` ImageNet-sample photos with DeiT-Tiny into fresh folders;
wall time is the whole command (model load, chunks, final steps). The chunks split across the
processes as they become free, and so do the costliest final steps (one pattern autoencoder per
rank, then groups of curve images); the rest of the final steps run on rank 0. The script also
reports each stage's time, from each run's manifest timings (rank 0's for the parallel run).

    .venv/bin/python benchmarks/bench_parallel.py [--images 200] [--nproc 2] [--out /tmp/bench-parallel]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def run(cmd: list[str], env: dict[str, str]) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, cwd=REPO, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("/tmp/bench-parallel"))
    args = ap.parse_args()
    bin_dir = Path(sys.executable).parent
    common = ["analyze", "-m", "deit_tiny_patch16_224", "-w", str(SHARED / "models" / "deit_tiny_patch16_224.safetensors"),
              "-i", str(SHARED / "data" / "imagenet-sample"), "-n", str(args.images), "--threads", "1", "-q"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    shutil.rmtree(args.out, ignore_errors=True)
    one, many = args.out / "one", args.out / f"nproc{args.nproc}"
    t1 = run([str(bin_dir / "vitscope"), *common, "-o", str(one)], env)
    tn = run([str(bin_dir / "torchrun"), "--standalone", f"--nproc-per-node={args.nproc}", "-m", "vitscope", *common, "-o", str(many)], env)
    cmp = subprocess.run([sys.executable, str(REPO / "scripts" / "compare_runs.py"), str(one), str(many)], capture_output=True, text=True)
    stage = {}
    for name, folder in (("1", one), (str(args.nproc), many)):
        timings = json.loads((folder / "manifest.json").read_text()).get("timings", {})
        stage[name] = timings
    print(f"{args.images} images, DeiT-Tiny, 1 thread per process")
    print(f"1 process: {t1:.1f} s; {args.nproc} processes: {tn:.1f} s; speed-up {t1 / tn:.2f}x")
    print("timings (manifest):", json.dumps(stage))
    print(cmp.stdout[-3000:])


if __name__ == "__main__":
    main()

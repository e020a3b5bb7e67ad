"""Cost of `vitscope analyze` on real DeiT-Tiny and the ImageNet sample.

Reports, for each image count:

- the whole analyze step in *forward-equivalents*: its wall time divided by the time of one plain
  forward pass (``ViT.logits``) over the same images at the same batch size (decoding excluded, so
  the denominator is the model alone); also per part (chunk work and final steps). The plain
  forward is timed right before and right after the analyze, in the same process, and the mean is
  used, so a change in machine load during a long run biases the ratio less;
- the peak resident memory (RSS) of the analyze process, and its ratio to the smallest count's.

Each image count runs in a fresh process, so imports and earlier runs do not leak into the peak
memory (the forward timing streams one batch at a time and stays far below the analyze's peak).
Usage::

    python benchmarks/bench_analyze.py --images 100 1000          # the targets: <= 35 FE, RSS ratio <= 1.3
    python benchmarks/bench_analyze.py --images 100 200 --threads 2

Needs ../shared (DeiT-Tiny weights and the ImageNet sample); set VITSCOPE_SHARED to point elsewhere.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("VITSCOPE_SHARED", REPO.parent / "shared"))
WEIGHTS = SHARED / "models" / "deit_tiny_patch16_224.safetensors"
IMAGES = SHARED / "data" / "imagenet-sample"
MODEL = "deit_tiny_patch16_224"


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def plain_forward(vit, images, batch_size: int) -> tuple[float, float]:
    """Seconds of one plain forward over ``images`` (decoding excluded), and of decoding them."""
    import torch

    from vitscope.data import iter_batches

    forward = decode = 0.0
    t = time.perf_counter()
    with torch.no_grad():
        for b in iter_batches(images, vit.preprocessing, batch_size=batch_size):
            decode += time.perf_counter() - t
            t = time.perf_counter()
            vit.logits(b.x)
            forward += time.perf_counter() - t
            t = time.perf_counter()
    return forward, decode


def child(n: int, batch_size: int, out: str) -> dict:
    """Plain forward, the whole analyze on the first ``n`` images, plain forward again."""
    import vitscope
    from vitscope.pipeline import AnalyzeSettings, analyze
    from vitscope.data import load_images

    vit = vitscope.load_model(MODEL, weights=WEIGHTS, device="cpu")
    images = load_images(IMAGES, limit=n)
    plain_forward(vit, images[:batch_size], batch_size)  # warm-up: the first batches pay one-off costs
    before, decode = plain_forward(vit, images, batch_size)
    t = time.perf_counter()
    run = analyze(vit, str(IMAGES), out, limit=n, settings=AnalyzeSettings(batch_size=batch_size), overwrite=True, progress=False)
    wall = time.perf_counter() - t
    peak = _peak_rss_mb()
    after, _ = plain_forward(vit, images, batch_size)
    return {"analyze_s": wall, "peak_rss_mb": peak, "timings": run.manifest.get("timings", {}), "forward_before_s": before,
            "forward_after_s": after, "forward_s": (before + after) / 2, "decode_s": decode, "analysed": run.manifest["counts"]["analysed"]}


def _spawn(args: list[str], threads: int | None) -> dict:
    cmd = [sys.executable, __file__, *args] + (["--threads", str(threads)] if threads else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"benchmark child failed: {' '.join(args)}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, nargs="+", default=[100, 1000], help="image counts to measure")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--out", type=Path, default=None, help="folder for the run folders (default: a temporary folder)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--run", type=str, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    if a.child:
        print(json.dumps(child(a.n, a.batch_size, a.run)))
        return

    if not WEIGHTS.exists() or not IMAGES.exists():
        raise SystemExit(f"needs {WEIGHTS} and {IMAGES}; set VITSCOPE_SHARED")
    out = a.out or Path(tempfile.mkdtemp(prefix="vitscope-bench-"))
    results = []
    for n in a.images:
        res = _spawn(["--child", "--n", str(n), "--batch-size", str(a.batch_size), "--run", str(out / f"run{n}")], a.threads)
        res["n"] = n
        results.append(res)
        fe = res["analyze_s"] / res["forward_s"]
        print(f"\n{n} images: analyze {res['analyze_s']:.1f} s, one forward {res['forward_s']:.2f} s "
              f"(before {res['forward_before_s']:.2f} s, after {res['forward_after_s']:.2f} s; decoding {res['decode_s']:.2f} s) "
              f"-> {fe:.1f} forward-equivalents; peak RSS {res['peak_rss_mb']:.0f} MB", flush=True)
        for part, secs in res["timings"].items():
            print(f"    {part:<16} {secs:8.1f} s  {secs / res['forward_s']:6.2f} FE")
    if len(results) > 1:
        lo, hi = results[0], results[-1]
        print(f"\npeak RSS {hi['n']} vs {lo['n']} images: {hi['peak_rss_mb']:.0f} / {lo['peak_rss_mb']:.0f} MB = "
              f"{hi['peak_rss_mb'] / lo['peak_rss_mb']:.2f}x")
    print(json.dumps(results))


if __name__ == "__main__":
    main()

"""Cost of `vitscope analyze` on real DeiT-Tiny and the ImageNet sample.

Reports, for each image count:

- the whole analyze step in *forward-equivalents*: its wall time divided by the time of one plain
  forward pass (``ViT.logits``) over the same images at the same batch size (images decoded
  beforehand, so the denominator is the model alone); also per part (chunk work and final steps);
- the peak resident memory (RSS) of the analyze process, and its ratio to the smallest count's.

Every measurement runs in a fresh process, so imports and earlier runs do not leak into the peak
memory. Usage::

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


def child_forward(n: int, batch_size: int) -> dict:
    """Time one plain forward over the first ``n`` images (decoding excluded)."""
    import torch

    import vitscope
    from vitscope.data import iter_batches, load_images

    vit = vitscope.load_model(MODEL, weights=WEIGHTS, device="cpu")
    images = load_images(IMAGES, limit=n)
    forward = decode = 0.0
    t = time.perf_counter()
    with torch.no_grad():
        for b in iter_batches(images, vit.preprocessing, batch_size=batch_size):
            decode += time.perf_counter() - t
            t = time.perf_counter()
            vit.logits(b.x)
            forward += time.perf_counter() - t
            t = time.perf_counter()
    return {"forward_s": forward, "decode_s": decode}


def child_analyze(n: int, batch_size: int, out: str) -> dict:
    """Run the whole analyze on the first ``n`` images; wall time, peak RSS and per-part timings."""
    from vitscope.analysis.run import AnalyzeSettings, analyze

    t = time.perf_counter()
    run = analyze(MODEL, str(IMAGES), out, weights=str(WEIGHTS), limit=n, settings=AnalyzeSettings(batch_size=batch_size),
                  overwrite=True, progress=False, device="cpu")
    wall = time.perf_counter() - t
    return {"analyze_s": wall, "peak_rss_mb": _peak_rss_mb(), "timings": run.manifest.get("timings", {}),
            "analysed": run.manifest["counts"]["analysed"]}


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
    ap.add_argument("--child", choices=["forward", "analyze"], help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--run", type=str, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    if a.child == "forward":
        print(json.dumps(child_forward(a.n, a.batch_size)))
        return
    if a.child == "analyze":
        print(json.dumps(child_analyze(a.n, a.batch_size, a.run)))
        return

    if not WEIGHTS.exists() or not IMAGES.exists():
        raise SystemExit(f"needs {WEIGHTS} and {IMAGES}; set VITSCOPE_SHARED")
    out = a.out or Path(tempfile.mkdtemp(prefix="vitscope-bench-"))
    results = []
    for n in a.images:
        fwd = _spawn(["--child", "forward", "--n", str(n), "--batch-size", str(a.batch_size)], a.threads)
        res = _spawn(["--child", "analyze", "--n", str(n), "--batch-size", str(a.batch_size), "--run", str(out / f"run{n}")], a.threads)
        res.update(fwd, n=n)
        results.append(res)
        fe = res["analyze_s"] / res["forward_s"]
        print(f"\n{n} images: analyze {res['analyze_s']:.1f} s, one forward {res['forward_s']:.2f} s "
              f"(decoding {res['decode_s']:.2f} s) -> {fe:.1f} forward-equivalents; peak RSS {res['peak_rss_mb']:.0f} MB")
        for part, secs in res["timings"].items():
            print(f"    {part:<16} {secs:8.1f} s  {secs / res['forward_s']:6.2f} FE")
    if len(results) > 1:
        lo, hi = results[0], results[-1]
        print(f"\npeak RSS {hi['n']} vs {lo['n']} images: {hi['peak_rss_mb']:.0f} / {lo['peak_rss_mb']:.0f} MB = "
              f"{hi['peak_rss_mb'] / lo['peak_rss_mb']:.2f}x")
    print(json.dumps(results))


if __name__ == "__main__":
    main()

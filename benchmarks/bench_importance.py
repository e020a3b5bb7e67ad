"""Benchmark of the head-importance measures on DeiT-Tiny and real ImageNet photos.

Run: ``.venv/bin/python benchmarks/bench_importance.py [--images 32] [--batch 32] [--threads N]``

Prints a markdown table with the time of one plain forward pass over the images, the naive
head sweep (one forward per head; a subset of heads is timed and scaled to all ``L * H``), the
sweep (default chunk, the other chunk size, and with ``shortcuts=False``), the Taylor importance
and partial pruning, each also in forward-equivalents (time / plain-forward time).

Running whole blocks from the pruned layer on has a floor of ``H * (L + 1) / 2 + 1``
forward-equivalents: the replicated batches run ``H * (L - l)`` blocks for layer ``l``, plus the
one unpruned pass. That is what ``shortcuts=False`` runs. The default sweep goes below it: the
pruned layer reuses its recorded attention and only its post-attention half runs, and for a CLS
readout the last block runs its keys and values plus the CLS row only (see ``head_sweep``).
"""

from __future__ import annotations

import argparse
import csv
import os
from pathlib import Path
from typing import Callable

import torch

import vitscope
from vitscope.analysis.importance import head_sweep, partial_pruning, taylor_importance

from timing import CLOCKS, interleaved  # noqa: E402  (benchmarks/timing.py)

SHARED = Path(os.environ.get("VITSCOPE_SHARED", Path(__file__).resolve().parents[2] / "shared"))


CLOCK: Callable[[], float] = CLOCKS["wall"]


def timed(fn: Callable[[], object], repeat: int) -> float:
    """Median time of ``repeat`` calls (after one warm-up call) on ``CLOCK``."""
    return interleaved({"fn": fn}, repeat, CLOCK)["fn"]




def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=32, help="number of ImageNet-sample photos (default 32)")
    ap.add_argument("--batch", type=int, default=32, help="batch size (default 32)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--naive-heads", type=int, default=6, help="heads timed for the naive loop, scaled to all heads")
    ap.add_argument("--repeat", type=int, default=3, help="repetitions of each batch-level measurement")
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--clock",
        choices=tuple(CLOCKS),
        default="wall",
        help="wall time, or this process's CPU time (steadier on a shared machine; use with --threads 1)",
    )
    args = ap.parse_args()
    global CLOCK
    CLOCK = CLOCKS[args.clock]
    if args.threads:
        torch.set_num_threads(args.threads)

    weights = SHARED / "models" / "deit_tiny_patch16_224.safetensors"
    sample = SHARED / "data" / "imagenet-sample"
    vit = vitscope.load_model("deit_tiny_patch16_224", weights=weights, device=args.device)
    rows = list(csv.DictReader(open(sample / "labels.csv")))[:: max(1, 1000 // args.images)][: args.images]
    x_all = vit.preprocess([sample / r["path"] for r in rows]).to(vit.device)
    y_all = torch.tensor([int(r["class_index"]) for r in rows], device=vit.device)
    batches = [(x_all[i : i + args.batch], y_all[i : i + args.batch]) for i in range(0, len(rows), args.batch)]
    L, H = vit.num_layers, vit.num_heads

    def sync() -> None:
        if vit.device.type == "cuda":
            torch.cuda.synchronize()

    def over_batches(fn: Callable[[torch.Tensor, torch.Tensor], object]) -> Callable[[], None]:
        def run() -> None:
            for x, y in batches:
                fn(x, y)
            sync()

        return run

    heads = [(l, h) for l in range(L) for h in range(H)]
    subset = heads[:: max(1, len(heads) // args.naive_heads)][: args.naive_heads]
    other_chunk = len(batches[0][0]) * H if vit.device.type == "cpu" else len(batches[0][0])
    t = interleaved(
        {
            "fwd": over_batches(lambda x, y: vit.logits(x)),
            "sweep": over_batches(lambda x, y: head_sweep(vit, x, y)),
            "sweep_other": over_batches(lambda x, y: head_sweep(vit, x, y, chunk=other_chunk)),
            "sweep_whole": over_batches(lambda x, y: head_sweep(vit, x, y, shortcuts=False)),
        },
        args.repeat,
        CLOCK,
    )
    t_fwd, t_sweep, t_sweep_other, t_whole = t["fwd"], t["sweep"], t["sweep_other"], t["sweep_whole"]
    t_subset = timed(over_batches(lambda x, y: [vit.logits(x, masks={lh: "all"}) for lh in subset]), 1)
    t_naive = t_fwd + t_subset * len(heads) / len(subset)
    t_taylor = timed(over_batches(lambda x, y: taylor_importance(vit, x, y)), args.repeat)
    floor = H * (L + 1) / 2 + 1

    one = x_all[0]
    t_pp = {layer: timed(lambda: partial_pruning(vit, one, layer, 0), 20) for layer in (0, L // 2, L - 1)}

    print(
        f"DeiT-Tiny ({L} layers x {H} heads), {len(rows)} images, batch {args.batch}, device {vit.device}, "
        f"{torch.get_num_threads()} CPU threads, {args.clock} clock\n"
    )
    print("| measure | time (s) | forward-equivalents |")
    print("| --- | ---: | ---: |")
    print(f"| plain forward | {t_fwd:.3f} | 1.0 |")
    print(f"| naive sweep ({L * H} masked forwards + 1; {len(subset)} timed, scaled) | {t_naive:.2f} | {t_naive / t_fwd:.1f} |")
    print(f"| head_sweep (default chunk) | {t_sweep:.2f} | {t_sweep / t_fwd:.1f} |")
    print(f"| head_sweep (chunk={other_chunk}) | {t_sweep_other:.2f} | {t_sweep_other / t_fwd:.1f} |")
    print(f"| head_sweep (shortcuts=False: whole blocks from the pruned layer on) | {t_whole:.2f} | {t_whole / t_fwd:.1f} |")
    print(f"| whole-block floor H(L+1)/2+1 | | {floor:.1f} |")
    print(f"| taylor_importance | {t_taylor:.3f} | {t_taylor / t_fwd:.1f} |")
    for layer, t in t_pp.items():
        print(f"| partial_pruning, 1 image, layer {layer} (median of 20) | {t * 1000:.0f} ms | |")
    print(
        f"\nsweep / whole-block floor = {t_sweep / t_fwd / floor:.2f}; whole blocks / sweep = {t_whole / t_sweep:.2f}x; "
        f"naive / sweep = {t_naive / t_sweep:.1f}x"
    )


if __name__ == "__main__":
    main()

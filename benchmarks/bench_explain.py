"""Faithfulness benchmark of the attention explanations on DeiT-Tiny and real ImageNet photos.

Run: ``nice .venv/bin/python benchmarks/bench_explain.py [--images 1000] [--batch 25] [--out results.json]``

With ``--sanity-check`` it runs Adebayo et al.'s cascading randomisation instead
(:func:`vitscope.analysis.faithfulness.randomisation_check`: blocks re-drawn from the top layer
down, Spearman correlation of each method's map with the trained model's), on ``--images``
photos (16 is plenty), and draws ``--figure``:
``nice .venv/bin/python benchmarks/bench_explain.py --sanity-check --images 16 --out randomisation.json``

Each image is explained for the class the model predicts, by every method of
:mod:`vitscope.analysis.explain`; then its patches are removed in the order of the map and the
model is run again:

- **Perturbation curves** (Chefer, Gur & Wolf, CVPR 2021 and ICCV 2021): remove 0, 10, ..., 90 %
  of the patches, *positive* = most relevant first (a faithful map makes the model fail fast: lower
  is better), *negative* = least relevant first (higher is better). Two forms of removal:
  ``tokens`` drops the patches' tokens (the model runs on the prefix tokens and the kept patch
  tokens only: embed, then index the sequence), ``pixels`` fills the patches' pixels with the
  image's per-channel mean. Curves of top-1 accuracy (against the true label) and of the explained
  class's probability; area under the curve over the removed fraction 0..0.9 (trapezoid), x 100, as
  in Chefer et al.'s evaluation.
- **Insertion / deletion** (Petsiuk, Das & Saenko, "RISE", BMVC 2018): the explained class's
  probability as patches (most relevant first, 10 % at a time, 0..100 %) are inserted into a
  Gaussian-blurred copy of the image (kernel 11, sigma 5, as in RISE's code) or deleted to the
  per-image mean; area under the curve over 0..1 (insertion: higher is better, deletion: lower).

The curves and their areas are :mod:`vitscope.analysis.faithfulness`'s (``perturbation_curves``,
``curve_auc``), the same functions ``vitscope analyze --explain-faithfulness`` stores per image.
Removal is by whole 16x16 patches (the unit every map scores; ``k = P * step // 10`` patches).
Intervals are 95 % percentile bootstraps over images (1000 resamples, paired across methods).
Each method's time is the median time of ``explain`` on one batch divided by the median time of a
plain forward of the same batch (forward-equivalents). Images are a seeded random order of the
1000-photo sample (one per class), so any ``--images N`` (or a run stopped by ``--max-minutes``)
is a random subset. Results are rewritten to ``--out`` after every batch, and every image's curves
to ``--state`` (default: ``--out`` with ``.npz``): rerunning the same command resumes after the last
finished batch (the timing is kept from the first run), so the 1000-image run (about 2 hours on 2
cores) may be stopped and continued at will.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

import vitscope
from vitscope.analysis.explain import METHODS, explain, explain_all
from vitscope.analysis.faithfulness import (
    METRICS,
    RANDOMISATION_METHODS,
    curve_auc,
    perturbation_curves,
    randomisation_check,
    randomisation_summary,
)
from vitscope.core.stats import bootstrap_means

from timing import CLOCKS, interleaved  # noqa: E402  (benchmarks/timing.py)

SHARED = Path(os.environ.get("VITSCOPE_SHARED", Path(__file__).resolve().parents[2] / "shared"))


def auc(curves: np.ndarray, name: str) -> np.ndarray:
    """Per-image area under each curve (:func:`vitscope.analysis.faithfulness.curve_auc`)."""
    return curve_auc(curves, name)


CLOCK: Callable[[], float] = CLOCKS["wall"]


def summarize(per_image: dict[str, dict[str, list[np.ndarray]]], methods, timing, meta) -> dict:
    names = list(METRICS)
    aucs = {m: {k: auc(np.concatenate(per_image[m][k]), k) for k in names} for m in methods}
    N = len(next(iter(aucs[methods[0]].values())))
    # one bootstrap over images for every (method, metric) column: paired intervals
    cols = np.stack([aucs[m][k] for m in methods for k in names], axis=1)
    lo, hi = bootstrap_means(cols, n_boot=1000, seed=0)
    res: dict = {**meta, "images": N, "metrics": {k: {"what": d, "better": b} for k, (d, b) in METRICS.items()}, "methods": {}}
    j = 0
    for m in methods:
        entry: dict = {"auc": {}, "curves": {}}
        for k in names:
            entry["auc"][k] = {"mean": float(aucs[m][k].mean()), "lo": float(lo[j]), "hi": float(hi[j])}
            entry["curves"][k] = np.concatenate(per_image[m][k]).mean(0).round(5).tolist()
            j += 1
        if timing:
            entry["time_forward_equivalents"] = timing[m]
        res["methods"][m] = entry
    return res


def table(res: dict, methods) -> str:
    def cell(m, k):
        a = res["methods"][m]["auc"][k]
        digits = 3 if k in ("insertion", "deletion") else 1
        return f"{a['mean']:.{digits}f} [{a['lo']:.{digits}f}, {a['hi']:.{digits}f}]"

    out = []
    groups = [
        ("Top-1 accuracy AUC (x100, removed 0..90 %)", ["tokens_pos_acc", "tokens_neg_acc", "pixels_pos_acc", "pixels_neg_acc"]),
        ("Target probability AUC (x100, removed 0..90 %)", ["tokens_pos_prob", "tokens_neg_prob", "pixels_pos_prob", "pixels_neg_prob"]),
    ]
    heads = {
        "tokens_pos_acc": "tokens, positive ↓", "tokens_neg_acc": "tokens, negative ↑",
        "pixels_pos_acc": "pixels, positive ↓", "pixels_neg_acc": "pixels, negative ↑",
        "tokens_pos_prob": "tokens, positive ↓", "tokens_neg_prob": "tokens, negative ↑",
        "pixels_pos_prob": "pixels, positive ↓", "pixels_neg_prob": "pixels, negative ↑",
    }
    for title, keys in groups:
        out.append(f"{title}\n")
        out.append("| method | " + " | ".join(heads[k] for k in keys) + " |")
        out.append("|---|" + "---|" * len(keys))
        for m in methods:
            out.append(f"| {m} | " + " | ".join(cell(m, k) for k in keys) + " |")
        out.append("")
    out.append("Insertion / deletion (RISE, target probability AUC over 0..100 %) and time\n")
    out.append("| method | insertion ↑ | deletion ↓ | time (forward-equivalents) |")
    out.append("|---|---|---|---|")
    for m in methods:
        t = res["methods"][m].get("time_forward_equivalents")
        out.append(f"| {m} | {cell(m, 'insertion')} | {cell(m, 'deletion')} | {'' if t is None else f'{t:.2f}'} |")
    return "\n".join(out)


def save_state(state: Path, per_image, top1, methods, done_rows: list[dict], timing, meta) -> None:
    """Every finished image's curves, written beside the results (atomically: a stopped run never
    leaves a half-written state)."""
    arrays = {f"{m}/{k}": np.concatenate(v) for m in methods for k, v in per_image[m].items() if v}
    arrays["top1"] = np.concatenate(top1)
    info = {"methods": methods, "paths": [r["path"] for r in done_rows], "timing": timing, "meta": meta}
    tmp = state.with_name(state.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, info=np.array(json.dumps(info)), **arrays)
    os.replace(tmp, state)


def load_state(state: Path, per_image, top1, methods, rows: list[dict], batch: int):
    """Reload :func:`save_state`'s curves into ``per_image`` and ``top1``; returns (images done,
    timing, meta). Refuses a state of other methods or another image order."""
    with np.load(state) as z:
        info = json.loads(str(z["info"]))
        if info["methods"] != methods:
            raise SystemExit(f"{state} holds methods {info['methods']}, not {methods}: pass --fresh or another --state")
        done = len(info["paths"])
        if [r["path"] for r in rows[:done]] != info["paths"]:
            raise SystemExit(f"{state} holds other images than this command's first {done}: pass --fresh or another --state")
        if done % batch and done < len(rows):
            raise SystemExit(f"{state} holds {done} images, not a multiple of --batch {batch}: resume with its batch size")
        for m in methods:
            for k in per_image[m]:
                if f"{m}/{k}" in z:
                    per_image[m][k].append(z[f"{m}/{k}"])
        top1.append(z["top1"])
    return done, info["timing"], info["meta"]


def sanity_check(vit, sample: Path, rows: list[dict], args: argparse.Namespace) -> None:
    """Cascading randomisation on ``rows``' photos: the per-image table, its summary (JSON at
    ``--out``), a printed table and the figure at ``--figure``."""
    import pandas as pd

    from vitscope.figures.explain import plot_randomisation

    started = time.perf_counter()
    parts = []
    top1 = []
    for start in range(0, len(rows), args.batch):
        part = rows[start : start + args.batch]
        x = vit.preprocess([sample / r["path"] for r in part]).to(vit.device)
        label = torch.tensor([int(r["class_index"]) for r in part], device=vit.device)
        with torch.no_grad():
            target = vit.logits(x).argmax(-1)
        top1.append((target == label).cpu().numpy())
        t = randomisation_check(vit, x, RANDOMISATION_METHODS, target=target, seed=0)
        t["image"] += start
        parts.append(t)
        print(f"{start + len(part)}/{len(rows)} images, {time.perf_counter() - started:.0f} s", flush=True)
    table = pd.concat(parts, ignore_index=True)
    summary = randomisation_summary(table)
    L = vit.num_layers
    res = {
        "model": "deit_tiny_patch16_224",
        "images": len(rows),
        "top1": float(np.concatenate(top1).mean()),
        "target": "predicted class of the trained model, at every step",
        "randomisation": "each parameter tensor of a block re-drawn from a normal with the tensor's own mean and std (seed 0)",
        "wall_s": round(time.perf_counter() - started, 1),
        "summary": summary.round(4).to_dict(orient="records"),
    }
    Path(args.out).write_text(json.dumps(res, indent=1))
    fig = plot_randomisation(summary, title=f"DeiT-Tiny, {len(rows)} ImageNet-sample photos (mean +- s.e.)")
    Path(args.figure).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.figure, dpi=120)
    steps = [k for k in (0, 1, 2, 3, 6, 9, L) if k <= L]
    for col in ("spearman", "spearman_abs"):
        print(f"\n{col}: mean over images (s.e.) by number of top blocks re-drawn\n")
        print("| method | " + " | ".join(str(k) for k in steps) + " |")
        print("|---|" + "---:|" * len(steps))
        for method, g in summary.groupby("method", sort=False):
            g = g.set_index("randomised")
            cells = [f"{g.loc[k, f'{col}_mean']:.2f} ({g.loc[k, f'{col}_sem']:.2f})" if k else "1" for k in steps]
            print(f"| {method} | " + " | ".join(cells) + " |")
    print(f"\nwrote {args.out} and {args.figure}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1000, help="number of ImageNet-sample photos (default 1000, all)")
    ap.add_argument("--batch", type=int, default=25, help="images explained and perturbed together (default 25)")
    ap.add_argument("--chunk", type=int, default=256, help="largest batch of one forward pass (default 256)")
    ap.add_argument("--out", default="results.json", help="where the results are written (JSON)")
    ap.add_argument(
        "--max-minutes", type=float, default=None, help="stop before a batch that would end past this wall time (from start)"
    )
    ap.add_argument(
        "--state",
        default=None,
        help="per-image curves, for resuming (default: --out with the suffix .npz); --fresh ignores it",
    )
    ap.add_argument("--fresh", action="store_true", help="start over instead of resuming from --state")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--repeat", type=int, default=3, help="timing rounds (on the first batch)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--clock",
        choices=tuple(CLOCKS),
        default="wall",
        help="time with wall time, or this process's CPU time (steadier on a shared machine)",
    )
    ap.add_argument("--timing-only", action="store_true", help="measure the times on the first batch and stop")
    ap.add_argument(
        "--methods", default=",".join(METHODS), help=f"comma-separated explanation methods (default: all, {','.join(METHODS)})"
    )
    ap.add_argument(
        "--sanity-check",
        action="store_true",
        help="run the cascading-randomisation sanity check (Adebayo et al. 2018) on --images photos instead",
    )
    ap.add_argument(
        "--figure",
        default=str(Path(__file__).resolve().parents[1] / "docs" / "figures" / "explain_randomisation.png"),
        help="where --sanity-check draws its figure (PNG)",
    )
    args = ap.parse_args()
    global CLOCK
    CLOCK = CLOCKS[args.clock]
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()

    weights = SHARED / "models" / "deit_tiny_patch16_224.safetensors"
    sample = SHARED / "data" / "imagenet-sample"
    vit = vitscope.load_model("deit_tiny_patch16_224", weights=weights, device=args.device)
    rows = list(csv.DictReader(open(sample / "labels.csv")))
    perm = np.random.default_rng(0).permutation(len(rows))[: args.images]
    rows = [rows[i] for i in perm]
    if args.sanity_check:
        sanity_check(vit, sample, rows, args)
        return
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise SystemExit(f"--methods: unknown method(s) {bad}; choose from {', '.join(METHODS)}")
    per_image: dict[str, dict[str, list[np.ndarray]]] = {m: {k: [] for k in METRICS} for m in methods}
    timing: dict[str, float] = {}
    top1: list[np.ndarray] = []
    meta = {
        "model": "deit_tiny_patch16_224",
        "command": "benchmarks/bench_explain.py " + " ".join(
            f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}") for k, v in vars(args).items() if v not in (None, False)
        ),
        "threads": torch.get_num_threads(),
        "explain_options": "defaults (head_fusion='mean', discard_ratio=0, head=None, seed=0); target = predicted class",
    }
    state = Path(args.state) if args.state else Path(args.out).with_suffix(".npz")
    resumed = 0
    if state.exists() and not args.fresh:
        resumed, timing, saved_meta = load_state(state, per_image, top1, methods, rows, args.batch)
        meta.update({k: v for k, v in saved_meta.items() if k not in ("command", "threads")})
        print(f"resuming from {state}: {resumed} images done", flush=True)
    res: dict = {}
    last = 0.0
    for start in range(resumed, len(rows), args.batch):
        if res and args.max_minutes is not None and time.perf_counter() - started + last > 60 * args.max_minutes:
            print(f"stopping: the next batch would end past --max-minutes {args.max_minutes}", flush=True)
            break
        t_batch = time.perf_counter()
        part = rows[start : start + args.batch]
        x = vit.preprocess([sample / r["path"] for r in part]).to(vit.device)
        label = torch.tensor([int(r["class_index"]) for r in part], device=vit.device)
        if not timing:
            fns: dict[str, Callable[[], object]] = {"forward": lambda: vit.logits(x)}
            for m in methods:
                fns[m] = lambda m=m: explain(vit, x, m)
            t = interleaved(fns, args.repeat, CLOCK)
            timing = {m: t[m] / t["forward"] for m in methods}
            meta["forward_ms_per_image"] = 1000 * t["forward"] / x.shape[0]
            meta["timing_batch"] = x.shape[0]
            meta["timing_clock"] = args.clock
            if args.timing_only:
                print(f"plain forward {meta['forward_ms_per_image']:.1f} ms/image ({args.clock} clock, batch {x.shape[0]})")
                for m in methods:
                    print(f"{m}: {timing[m]:.2f} forward-equivalents")
                Path(args.out).write_text(json.dumps({**meta, "time_forward_equivalents": timing}, indent=1))
                return
        with torch.no_grad():
            # the prediction exactly as the curves' unperturbed point computes it
            target = vit.readout(vit.run_blocks(vit.embed(x))).argmax(-1)
        top1.append((target == label).cpu().numpy())
        maps = explain_all(vit, x, methods, target=target)
        for m, curves in perturbation_curves(vit, x, maps, target, label, chunk=args.chunk).items():
            for k, v in curves.items():
                per_image[m][k].append(v)
        elapsed = time.perf_counter() - started
        meta["top1"] = float(np.concatenate(top1).mean())
        meta["wall_s"] = round(elapsed, 1)
        res = summarize(per_image, methods, timing, meta)
        done = start + len(part)
        save_state(state, per_image, top1, methods, rows[:done], timing, meta)
        Path(args.out).write_text(json.dumps(res, indent=1))
        print(f"{done}/{len(rows)} images, {elapsed:.0f} s", flush=True)
        last = time.perf_counter() - t_batch
    if not res:
        if not any(per_image[methods[0]].values()):
            raise SystemExit("no batch finished: raise --max-minutes")
        res = summarize(per_image, methods, timing, meta)
        Path(args.out).write_text(json.dumps(res, indent=1))
    print(f"\n{res['images']} images, DeiT-Tiny top-1 {100 * res['top1']:.1f} %, plain forward {res['forward_ms_per_image']:.1f} ms/image\n")
    print(table(res, methods))


if __name__ == "__main__":
    main()

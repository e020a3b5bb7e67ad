"""Patch interactions on DeiT-Tiny and the ImageNet sample: cost, estimate quality, fields, windows, removal.

1. Cost: time of the all-edges first-order estimate (one forward + backward, every layer) over the
   time of one plain fused forward of the same batch (goal: at most 4). Repetitions are
   interleaved; medians are reported.
2. Estimate quality: Spearman correlation, per layer, between the first-order estimate and exact
   knock-outs for a few random query patches (and the CLS query) on a few images.
3. Responsive fields over the "fit" images (mean impact, one-sided t-test, BH q = 0.05 per layer).
4. Window design and 5. patch removal, evaluated on "eval" images disjoint from the fit images
   (the dataset-level indicator windows and rankings come from the fit images).

The images are a seeded random permutation of the sample, so fit and eval sets mix classes.

    .venv/bin/python benchmarks/bench_interaction.py [--batch 32] [--fit 64] [--limit 128]
        [--knockout-images 4] [--queries 3] [--keys 49] [--skip windows,removal]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import vitscope
from vitscope.analysis import fields as fld
from vitscope.analysis import interaction as it
from vitscope.analysis import windows as win
from vitscope.data import iter_batches, load_images

SHARED = Path(__file__).resolve().parents[2] / "shared"
WEIGHTS = SHARED / "models" / "deit_tiny_patch16_224.safetensors"
SAMPLE = SHARED / "data" / "imagenet-sample"


def table(df: pd.DataFrame, floatfmt: str = ".3f") -> str:
    cols = list(df.columns)
    out = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in df.itertuples(index=False):
        cells = []
        for v in r:
            cells.append(format(v, floatfmt) if isinstance(v, (float, np.floating)) else str(v))
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--fit", type=int, default=64, help="images for the dataset-level impacts (cost is timed on the first batch)")
    ap.add_argument("--limit", type=int, default=128, help="evaluation images for the window and removal curves")
    ap.add_argument("--knockout-images", type=int, default=4)
    ap.add_argument("--queries", type=int, default=3, help="random patch queries per layer (plus CLS)")
    ap.add_argument("--keys", type=int, default=49, help="random keys per layer for the knock-outs (0: all patches)")
    ap.add_argument("--ks", default="1,3,5,7,9,13,19,27", help="window sides")
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: cost,agreement,fields,windows,removal")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    ap.add_argument("--weights", default=str(WEIGHTS))
    ap.add_argument("--images", default=str(SAMPLE))
    args = ap.parse_args()
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    if not Path(args.weights).exists():
        sys.exit(f"DeiT-Tiny weights not found at {args.weights}; pass --weights")
    if args.threads:
        torch.set_num_threads(args.threads)
    vit = vitscope.load_model("deit_tiny_patch16_224", weights=args.weights, device="cpu")
    images = load_images(args.images, class_names=vit.class_names)
    order = np.random.default_rng(args.seed).permutation(len(images))
    records = [images[int(i)] for i in order]
    fit_recs = records[: args.fit]
    eval_recs = records[args.fit : args.fit + args.limit]
    print(f"# Patch interactions: {vit.name}, torch threads {torch.get_num_threads()}, {len(fit_recs)} fit / {len(eval_recs)} eval images\n")

    fit_batches = list(iter_batches(fit_recs, vit.preprocessing, batch_size=args.batch))
    x0, y0 = fit_batches[0].x, fit_batches[0].labels

    if "cost" not in skip:
        times: dict[str, list[float]] = {"plain forward": [], "first-order, all edges": []}
        vit.logits(x0)
        for _ in range(args.reps):
            t = time.perf_counter()
            vit.logits(x0)
            times["plain forward"].append(time.perf_counter() - t)
            t = time.perf_counter()
            it.first_order_impact(vit, x0, y0)
            times["first-order, all edges"].append(time.perf_counter() - t)
        base = statistics.median(times["plain forward"])
        rows = [{"what": k, "median_s": statistics.median(v), "forward_equivalents": statistics.median(v) / base} for k, v in times.items()]
        print(f"## Cost (batch {x0.shape[0]}, {args.reps} interleaved repetitions)\n")
        print(table(pd.DataFrame(rows), ".2f"), "\n")

    acc = it.InteractionAccumulator.for_model(vit)
    facc = fld.FieldAccumulator(vit.num_layers, vit.layout)
    t = time.perf_counter()
    first = None
    for b in fit_batches:
        r = it.first_order_impact(vit, b.x, b.labels)
        first = first if first is not None else r
        acc.update(r)
        facc.update(r["impact"])
    fit_s = time.perf_counter() - t
    summary = acc.summary(q=0.05)
    fsum = facc.summary(q=0.05)

    if "agreement" not in skip:
        n = args.knockout_images
        t = time.perf_counter()
        est = {k: (v[:n] if k not in ("layers",) else v) for k, v in first.items()}
        df = it.knockout_agreement(
            vit, x0[:n], queries_per_layer=args.queries, keys=(args.keys or None), estimate=est, seed=args.seed
        )
        s = it.agreement_summary(df)
        keys = args.keys or vit.layout.num_patches
        print(
            f"## First-order estimate vs exact knock-out ({n} images x ({args.queries} patch queries + CLS) x {keys} keys "
            f"per layer, {time.perf_counter() - t:.0f} s)\n"
        )
        wide = s.pivot(index="layer", columns="query_kind", values=["spearman_mean", "spearman_sem", "top10_overlap"])
        wide.columns = [f"{a}_{b}" for a, b in wide.columns]
        print(table(wide.reset_index()), "\n")
        pk = df[df["query_kind"] == "patch"].dropna(subset=["spearman"])
        print(
            f"Overall Spearman: patch queries mean {pk['spearman'].mean():.3f} (median {pk['spearman'].median():.3f}, "
            f"n={len(pk)}); CLS queries mean {df[df['query_kind'] == 'cls']['spearman'].mean():.3f}. "
            "Patch queries of the last layer have exactly zero impact (only CLS is read out).\n"
        )

    if "fields" not in skip:
        print(f"## Responsive fields over {acc.count} fit images ({fit_s:.0f} s for the estimates)\n")
        lt = it.interaction_layer_table(summary, vit.layout)
        member, stats = fld.responsive_fields(summary, vit.layout)
        fs = fld.field_layer_summary(stats, vit.layout)
        print("Edge level (one-sided t-test of mean impact > 0, BH q = 0.05 per layer):\n")
        cols = ["layer", "n_significant", "mean_impact", "mean_abs_impact", "self_impact", "max_impact"]
        merged = lt[cols].merge(fs[["layer", "frac_nonempty", "size_mean"]], on="layer")
        print(table(merged, ".3g"), "\n")
        tmax = np.nanmax(summary["t"].reshape(vit.num_layers, -1), axis=1)
        print("Largest t per layer:", ", ".join(f"{v:.2f}" for v in tmax), "\n")
        print("Per-image fields (50 % of each row's positive impact) summarised over the set:\n")
        fl = fld.field_layer_summary(fsum, vit.layout)
        fl["arrows_significant"] = fsum["arrow_significant"].mean(axis=1)
        with np.errstate(invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # the last layer has no fields: all-NaN rows
            fl["image_coherence"] = np.nanmean(fsum["coherence"], axis=1)
        cols = [
            "layer", "size_mean", "extent_mean", "extent_uniform", "spread_mean", "offset_mean",
            "arrows_significant", "image_coherence", "coherence", "toward_centre", "offset_uniform",
        ]  # fmt: skip
        print(table(fl[cols]), "\n")

    eval_batches = None
    if eval_recs and not {"windows", "removal"} <= skip:
        eval_batches = list(iter_batches(eval_recs, vit.preprocessing, batch_size=args.batch))
    if eval_batches and "windows" not in skip:
        t = time.perf_counter()
        ks = [int(k) for k in args.ks.split(",")]
        scores = {"indicator_abs": summary["abs_mean"], "field_frequency": fsum["frequency"]}
        methods = ("window", "indicator", "indicator_pooled", "indicator_abs", "field_frequency", "random")
        wc = win.window_curve(vit, eval_batches, summary["mean"], ks=ks, methods=methods, scores=scores)
        print(f"## Window design on {int(wc['n_images'].iloc[0])} eval images ({time.perf_counter() - t:.0f} s)\n")
        full = wc[wc["method"] == "full"]
        wide = wc[wc["method"] != "full"].pivot(index=["k", "keys_per_query"], columns="method", values="accuracy").reset_index()
        print(table(wide))
        print(f"\nFull attention: accuracy {float(full['accuracy'].iloc[0]):.3f}\n")
    if eval_batches and "removal" not in skip:
        t = time.perf_counter()
        rc = win.removal_curve(vit, eval_batches, seeds=(0, 1, 2), dataset_scores=summary["key_importance_mean"])
        rs = win.removal_summary(rc)
        print(f"## Patch removal on {int(rc['n_images'].iloc[0])} eval images ({time.perf_counter() - t:.0f} s)\n")
        wide = rs.pivot(index="rate", columns="method", values="accuracy").reset_index()
        sd = rs[rs["method"] == "random"].set_index("rate")["accuracy_std"]
        wide["random_std"] = wide["rate"].map(sd)
        print(table(wide), "\n")


if __name__ == "__main__":
    main()

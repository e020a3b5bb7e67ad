"""Faithfulness benchmark of the attention explanations on DeiT-Tiny and real ImageNet photos.

Run: ``nice .venv/bin/python benchmarks/bench_explain.py [--images 1000] [--batch 25] [--out results.json]``

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

Removal is by whole 16x16 patches (the unit every map scores; ``k = P * step // 10`` patches).
Intervals are 95 % percentile bootstraps over images (1000 resamples, paired across methods).
Each method's time is the median time of ``explain`` on one batch divided by the median time of a
plain forward of the same batch (forward-equivalents). Images are a seeded random order of the
1000-photo sample (one per class), so any ``--images N`` (or a run stopped by ``--max-minutes``)
is a random subset. Results are rewritten to ``--out`` after every batch.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

import vitscope
from vitscope.analysis.explain import METHODS, explain, explain_all
from vitscope.core.stats import bootstrap_means

SHARED = Path(os.environ.get("VITSCOPE_SHARED", Path(__file__).resolve().parents[2] / "shared"))
CHEFER_STEPS = 10  # 0, 10, ..., 90 % removed
RISE_STEPS = 11  # 0, 10, ..., 100 %

#: metric -> (description, which direction is better)
METRICS: dict[str, tuple[str, str]] = {
    "tokens_pos_acc": ("drop tokens, most relevant first: top-1 accuracy AUC", "lower"),
    "tokens_neg_acc": ("drop tokens, least relevant first: top-1 accuracy AUC", "higher"),
    "tokens_pos_prob": ("drop tokens, most relevant first: target probability AUC", "lower"),
    "tokens_neg_prob": ("drop tokens, least relevant first: target probability AUC", "higher"),
    "pixels_pos_acc": ("mean-fill pixels, most relevant first: top-1 accuracy AUC", "lower"),
    "pixels_neg_acc": ("mean-fill pixels, least relevant first: top-1 accuracy AUC", "higher"),
    "pixels_pos_prob": ("mean-fill pixels, most relevant first: target probability AUC", "lower"),
    "pixels_neg_prob": ("mean-fill pixels, least relevant first: target probability AUC", "higher"),
    "insertion": ("insertion into the blurred image: target probability AUC (RISE)", "higher"),
    "deletion": ("deletion to the mean: target probability AUC (RISE)", "lower"),
}


def gaussian_blur(x: torch.Tensor, size: int = 11, sigma: float = 5.0) -> torch.Tensor:
    """Separable Gaussian blur per channel, reflect-padded (so it commutes with the per-channel
    normalisation: blurring the normalised input equals normalising the blurred photo)."""
    r = torch.arange(size, dtype=x.dtype, device=x.device) - (size - 1) / 2
    k = torch.exp(-(r**2) / (2 * sigma**2))
    k = k / k.sum()
    C = x.shape[1]
    pad = size // 2
    y = F.conv2d(F.pad(x, (pad, pad, 0, 0), mode="reflect"), k.view(1, 1, 1, size).expand(C, 1, 1, size), groups=C)
    return F.conv2d(F.pad(y, (0, 0, pad, pad), mode="reflect"), k.view(1, 1, size, 1).expand(C, 1, size, 1), groups=C)


class Runner:
    """The model's forward passes the benchmark needs, in chunks."""

    def __init__(self, vit, chunk: int) -> None:
        self.vit = vit
        self.chunk = chunk

    @torch.no_grad()
    def probs(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.vit.logits(x[i : i + self.chunk]).softmax(-1) for i in range(0, x.shape[0], self.chunk)])

    @torch.no_grad()
    def probs_tokens(self, h: torch.Tensor) -> torch.Tensor:
        """Run the blocks and the head on token sequences ``h`` (already embedded)."""
        vit = self.vit
        return torch.cat(
            [vit.readout(vit.run_blocks(h[i : i + self.chunk])).softmax(-1) for i in range(0, h.shape[0], self.chunk)]
        )


def curves_for(runner: Runner, x, h, maps, target, label, mean_img, blurred, p_orig, p_mean, p_blur) -> dict[str, np.ndarray]:
    """Every curve of one method for one batch: ``{name: (B, steps)}`` (accuracy as 0/1)."""
    vit = runner.vit
    layout = vit.layout
    B = x.shape[0]
    P = layout.num_patches
    rows, cols = layout.grid
    ph, pw = layout.patch_size
    order = torch.argsort(maps.reshape(B, P), dim=1, descending=True, stable=True)  # most relevant first
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(P, device=order.device).expand(B, P))
    ar = torch.arange(B, device=x.device)

    def at_target(p: torch.Tensor) -> torch.Tensor:  # (S*B, C) -> (S, B) probability of the target
        return p.view(-1, B, p.shape[-1])[:, ar, target]

    def correct(p: torch.Tensor) -> torch.Tensor:
        return (p.view(-1, B, p.shape[-1]).argmax(-1) == label).float()

    n = [P * k // 10 for k in range(RISE_STEPS)]
    # (a) tokens: per step one sequence length, positive and negative in one batch
    prefix = h[:, : layout.num_prefix]
    patches = h[:, layout.patch_slice]
    tok_prob = {"pos": [at_target(p_orig)[0]], "neg": [at_target(p_orig)[0]]}
    tok_acc = {"pos": [correct(p_orig)[0]], "neg": [correct(p_orig)[0]]}
    for k in range(1, CHEFER_STEPS):
        keep_pos = order[:, n[k] :]  # most relevant removed
        keep_neg = order[:, : P - n[k]]  # least relevant removed
        seqs = []
        for keep in (keep_pos, keep_neg):
            kept = torch.gather(patches, 1, keep[:, :, None].expand(-1, -1, patches.shape[-1]))
            seqs.append(torch.cat([prefix, kept], dim=1))
        p = runner.probs_tokens(torch.cat(seqs))
        for j, side in enumerate(("pos", "neg")):
            tok_prob[side].append(at_target(p)[j])
            tok_acc[side].append(correct(p)[j])
    # (b) pixels: positive and negative mean-fill and insertion, all steps in one stacked batch
    masks = []  # (S, B, P) True = removed (or, for insertion, inserted)
    for k in range(1, CHEFER_STEPS):
        masks.append(rank < n[k])
    for k in range(1, CHEFER_STEPS):
        masks.append(rank >= P - n[k])
    m = torch.stack(masks).view(-1, B, rows, cols)
    pix = m.repeat_interleave(ph, dim=2).repeat_interleave(pw, dim=3)[:, :, None]  # (S, B, 1, H, W)
    filled = torch.where(pix, mean_img[None], x[None])  # removed -> mean
    inserted = torch.where(pix[: CHEFER_STEPS - 1], x[None], blurred[None])  # most relevant inserted
    p = runner.probs(torch.cat([filled, inserted]).flatten(0, 1))
    S = CHEFER_STEPS - 1
    prob, acc = at_target(p), correct(p)
    p0, a0 = at_target(p_orig)[0], correct(p_orig)[0]
    out = {
        "tokens_pos_acc": torch.stack(tok_acc["pos"], 1),
        "tokens_neg_acc": torch.stack(tok_acc["neg"], 1),
        "tokens_pos_prob": torch.stack(tok_prob["pos"], 1),
        "tokens_neg_prob": torch.stack(tok_prob["neg"], 1),
        "pixels_pos_acc": torch.cat([a0[:, None], acc[:S].T], 1),
        "pixels_neg_acc": torch.cat([a0[:, None], acc[S : 2 * S].T], 1),
        "pixels_pos_prob": torch.cat([p0[:, None], prob[:S].T], 1),
        "pixels_neg_prob": torch.cat([p0[:, None], prob[S : 2 * S].T], 1),
        # RISE: 0..100 %; deletion shares the positive mean-fill passes
        "deletion": torch.cat([p0[:, None], prob[:S].T, at_target(p_mean)[0][:, None]], 1),
        "insertion": torch.cat([at_target(p_blur)[0][:, None], prob[2 * S : 3 * S].T, p0[:, None]], 1),
    }
    return {k: v.cpu().numpy() for k, v in out.items()}


def auc(curves: np.ndarray, name: str) -> np.ndarray:
    """Per-image area under each curve: Chefer's x 100 over 0..0.9, RISE's over 0..1."""
    if name in ("insertion", "deletion"):
        return np.trapezoid(curves, dx=1.0 / (RISE_STEPS - 1), axis=1)
    return 100.0 * np.trapezoid(curves, dx=0.1, axis=1)


CLOCK: Callable[[], float] = time.perf_counter


def interleaved(fns: dict[str, Callable[[], object]], repeat: int) -> dict[str, float]:
    """Median time of each function over ``repeat`` rounds that call every function once (after a
    warm-up round); interleaving keeps slow phases of a shared machine from favouring one."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            t = CLOCK()
            fn()
            times[name].append(CLOCK() - t)
    return {name: statistics.median(v) for name, v in times.items()}


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1000, help="number of ImageNet-sample photos (default 1000, all)")
    ap.add_argument("--batch", type=int, default=25, help="images explained and perturbed together (default 25)")
    ap.add_argument("--chunk", type=int, default=256, help="largest batch of one forward pass (default 256)")
    ap.add_argument("--out", default="results.json", help="where the results are written (JSON)")
    ap.add_argument(
        "--max-minutes", type=float, default=None, help="stop before a batch that would end past this wall time (from start)"
    )
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--repeat", type=int, default=3, help="timing rounds (on the first batch)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="time with wall time, or this process's CPU time (steadier on a shared machine)",
    )
    ap.add_argument("--timing-only", action="store_true", help="measure the times on the first batch and stop")
    args = ap.parse_args()
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()

    weights = SHARED / "models" / "deit_tiny_patch16_224.safetensors"
    sample = SHARED / "data" / "imagenet-sample"
    vit = vitscope.load_model("deit_tiny_patch16_224", weights=weights, device=args.device)
    rows = list(csv.DictReader(open(sample / "labels.csv")))
    perm = np.random.default_rng(0).permutation(len(rows))[: args.images]
    rows = [rows[i] for i in perm]
    methods = list(METHODS)
    runner = Runner(vit, args.chunk)
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
    res: dict = {}
    last = 0.0
    for start in range(0, len(rows), args.batch):
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
            t = interleaved(fns, args.repeat)
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
            h = vit.embed(x)
            p_orig = runner.probs_tokens(h)
            target = p_orig.argmax(-1)
            mean_img = x.mean(dim=(2, 3), keepdim=True).expand_as(x)
            blurred = gaussian_blur(x)
            p_mean = runner.probs(mean_img.contiguous())
            p_blur = runner.probs(blurred)
        top1.append((target == label).cpu().numpy())
        maps = explain_all(vit, x, methods, target=target)
        for m in methods:
            for k, v in curves_for(runner, x, h, maps[m], target, label, mean_img, blurred, p_orig, p_mean, p_blur).items():
                per_image[m][k].append(v)
        elapsed = time.perf_counter() - started
        meta["top1"] = float(np.concatenate(top1).mean())
        meta["wall_s"] = round(elapsed, 1)
        res = summarize(per_image, methods, timing, meta)
        Path(args.out).write_text(json.dumps(res, indent=1))
        done = start + len(part)
        print(f"{done}/{len(rows)} images, {elapsed:.0f} s", flush=True)
        last = time.perf_counter() - t_batch
    print(f"\n{res['images']} images, DeiT-Tiny top-1 {100 * res['top1']:.1f} %, plain forward {res['forward_ms_per_image']:.1f} ms/image\n")
    print(table(res, methods))


if __name__ == "__main__":
    main()

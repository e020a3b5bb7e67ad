"""WinfT experiment on Fashion-MNIST: plain ViT vs fixed local windows vs WinfT, same size, recipe and budget.

Usage::

    python -m vitscope.experiments.winft --seeds 0 1 2 --epochs 3 --train-limit 15000 --threads 1 --out runs/winft-exp

Steps (every step is resumable: finished runs are skipped, interrupted ones continue from their checkpoint):

1. **Masks.** The reference model (default: the built-in ``fmnist_vit_tiny``) is run over
   ``--field-images`` *training* images; the first-order interaction impact of every edge
   (:func:`vitscope.analysis.interaction.first_order_impact`, loss of the true class) is accumulated,
   tested for a significantly positive mean (one-sided t-test, Benjamini-Hochberg at ``--q`` within
   each layer), and each patch query's responsive field plus itself becomes its allowed key set
   (:func:`vitscope.analysis.fields.winft_masks_from_fields`; CLS global). The masks are written to
   ``OUT/masks/winft_masks.safetensors`` with figures of them.
2. **Matched window.** The fixed ``k x k`` window whose mean number of patch keys per patch query is
   nearest the WinfT's (odd ``k``; both budgets are reported).
3. **Training.** Three arms of ``winft_fmnist_tiny`` (the size of ``fmnist_vit_tiny``) with one
   recipe: ``plain`` (global attention), ``window`` (``window=k``) and ``winft`` (``masks=FILE``),
   each for every seed, with :func:`vitscope.training.train` on the same training subset
   (``--train-limit`` images drawn once with ``--subset-seed``) and the full 10,000-image test split.
4. **Results.** ``OUT/results.json`` and ``OUT/results.md``: test accuracy mean +- std over seeds,
   the per-seed paired difference WinfT minus window, mask budget and sparsity, and wall time per run.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch

from vitscope.core.progress import Progress, progress_for

#: The three arms, in the order they are trained and reported.
ARMS: tuple[str, ...] = ("plain", "window", "winft")
ARCH = "winft_fmnist_tiny"
MASK_FILE = "winft_masks.safetensors"


@dataclass
class ExperimentConfig:
    """Everything that decides the experiment's numbers (stored in ``results.json``).

    The recipe defaults are those of the built-in ``fmnist_vit_tiny`` (``scripts/train_builtin.py``)
    except for ``epochs``; ``train_limit`` (0 = all 60,000) restricts training to a fixed random
    subset of the training split.
    """

    out: str = "runs/winft-exp"
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    arms: list[str] = field(default_factory=lambda: list(ARMS))
    epochs: int = 3
    train_limit: int = 15000
    subset_seed: int = 0
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    reference: str = "fmnist_vit_tiny"
    field_images: int = 60000
    field_batch_size: int = 500
    field_seed: int = 0
    q: float = 0.05
    min_impact: float = 0.0
    top_n: int = 0
    window: Optional[int] = None
    threads: Optional[int] = None
    device: str = "cpu"

    def recipe(self, seed: int):
        from vitscope.training import Recipe

        return Recipe(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr, weight_decay=self.weight_decay,
                      warmup_epochs=min(self.warmup_epochs, float(self.epochs)), label_smoothing=self.label_smoothing,
                      seed=seed)  # fmt: skip

    def mask_settings(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("reference", "field_images", "field_seed", "q", "min_impact", "top_n")}


# --------------------------------------------------------------------------------------------------
# Masks from the reference model's fields
# --------------------------------------------------------------------------------------------------


def accumulate_impacts(vit, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 500, progress: Union[bool, Progress] = True):
    """First-order interaction impacts of ``vit`` over uint8 images ``(N, H, W)`` with their true labels,
    accumulated in an :class:`~vitscope.analysis.interaction.InteractionAccumulator`."""
    from vitscope.analysis.interaction import InteractionAccumulator, first_order_impact
    from vitscope.training import normalize

    cfg = vit.module.pretrained_cfg
    acc = InteractionAccumulator.for_model(vit)
    with progress_for(progress) as prog:
        task = prog.add_task("responsive fields", total=len(images))
        for start in range(0, len(images), batch_size):
            x = images[start:start + batch_size]
            x = normalize((x[:, None] if x.ndim == 3 else x).to(vit.device), cfg["mean"], cfg["std"])
            acc.update(first_order_impact(vit, x, labels[start:start + batch_size]))
            prog.advance(task, len(x))
    return acc


def derive_masks(cfg: ExperimentConfig, out_dir: Path, progress: bool = True) -> tuple[Path, dict[str, Any]]:
    """Write (or reuse) the WinfT masks for ``cfg`` in ``out_dir``; returns the file and its metadata."""
    import vitscope
    from vitscope.data.fashion_mnist import load_fashion_mnist
    from vitscope.analysis.fields import winft_masks_from_fields
    from vitscope.figures.winft import draw_winft_masks
    from vitscope.models.winft import read_mask_file, save_masks

    path = out_dir / MASK_FILE
    settings = cfg.mask_settings()
    if path.exists():
        _, meta = read_mask_file(path)
        if meta.get("settings") != settings:
            raise SystemExit(
                f"{path} was made with {meta.get('settings')} but this run asks for {settings}; "
                "use a new --out folder (the trained WinfT runs depend on these masks)"
            )
        return path, meta
    vit = vitscope.load_model(cfg.reference, device=cfg.device)
    images, labels = load_fashion_mnist("train")
    n = min(cfg.field_images, len(images)) if cfg.field_images > 0 else len(images)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(cfg.field_seed))[:n]
    t0 = time.perf_counter()
    acc = accumulate_impacts(vit, images[order], labels[order], cfg.field_batch_size, progress)
    summary = acc.summary(q=cfg.q, alternative="greater")
    masks = winft_masks_from_fields(summary, vit.layout, min_impact=cfg.min_impact, top_n=cfg.top_n, include_self=True)
    info = {
        "settings": settings,
        "reference_sha256": vit.weights_sha256,
        "significant_edges_by_layer": [int(v) for v in np.asarray(summary["significant"]).reshape(vit.num_layers, -1).sum(1)],
        "field_seconds": time.perf_counter() - t0,
    }
    save_masks(masks, path, vit.layout, info)
    draw_winft_masks(path, out_dir)
    return path, read_mask_file(path)[1]


# --------------------------------------------------------------------------------------------------
# Training the arms
# --------------------------------------------------------------------------------------------------


def training_splits(cfg: ExperimentConfig):
    """Fashion-MNIST with a fixed random training subset of ``cfg.train_limit`` images and the full test split."""
    from torch.utils.data import Subset

    import timm

    from vitscope.models import registry  # noqa: F401 - registers the WinfT architectures
    from vitscope.training import DatasetSplits, data_config_for, fashion_mnist_splits

    data_cfg = data_config_for(timm.create_model(ARCH))
    full = fashion_mnist_splits(data_cfg)
    n = len(full.train)  # type: ignore[arg-type]
    if not cfg.train_limit or cfg.train_limit >= n:
        return full
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.subset_seed))[: cfg.train_limit].sort().values
    name = f"fashion-mnist[train {cfg.train_limit} of {n}, subset seed {cfg.subset_seed}]"
    return DatasetSplits(name, Subset(full.train, idx.tolist()), full.test, full.classes)


def arm_kwargs(arm: str, mask_file: Path, window: int) -> dict[str, Any]:
    if arm == "plain":
        return {}
    if arm == "window":
        return {"window": int(window)}
    if arm == "winft":
        return {"masks": str(mask_file.resolve())}
    raise SystemExit(f"unknown arm {arm!r}; choose from {', '.join(ARMS)}")


def _finished(run_dir: Path, kwargs: dict[str, Any], recipe, dataset: str) -> Optional[dict[str, Any]]:
    """The metrics of a complete run with exactly these settings, else None."""
    path = run_dir / "metrics.json"
    if not path.exists():
        return None
    m = json.loads(path.read_text())
    same = (m.get("complete") and m["model"]["arch"] == ARCH and {k: v for k, v in m["model"]["kwargs"].items() if k != "num_classes"} == kwargs
            and m["recipe"] == recipe.to_dict() and m["dataset"] == dataset)  # fmt: skip
    return m if same else None


def run_arm(cfg: ExperimentConfig, arm: str, seed: int, kwargs: dict[str, Any], splits, progress: bool = True) -> dict[str, Any]:
    """Train one (arm, seed) run unless it is already complete; returns its row for the results."""
    from vitscope.training import ModelSpec, train

    run_dir = Path(cfg.out) / arm / f"seed{seed}"
    recipe = cfg.recipe(seed)
    metrics = _finished(run_dir, kwargs, recipe, splits.name)
    if metrics is None:
        print(f"== {arm} seed {seed}: {ARCH} {kwargs or '(global attention)'}", file=sys.stderr, flush=True)
        result = train(ModelSpec(ARCH, dict(kwargs)), splits, run_dir, recipe, device=cfg.device, progress=progress)
        metrics = result.metrics
    else:
        print(f"== {arm} seed {seed}: already complete, skipped", file=sys.stderr, flush=True)
    epochs = metrics["epochs"]
    return {
        "arm": arm,
        "seed": seed,
        "test_accuracy": metrics["final_test_accuracy"],
        "test_loss": epochs[-1]["test_loss"],
        "train_loss": epochs[-1]["train_loss"],
        "wall_time_s": metrics["wall_time_s"],
        "epoch_accuracies": [e["test_accuracy"] for e in epochs],
        "weights": str(run_dir / f"{ARCH}.safetensors"),
    }


# --------------------------------------------------------------------------------------------------
# Summaries
# --------------------------------------------------------------------------------------------------


def summarise(runs: list[dict[str, Any]], arms: Sequence[str]) -> dict[str, Any]:
    """Per arm: mean, sample std and n of test accuracy and wall time; paired WinfT - window and WinfT - plain."""
    from scipy import stats

    out: dict[str, Any] = {"arms": {}, "paired": {}}
    for arm in arms:
        acc = np.array([r["test_accuracy"] for r in runs if r["arm"] == arm], dtype=np.float64)
        wall = np.array([r["wall_time_s"] for r in runs if r["arm"] == arm], dtype=np.float64)
        out["arms"][arm] = {
            "n": int(acc.size),
            "accuracy_mean": float(acc.mean()) if acc.size else math.nan,
            "accuracy_std": float(acc.std(ddof=1)) if acc.size > 1 else math.nan,
            "wall_time_mean_s": float(wall.mean()) if wall.size else math.nan,
        }
    by = {(r["arm"], r["seed"]): r["test_accuracy"] for r in runs}
    for a, b in (("winft", "window"), ("winft", "plain"), ("window", "plain")):
        seeds = sorted(s for (arm, s) in by if arm == a and (b, s) in by)
        if not seeds:
            continue
        d = np.array([by[(a, s)] - by[(b, s)] for s in seeds])
        row: dict[str, Any] = {"seeds": seeds, "differences": d.tolist(), "mean": float(d.mean()),
                               "std": float(d.std(ddof=1)) if d.size > 1 else math.nan}  # fmt: skip
        if d.size > 1 and d.std(ddof=1) > 0:
            t = stats.ttest_1samp(d, 0.0)
            row.update(t=float(t.statistic), p_two_sided=float(t.pvalue))
        out["paired"][f"{a}-{b}"] = row
    return out


def _pct(v: float) -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{100 * v:.2f}"


def markdown_table(results: dict[str, Any]) -> str:
    """The results as markdown: one row per arm, then the paired differences."""
    cfg, masks, summ = results["config"], results["masks"], results["summary"]
    what = {"plain": "global (plain ViT)", "window": f"fixed {masks['window']}x{masks['window']} window",
            "winft": "responsive-field masks"}  # fmt: skip
    lines = [
        "| arm | attention | patch keys per patch query | sparsity | mean key distance | test accuracy % (mean ± std) | per seed | wall time per run |",
        "| --- | --- | ---: | ---: | ---: | ---: | --- | ---: |",
    ]
    for arm in cfg["arms"]:
        a = summ["arms"][arm]
        seeds = ", ".join(_pct(r["test_accuracy"]) for r in results["runs"] if r["arm"] == arm)
        kpq, sp, dist = masks[f"{arm}_keys_per_query"], masks[f"{arm}_sparsity"], masks[f"{arm}_key_distance"]
        dist_s = f"{dist:.2f}" if dist is not None and math.isfinite(dist) else "n/a"
        lines.append(f"| {arm} | {what[arm]} | {kpq:.2f} | {100 * sp:.1f}% | {dist_s} | {_pct(a['accuracy_mean'])} ± "
                     f"{_pct(a['accuracy_std'])} (n={a['n']}) | {seeds} | {a['wall_time_mean_s'] / 60:.1f} min |")  # fmt: skip
    if summ["paired"]:
        lines += ["", "| paired difference (same seed) | mean ± std (points) | per seed | t-test p (two-sided) |", "| --- | ---: | --- | ---: |"]
        for name, p in summ["paired"].items():
            per = ", ".join(f"{100 * v:+.2f}" for v in p["differences"])
            pv = f"{p['p_two_sided']:.3f}" if "p_two_sided" in p else "n/a"
            lines.append(f"| {name.replace('-', ' − ')} | {100 * p['mean']:+.2f} ± {_pct(p['std'])} | {per} | {pv} |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------------


def run_experiment(cfg: ExperimentConfig, *, command: Optional[str] = None, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) the whole experiment; writes and returns ``OUT/results.json``'s content."""
    from vitscope.core.layout import TokenLayout
    from vitscope.core.grid import matching_window
    from vitscope.models.winft import mask_stats, read_mask_file, window_masks

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    bad = [a for a in cfg.arms if a not in ARMS]
    if bad:
        raise SystemExit(f"unknown arm(s) {bad}; choose from {', '.join(ARMS)}")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    mask_file, meta = derive_masks(cfg, out / "masks", progress)
    layout = TokenLayout(meta["num_prefix"], meta["cls_index"], None, (), tuple(meta["grid"]), tuple(meta["patch_size"]))
    masks = read_mask_file(mask_file)[0]
    L = masks.shape[0]
    k_auto, _ = matching_window(layout, meta["keys_per_query"])
    k = cfg.window or k_auto
    stats = {
        "plain": mask_stats(torch.ones_like(masks), layout),
        "window": mask_stats(window_masks(layout, k, L), layout),
        "winft": mask_stats(masks, layout),
    }
    masks_info: dict[str, Any] = {
        "file": str(mask_file),
        "settings": meta.get("settings"),
        "reference_sha256": meta.get("reference_sha256"),
        "significant_edges_by_layer": meta.get("significant_edges_by_layer"),
        "window": k,
        "window_matched_automatically": cfg.window is None,
        "num_patches": layout.num_patches,
    }
    for arm, st in stats.items():
        for key in ("keys_per_query", "keys_per_query_by_layer", "sparsity", "key_distance", "key_distance_by_layer"):
            masks_info[f"{arm}_{key}"] = st[key]
    splits = training_splits(cfg)
    runs = []
    for seed in cfg.seeds:  # seed-major: an interrupted experiment has every arm for the seeds it finished
        for arm in cfg.arms:
            runs.append(run_arm(cfg, arm, seed, arm_kwargs(arm, mask_file, k), splits, progress))
            _write(out, cfg, command, masks_info, runs, splits, t0)
    return _write(out, cfg, command, masks_info, runs, splits, t0)


def _write(out: Path, cfg: ExperimentConfig, command: Optional[str], masks_info: dict[str, Any], runs: list[dict[str, Any]],
           splits, t0: float) -> dict[str, Any]:  # fmt: skip
    results = {
        "experiment": "winft-fashion-mnist",
        "command": command,
        "config": asdict(cfg),
        "dataset": splits.name,
        "train_images": len(splits.train),
        "test_images": len(splits.test) if splits.test is not None else 0,
        "masks": masks_info,
        "runs": runs,
        "summary": summarise(runs, cfg.arms),
        "environment": {"torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
                        "machine": platform.machine()},  # fmt: skip
        "session_seconds": time.perf_counter() - t0,
    }
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    tmp.replace(out / "results.json")
    (out / "results.md").write_text(markdown_table(results))
    return results


def parse_args(argv: Optional[Sequence[str]] = None) -> ExperimentConfig:
    d = ExperimentConfig()
    p = argparse.ArgumentParser(prog="python -m vitscope.experiments.winft", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    p.add_argument("--out", default=d.out, help="output folder (results.json, results.md, masks/, <arm>/seed<s>/)")
    p.add_argument("--seeds", type=int, nargs="+", default=d.seeds, help="training seeds, each run for every arm")
    p.add_argument("--arms", nargs="+", default=d.arms, choices=ARMS, help="arms to train")
    p.add_argument("--epochs", type=int, default=d.epochs, help="training epochs (length of the cosine schedule)")
    p.add_argument("--train-limit", type=int, default=d.train_limit, help="training images (fixed random subset; 0 = all 60000)")
    p.add_argument("--subset-seed", type=int, default=d.subset_seed, help="seed of the training subset")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--warmup-epochs", type=float, default=d.warmup_epochs)
    p.add_argument("--label-smoothing", type=float, default=d.label_smoothing)
    p.add_argument("--reference", default=d.reference, help="reference model for the fields (vitscope.load_model spec)")
    p.add_argument("--field-images", type=int, default=d.field_images, help="training images over which impacts are aggregated")
    p.add_argument("--field-batch-size", type=int, default=d.field_batch_size)
    p.add_argument("--field-seed", type=int, default=d.field_seed, help="seed of the field images' order and subset")
    p.add_argument("--q", type=float, default=d.q, help="false discovery rate of the significance test")
    p.add_argument("--min-impact", type=float, default=d.min_impact, help="minimum mean impact of a field edge")
    p.add_argument("--top-n", type=int, default=d.top_n, help="every field holds at least its top-n keys by mean impact")
    p.add_argument("--window", type=int, default=None, help="window side of the window arm (default: matched to the WinfT budget)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--device", default=d.device, help="cpu or cuda")
    a = p.parse_args(argv)
    return ExperimentConfig(
        out=a.out, seeds=a.seeds, arms=a.arms, epochs=a.epochs, train_limit=a.train_limit, subset_seed=a.subset_seed,
        batch_size=a.batch_size, lr=a.lr, weight_decay=a.weight_decay, warmup_epochs=a.warmup_epochs,
        label_smoothing=a.label_smoothing, reference=a.reference, field_images=a.field_images,
        field_batch_size=a.field_batch_size, field_seed=a.field_seed, q=a.q, min_impact=a.min_impact, top_n=a.top_n,
        window=a.window, threads=a.threads, device=a.device,
    )  # fmt: skip


def main(argv: Optional[Sequence[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg = parse_args(argv)
    results = run_experiment(cfg, command="python -m vitscope.experiments.winft " + shlex.join(argv))
    print(markdown_table(results))


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Write a synthetic run folder at the first paper's scale, without a model, for web-app benchmarks.

The default is the paper's setting: ViT-B's 12 layers x 12 heads over 700 images, 197 tokens on a
14 x 14 patch grid, so each of the two pattern catalogues has 100,800 points. Every table and array
the analysis writes is present with the same columns, dtypes and shapes (docs/run-format.md), and
the values are plausible and consistent with each other: early layers attend locally and late
layers globally, some heads are CLS sinks; entropies are computed from the hop profiles, head
summaries and bootstrap intervals from the per-image rows, metric agreement from the head summaries.
Images are small generated PNGs in ``OUT/images``. The run opens with ``vitscope.open_run`` and
serves with ``vitscope serve OUT --no-model`` (its model is not loadable, so live queries are off).

    .venv/bin/python scripts/make_synthetic_run.py /tmp/runs/synthetic-paper
    .venv/bin/python scripts/make_synthetic_run.py /tmp/runs/tiny --images 12 --layers 3 --heads 2 --grid 4
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw
import warnings

from scipy import ndimage, stats

from vitscope.store import RunStore
from vitscope.store.layout import FORMAT, FORMAT_VERSION, STATUS_COMPLETE

METRICS = ("acc_drop", "prob_drop", "loss_increase", "layer_change", "taylor")
MEASURES = ("entropy", "mean_distance", "cls_self", "cls_to_patch", "patch_to_cls")
PATCH_NAMES = ("self/diagonal", "neighbour left", "neighbour right", "local window", "row", "column", "uniform/global", "content")
CLS_NAMES = ("CLS-sink", "uniform/global", "content")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, help="run folder to write (must not exist, or pass --overwrite)")
    p.add_argument("--images", type=int, default=700, help="number of images (default 700)")
    p.add_argument("--layers", type=int, default=12, help="layers (default 12)")
    p.add_argument("--heads", type=int, default=12, help="heads per layer (default 12)")
    p.add_argument("--grid", type=int, default=14, help="patch grid side (default 14: 196 patches + CLS = 197 tokens)")
    p.add_argument("--patch-size", type=int, default=16, help="patch side in pixels (default 16: 224 x 224 images)")
    p.add_argument("--classes", type=int, default=100, help="number of classes (default 100)")
    p.add_argument("--clusters", type=int, default=10, help="clusters per pattern catalogue (default 10)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    a = p.parse_args(argv)
    for name in ("images", "layers", "heads", "grid", "patch_size", "classes", "clusters"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if a.grid < 2:
        p.error("--grid must be at least 2")
    return a


def hop_distance(grid: int) -> np.ndarray:
    """Chebyshev hop distance between every pair of patches, ``(P, P)``."""
    r, c = np.divmod(np.arange(grid * grid), grid)
    return np.maximum(np.abs(r[:, None] - r[None]), np.abs(c[:, None] - c[None]))


def main(argv: list[str]) -> int:
    a = parse_args(argv)
    t0 = time.perf_counter()
    rng = np.random.default_rng(a.seed)
    N, L, H, G, K = a.images, a.layers, a.heads, a.grid, a.clusters
    P, T = G * G, G * G + 1
    side = G * a.patch_size
    store = RunStore(a.out)
    if a.out.exists():
        if not a.overwrite:
            print(f"{a.out} exists; pass --overwrite to replace it", file=sys.stderr)
            return 2
        shutil.rmtree(a.out)
    a.out.mkdir(parents=True)

    # ------------------------------------------------------------------ images
    class_names = [f"class {i:03d}" for i in range(a.classes)]
    labels = rng.integers(0, a.classes, N)
    img_dir = a.out / "images"
    img_dir.mkdir()
    hues = rng.random(a.classes)
    records, paths = [], []
    for i in range(N):
        path = img_dir / f"{i:05d}.png"
        im = Image.new("RGB", (side, side), tuple(int(v) for v in rng.integers(150, 256, 3)))
        d = ImageDraw.Draw(im)
        h = hues[labels[i]]
        colour = tuple(int(255 * v) for v in (h, 1 - h, (h * 3) % 1))
        for _ in range(3):
            x0, y0 = rng.integers(0, side * 3 // 4, 2)
            w = int(rng.integers(side // 6, side // 2))
            d.ellipse([int(x0), int(y0), int(x0) + w, int(y0) + w], fill=colour)
        im.save(path, optimize=False, compress_level=1)
        paths.append(str(path.resolve()))
        records.append({"image_id": i, "path": paths[-1], "label": int(labels[i]), "size": path.stat().st_size})

    # Model predictions: correct ~80% of the time.
    correct = rng.random(N) < 0.8
    prediction = np.where(correct, labels, (labels + rng.integers(1, max(2, a.classes), N)) % a.classes)
    base_prob = np.clip(np.where(correct, rng.beta(8, 2, N), rng.beta(2, 6, N)), 1e-4, 1 - 1e-4)
    probability = np.where(correct, base_prob, np.clip(base_prob + rng.random(N) * (1 - base_prob), 1e-4, 1 - 1e-4))
    base_loss = -np.log(base_prob)

    # ------------------------------------------------------------------- heads
    # Each head has a character: its attention scale (hops), CLS focus and importance.
    depth = (np.arange(L) / max(L - 1, 1))[:, None] * np.ones((1, H))
    scale = np.exp(rng.normal(np.log(0.6 + 6 * depth), 0.5))  # local early, global late
    cls_focus = np.clip(rng.beta(1.2, 6, (L, H)) + (rng.random((L, H)) < 0.12) * 0.6, 0, 0.98)
    importance = rng.gamma(0.6, 0.03, (L, H)) * (1.5 - depth)

    hop = np.arange(G)
    idx = pd.MultiIndex.from_product([range(N), range(L), range(H)], names=["image_id", "layer", "head"])
    img_scale = scale[None] * np.exp(rng.normal(0, 0.15, (N, L, H)))
    prof = np.exp(-hop[None, None, None, :] / img_scale[..., None])
    counts = np.bincount(hop_distance(G).ravel(), minlength=G).astype(np.float64)  # pairs at each hop
    prof = prof / (prof * counts).sum(-1, keepdims=True)  # mean attention per pair at each hop
    patch_mass = 1 - np.clip(cls_focus[None] + rng.normal(0, 0.03, (N, L, H)), 0, 0.99)
    hop_profile = (prof * patch_mass[..., None]).astype(np.float32)
    q = hop_profile / hop_profile.sum(-1, keepdims=True)
    entropy = (-(q * np.log(np.clip(q, 1e-12, None))).sum(-1)).astype(np.float32)
    weights = prof * counts
    mean_distance = ((weights * hop * a.patch_size).sum(-1) / weights.sum(-1)).astype(np.float32)
    cls_self = np.clip(cls_focus[None] * rng.beta(2, 5, (N, L, H)), 0, 1).astype(np.float32)
    cls_to_patch = (1 - cls_self).astype(np.float32)
    patch_to_cls = (1 - patch_mass).astype(np.float32)

    drop = importance[None] * rng.gamma(2.0, 0.5, (N, L, H)) * base_prob[:, None, None]
    pruned_prob = np.clip(base_prob[:, None, None] - drop + rng.normal(0, 0.003, (N, L, H)), 1e-5, 1 - 1e-5)
    pruned_loss = -np.log(pruned_prob)
    pruned_correct = correct[:, None, None] & (pruned_prob > 0.5 * base_prob[:, None, None])
    layer_change = np.clip(importance[None] * 0.5 + rng.gamma(2, 0.005, (N, L, H)), 0, 2)
    layer_rel_l2 = np.sqrt(2 * layer_change) * (1 + rng.normal(0, 0.05, (N, L, H)))
    taylor = np.abs(importance[None] * 3 + rng.normal(0, 0.02, (N, L, H)))

    image_heads = pd.DataFrame(
        {
            "image_id": idx.get_level_values(0).astype(np.int64),
            "layer": idx.get_level_values(1).astype(np.int64),
            "head": idx.get_level_values(2).astype(np.int64),
            "pruned_prob": pruned_prob.ravel(),
            "pruned_loss": pruned_loss.ravel(),
            "pruned_correct": pruned_correct.ravel(),
            "layer_change": layer_change.ravel(),
            "layer_rel_l2": layer_rel_l2.ravel(),
            "taylor": taylor.ravel(),
            "entropy": entropy.ravel(),
            "mean_distance": mean_distance.ravel(),
            "cls_self": cls_self.ravel(),
            "cls_to_patch": cls_to_patch.ravel(),
            "patch_to_cls": patch_to_cls.ravel(),
            "hop_profile": list(hop_profile.reshape(N * L * H, G)),
        }
    )

    # Per-image importance values -> head means with 95% percentile-bootstrap intervals.
    per_image = {
        "acc_drop": (correct[:, None, None] & ~pruned_correct).astype(np.float64) - (~correct[:, None, None] & pruned_correct),
        "prob_drop": base_prob[:, None, None] - pruned_prob,
        "loss_increase": pruned_loss - base_loss[:, None, None],
        "layer_change": layer_change,
        "layer_rel_l2": layer_rel_l2,
        "taylor": taylor,
    }
    boot = rng.integers(0, N, (200, N))
    heads = pd.DataFrame({"layer": np.repeat(np.arange(L), H), "head": np.tile(np.arange(H), L)})
    heads["head_index"] = heads["layer"] * H + heads["head"]
    heads["n_images"] = N
    heads["n_labelled"] = N
    heads["target"] = "label"
    for name, v in per_image.items():
        flat = v.reshape(N, L * H)
        means = np.stack([flat[b].mean(0) for b in boot])
        heads[name] = flat.mean(0)
        heads[f"{name}_lo"], heads[f"{name}_hi"] = np.percentile(means, [2.5, 97.5], axis=0)
    heads["taylor_layer_norm"] = heads["taylor"] / heads.groupby("layer")["taylor"].transform(lambda t: np.sqrt((t**2).sum()))
    for name in MEASURES:
        flat = image_heads[name].to_numpy().reshape(N, L * H)
        heads[f"{name}_mean"] = flat.mean(0).astype(np.float32)
        heads[f"{name}_q25"] = np.quantile(flat, 0.25, axis=0)
        heads[f"{name}_median"] = np.median(flat, axis=0).astype(np.float32)
        heads[f"{name}_q75"] = np.quantile(flat, 0.75, axis=0)
    heads["hop_profile_mean"] = list(hop_profile.reshape(N, L * H, G).mean(0))

    # ---------------------------------------------------------------- patterns
    store.write_table("image_heads", image_heads)
    pattern_rows, cluster_rows, head_pattern = [], [], {}
    arrays: dict[str, tuple[np.ndarray, dict]] = {}
    map_inputs: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for kind, names, latent in (("patch", PATCH_NAMES, 8), ("cls", CLS_NAMES, 8)):
        centres = rng.normal(0, 6, (K, 2))
        cnames = [names[k % len(names)] for k in range(K)]
        # A head's maps mostly fall in the cluster of its character, the rest anywhere.
        key = scale if kind == "patch" else cls_focus
        order = np.argsort(np.argsort(key.ravel())).reshape(L, H)
        home = (order * K // (L * H)).astype(np.int64)
        cluster = np.where(rng.random((N, L, H)) < 0.75, home[None], rng.integers(0, K, (N, L, H)))
        xy = (centres[cluster] + rng.normal(0, 1.0, (N, L, H, 2))).astype(np.float32)
        codes = (rng.normal(0, 1, (K, latent))[cluster] + rng.normal(0, 0.3, (N, L, H, latent))).astype(np.float32)
        centroids = np.stack([codes[cluster == k].mean(0) if (cluster == k).any() else np.zeros(latent) for k in range(K)]).astype(np.float32)
        pattern_rows.append(
            pd.DataFrame(
                {
                    "kind": kind,
                    "image_id": idx.get_level_values(0).astype(np.int64),
                    "layer": idx.get_level_values(1).astype(np.int64),
                    "head": idx.get_level_values(2).astype(np.int64),
                    "x": xy[..., 0].ravel().astype(np.float64),
                    "y": xy[..., 1].ravel().astype(np.float64),
                    "cluster": cluster.ravel().astype(np.int64),
                }
            )
        )
        size = np.bincount(cluster.ravel(), minlength=K)
        mx = np.array([xy[..., 0][cluster == k].mean() if size[k] else centres[k, 0] for k in range(K)])
        my = np.array([xy[..., 1][cluster == k].mean() if size[k] else centres[k, 1] for k in range(K)])
        cluster_rows.append(
            pd.DataFrame({"kind": kind, "cluster": np.arange(K, dtype=np.int64), "size": size.astype(np.int64), "share": size / size.sum(), "name": cnames, "x": mx, "y": my})
        )
        per_head = cluster.reshape(N, L * H)
        mode = np.array([np.bincount(per_head[:, j], minlength=K).argmax() for j in range(L * H)])
        share = np.array([(per_head[:, j] == mode[j]).mean() for j in range(L * H)])
        head_pattern[kind] = (mode, [cnames[m] for m in mode], share)

        # Density of the embedding on a 64 x 64 grid, as the analysis draws its contours.
        gx = np.linspace(xy[..., 0].min() - 1, xy[..., 0].max() + 1, 64)
        gy = np.linspace(xy[..., 1].min() - 1, xy[..., 1].max() + 1, 64)
        hist, _, _ = np.histogram2d(xy[..., 1].ravel(), xy[..., 0].ravel(), bins=64, range=[[gy[0], gy[-1]], [gx[0], gx[-1]]])
        dens = ndimage.gaussian_filter(hist, 2.0)
        dens = (dens / dens.sum()).astype(np.float32)
        extent = [float(gx[0]), float(gx[-1]), float(gy[0]), float(gy[-1])]
        inp = "offset" if kind == "patch" else "cls"
        channels, s = 2, (15 if kind == "patch" else 14)
        yy, xx = np.mgrid[0:s, 0:s] - (s - 1) / 2
        protos = np.stack(
            [np.stack([np.exp(-(yy**2 + xx**2) / (2 * (0.5 + k) ** 2)), np.exp(-((yy - k % 3) ** 2 + xx**2) / (2 * (1.0 + k) ** 2))]) for k in range(K)]
        ).astype(np.float32)
        arrays[f"patterns/{kind}/codes"] = (codes, {"dims": ["image", "layer", "head", "latent"], "image_order": "images.parquet rows", "input": inp})
        arrays[f"patterns/{kind}/embedding"] = (xy, {"dims": ["image", "layer", "head", "xy"], "projection": "umap"})
        arrays[f"patterns/{kind}/cluster"] = (cluster.astype(np.int32), {"dims": ["image", "layer", "head"], "names": cnames})
        arrays[f"patterns/{kind}/centroids"] = (centroids, {"dims": ["cluster", "latent"]})
        arrays[f"patterns/{kind}/prototypes"] = (protos[:, :channels], {"dims": ["cluster", "channel", "y", "x"], "names": cnames, "input": inp})
        arrays[f"patterns/{kind}/density"] = (dens, {"dims": ["y", "x"], "extent": extent, "grid_x": gx.tolist(), "grid_y": gy.tolist()})
        map_inputs[inp] = (protos[:, :channels], cluster)
    map_inputs["patch"] = (protos_patch_like(K, G), arrays["patterns/patch/cluster"][0])

    for kind, prefix in (("patch", "pattern"), ("cls", "cls_pattern")):
        mode, names_, share = head_pattern[kind]
        heads[f"{prefix}_cluster"] = mode.astype(np.int64)
        heads[f"{prefix}_name"] = names_
        heads[f"{prefix}_share"] = share

    # -------------------------------------------------------- mean attention
    dist = hop_distance(G)
    attn = np.empty((L, H, T, T), dtype=np.float32)
    for layer in range(L):
        for head in range(H):
            block = np.exp(-dist / scale[layer, head])
            block /= block.sum(1, keepdims=True)
            c = cls_focus[layer, head]
            attn[layer, head, 1:, 1:] = block * (1 - c)
            attn[layer, head, 1:, 0] = c
            row = np.exp(rng.normal(0, 0.5, P))
            attn[layer, head, 0, 1:] = row / row.sum() * (1 - c * 0.3)
            attn[layer, head, 0, 0] = c * 0.3
    arrays["attention_mean"] = (attn, {"dims": ["layer", "head", "query", "key"], "images": N, "what": "mean post-softmax attention over the analysed images"})

    # ------------------------------------------------------------ images table
    ov = rng.normal(0, 1, (a.classes, 2))[labels] * 4 + rng.normal(0, 1, (N, 2))
    arrays["overview"] = (ov.astype(np.float64), {"dims": ["image", "xy"], "image_order": "images.parquet rows"})
    images = pd.DataFrame(
        {
            "image_id": np.arange(N, dtype=np.int64),
            "path": pd.array(paths, dtype="string"),
            "label": pd.array(labels, dtype="Int64"),
            "label_name": pd.array([class_names[k] for k in labels], dtype="string"),
            "prediction": prediction.astype(np.int64),
            "prediction_name": pd.array([class_names[k] for k in prediction], dtype="string"),
            "probability": probability,
            "target": labels.astype(np.int64),
            "base_prob": base_prob,
            "base_loss": base_loss,
            "correct": prediction == labels,
            "curve_split": np.where(np.arange(N) % 2 == 0, "evaluate", "rank"),
            "overview_x": ov[:, 0],
            "overview_y": ov[:, 1],
        }
    )

    # ------------------------------------------------------- curves, agreement
    curve_rows = []
    ks = np.unique(np.linspace(0, L * H, 7).round().astype(int))
    for metric in (*METRICS, "random"):
        ranking = rng.permutation(L * H) if metric == "random" else np.argsort(-heads[metric].to_numpy(), kind="stable")
        imp_sorted = importance.ravel()[ranking]
        for k in ks:
            lost = imp_sorted[:k].sum()
            acc = float(np.clip(correct.mean() * np.exp(-3 * lost), 0, 1))
            mp = float(base_prob.mean() * np.exp(-3 * lost))
            for ranking_name in ("held_out", "in_sample"):
                curve_rows.append({"ranking": ranking_name, "metric": metric, "k": int(k), "accuracy": acc, "mean_prob": mp,
                                   "mean_loss": float(-np.log(max(mp, 1e-6))), "n_images": (N + 1) // 2,
                                   "n_rank_images": N // 2 if ranking_name == "held_out" else N})
    agreement = []
    for i, ma in enumerate(METRICS):
        for mb in METRICS[i + 1 :]:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", stats.ConstantInputWarning)  # tiny runs: a metric may be constant
                rho, p = stats.spearmanr(heads[ma], heads[mb])
            agreement.append({"metric_a": ma, "metric_b": mb, "spearman": float(rho), "p_value": float(p), "n_heads": L * H})

    # ------------------------------------------------------------------ write
    store.write_table("images", images)
    store.write_table("heads", heads)
    store.write_table("curves", pd.DataFrame(curve_rows))
    store.write_table("agreement", pd.DataFrame(agreement))
    store.write_table("patterns", pd.concat(pattern_rows, ignore_index=True))
    store.write_table("pattern_clusters", pd.concat(cluster_rows, ignore_index=True))
    for name, (data, attrs) in arrays.items():
        chunks = (min(N, 64), *data.shape[1:]) if data.ndim >= 4 and data.shape[0] == N else None
        store.write_array(name, data, chunks=chunks, attrs=attrs)
    # The autoencoder inputs: each map is its cluster's prototype, scaled and with a little noise
    # (written 64 images at a time to keep memory low).
    for inp, (protos, cluster) in map_inputs.items():
        shape = (N, L, H, *protos.shape[1:])
        attrs = {"dims": ["image", "layer", "head", "channel", "y", "x"], "image_order": "images.parquet rows"}
        with store.new_array(f"pattern_inputs/{inp}", shape, np.float16, chunks=(min(N, 64), *shape[1:]), attrs=attrs) as arr:
            for start in range(0, N, 64):
                c = cluster[start : start + 64]
                maps = protos[c] * rng.uniform(0.6, 1.0, (*c.shape, 1, 1, 1)).astype(np.float32)
                maps += rng.normal(0, 0.03, maps.shape).astype(np.float32)
                arr[start : start + len(c)] = np.clip(maps, 0, 1).astype(np.float16)

    settings = {"batch_size": 32, "seed": a.seed, "n_boot": 200, "pattern_size": 16, "patch_input": "offset", "latent_dim": 8, "ae_epochs": 0, "ae_min_steps": 0,
                "ae_max_maps": 0, "n_clusters": K, "projection": "umap", "curve_images": N, "curve_points": len(ks), "interactions": False, "device": "cpu"}
    fp = hashlib.sha256(json.dumps([vars(a).__repr__(), settings], default=str).encode()).hexdigest()
    now = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime())
    store.write_manifest(
        {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "status": STATUS_COMPLETE,
            "created": now,
            "completed": now,
            "command": "scripts/make_synthetic_run.py " + " ".join(argv),
            "synthetic": True,
            "fingerprint": fp,
            "fingerprint_parts": {"model": fp, "images": fp, "settings": fp},
            "model": {
                "spec": f"synthetic_vit_{L}x{H}",
                "name": f"synthetic_vit_{L}x{H}",
                "library": "synthetic",
                "weights_sha256": None,
                "num_layers": L,
                "num_heads": H,
                "num_classes": a.classes,
                "layout": {"num_prefix": 1, "cls_index": 0, "dist_index": None, "register_indices": [], "grid": [G, G], "patch_size": [a.patch_size, a.patch_size], "num_tokens": T},
                "preprocessing": {"input_size": [3, side, side], "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "interpolation": "bicubic", "resize": side, "crop": [side, side]},
                "class_names": class_names,
            },
            "images": {"source": str(img_dir.resolve()), "labels": None, "limit": None, "count": N, "class_names": class_names, "records": records},
            "settings": settings,
            "chunks": {"size": 32, "count": -(-N // 32)},
            "versions": {"python": sys.version.split()[0]},
            "failures": [],
            "counts": {"listed": N, "analysed": N, "failed": 0},
            "patterns": {"patch": {"input": "offset"}, "cls": {"input": "cls"}},
            "timings": {"synthetic": round(time.perf_counter() - t0, 3)},
        }
    )
    print(f"wrote {a.out}: {N} images x {L} layers x {H} heads, {T} tokens, {N * L * H} maps per catalogue, in {time.perf_counter() - t0:.1f} s")
    return 0


def protos_patch_like(K: int, G: int, size: int = 16) -> np.ndarray:
    """``(K, 1, size, size)``: patch->patch blocks from local to global, pooled as the analysis pools
    ``pattern_inputs/patch``, each scaled to a maximum of 1."""
    import torch
    import torch.nn.functional as F

    dist = torch.as_tensor(hop_distance(G), dtype=torch.float32)
    blocks = torch.stack([torch.exp(-dist / (0.5 + 1.5 * k))[None] for k in range(K)])
    pooled = F.adaptive_avg_pool2d(blocks, size)
    return (pooled / pooled.amax(dim=(-2, -1), keepdim=True)).numpy()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

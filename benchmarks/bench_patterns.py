"""Benchmark of attention strength, pattern inputs and the pattern catalogue.

Run: ``.venv/bin/python benchmarks/bench_patterns.py [--images 16] [--maps 144000] [--projection pca]``

Part 1 (needs ``../shared``): DeiT-Tiny on real ImageNet photos — one streamed forward pass alone,
with :func:`attention_strength` on every layer, and with :func:`pattern_inputs` on every layer.
Part 2: :func:`train_autoencoder` with its defaults on ``--maps`` random ``(2, 15, 15)`` maps (the
size of the offset maps of 1000 images x 144 heads at the default), then :func:`catalogue_patterns`.
The first autoencoder call pays torch's one-off optimiser import; it is timed separately.
"""

from __future__ import annotations

import argparse
import csv
import os
import time
from pathlib import Path

import numpy as np
import torch

SHARED = Path(os.environ.get("VITSCOPE_SHARED", Path(__file__).resolve().parents[2] / "shared"))


def bench_model(n_images: int) -> None:
    from PIL import Image

    import vitscope
    from vitscope.analysis.patterns import pattern_inputs
    from vitscope.analysis.strength import attention_strength

    weights = SHARED / "models" / "deit_tiny_patch16_224.safetensors"
    sample = SHARED / "data" / "imagenet-sample"
    if not weights.exists() or not sample.exists():
        print(f"skipping the model part: {weights} or {sample} not found (set VITSCOPE_SHARED)")
        return
    vit = vitscope.load_model("deit_tiny_patch16_224", weights=weights, device="cpu")
    rows = list(csv.DictReader(open(sample / "labels.csv")))[:n_images]
    x = vit.preprocess([Image.open(sample / r["path"]).convert("RGB") for r in rows])
    lay = vit.layout
    runs = {
        "stream only": lambda layer, a: None,
        "stream + attention_strength": lambda layer, a: attention_strength(a, lay),
        "stream + pattern_inputs": lambda layer, a: pattern_inputs(a, lay),
    }
    vit.stream(x, on_attention=runs["stream only"])  # warm-up
    print(f"| DeiT-Tiny, {n_images} images, {torch.get_num_threads()} threads | seconds |\n|---|---|")
    for name, fn in runs.items():
        t = time.perf_counter()
        vit.stream(x, on_attention=fn)
        print(f"| {name} | {time.perf_counter() - t:.2f} |")


def bench_catalogue(n_maps: int, projection: str) -> None:
    from vitscope.analysis.patterns import catalogue_patterns, train_autoencoder

    maps = np.random.default_rng(0).random((n_maps, 2, 15, 15)).astype(np.float16)
    t = time.perf_counter()
    train_autoencoder(maps[:64], min_steps=1)
    print(f"| first call (imports) | {time.perf_counter() - t:.1f} |")
    t = time.perf_counter()
    ae = train_autoencoder(maps)
    print(f"| train_autoencoder defaults, {n_maps} maps (trains on {ae.config['n_train']}, "
          f"{ae.config['epochs_run']} epochs) + encode all | {time.perf_counter() - t:.1f} |")
    t = time.perf_counter()
    catalogue_patterns(ae.codes, n_clusters=8, projection=projection, autoencoder=ae)
    print(f"| catalogue_patterns ({projection}, 8 clusters) | {time.perf_counter() - t:.1f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--maps", type=int, default=144_000)
    ap.add_argument("--projection", default="pca", choices=["pca", "umap", "tsne"])
    args = ap.parse_args()
    bench_model(args.images)
    print("\n| pattern catalogue | seconds |\n|---|---|")
    bench_catalogue(args.maps, args.projection)


if __name__ == "__main__":
    main()

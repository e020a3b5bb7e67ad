#!/usr/bin/env python
"""Train vitscope's built-in Fashion-MNIST ViT and refresh the packaged weights and sample images.

Steps (each can be re-run; training resumes from its checkpoint):

1. ``vitscope train`` on Fashion-MNIST with the fixed recipe and seed below, into ``--out``;
2. copy ``<out>/fmnist_vit_tiny.safetensors`` to ``src/vitscope/assets/models/``;
3. write the sample: the first 30 test images of each class (300 PNGs) and ``labels.csv`` to
   ``src/vitscope/assets/sample/``;
4. check that ``vitscope.load_model("fmnist_vit_tiny")`` on those PNG files predicts what the trained
   network predicts on the same test tensors, and print the numbers recorded in docs/builtin-model.md.

Usage: ``python scripts/train_builtin.py [--out runs/fmnist_vit_tiny-seed0] [--threads 1] [--skip-train]``
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "src" / "vitscope" / "assets"
WEIGHTS_DST = ASSETS / "models" / "fmnist_vit_tiny.safetensors"
SAMPLE_DIR = ASSETS / "sample"
PER_CLASS = 30
MAX_WEIGHTS_BYTES = 5 * 1024 * 1024

#: The recipe of the built-in model. Changing it changes the packaged weights: re-run this script.
RECIPE_ARGS = [
    "--arch", "fmnist_vit_tiny", "--dataset", "fashion-mnist", "--seed", "0",
    "--epochs", "12", "--batch-size", "128", "--lr", "2e-3", "--weight-decay", "0.05",
    "--warmup-epochs", "1", "--min-lr-ratio", "0.01", "--label-smoothing", "0.1",
    "--no-augment", "--grad-clip", "1.0", "--init", "mimetic",
]  # fmt: skip


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def write_sample(images, labels, classes: list[str]) -> list[int]:
    """The first ``PER_CLASS`` test images of every class, in test-set order, as PNG + labels.csv."""
    from PIL import Image

    picked: list[int] = []
    counts = [0] * len(classes)
    for i, y in enumerate(labels.tolist()):
        if counts[y] < PER_CLASS:
            counts[y] += 1
            picked.append(i)
    if min(counts) < PER_CLASS:
        raise SystemExit(f"the test split has fewer than {PER_CLASS} images of some class: {counts}")
    SAMPLE_DIR.mkdir(parents=True, exist_ok=True)
    for old in SAMPLE_DIR.glob("*.png"):
        old.unlink()
    with open(SAMPLE_DIR / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "label_name"])
        for i in picked:
            y = int(labels[i])
            name = f"test{i:05d}_{slug(classes[y])}.png"
            Image.fromarray(images[i].numpy(), mode="L").save(SAMPLE_DIR / name, optimize=True)
            w.writerow([name, y, classes[y]])
    return picked


def check_sample(out: Path, picked: list[int], images, labels) -> dict[str, float]:
    """Accuracy on the sample two ways: the trained network on test tensors, and load_model on the PNGs."""
    import torch
    from safetensors.torch import load_file

    import vitscope
    from vitscope.models.builtin import create_fmnist_vit_tiny
    from vitscope.training import TensorImageDataset, evaluate

    trained = create_fmnist_vit_tiny()  # the run's own output, evaluated the way training evaluates
    trained.load_state_dict(load_file(str(out / "fmnist_vit_tiny.safetensors")))
    cfg = json.loads((out / "metrics.json").read_text())["data_config"]
    ref = evaluate(trained, TensorImageDataset(images, labels, cfg), cfg, indices=picked)

    builtin = vitscope.load_model("fmnist_vit_tiny", device="cpu")
    rows = list(csv.DictReader(open(SAMPLE_DIR / "labels.csv")))
    with torch.no_grad():
        logits = builtin.logits(builtin.preprocess([SAMPLE_DIR / r["path"] for r in rows]))
    y = torch.tensor([int(r["label"]) for r in rows])
    correct = int((logits.argmax(-1) == y).sum())
    if correct != ref["correct"]:
        raise SystemExit(f"load_model('fmnist_vit_tiny') gets {correct}/{len(rows)} of the sample right "
                         f"but the trained network {ref['correct']}/{ref['count']}")  # fmt: skip
    return {"sample_correct_training_pipeline": ref["correct"], "sample_correct_load_model": correct,
            "sample_accuracy": correct / len(rows)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "fmnist_vit_tiny-seed0", help="training output folder")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (recorded; 1 is fastest on a shared machine)")
    ap.add_argument("--skip-train", action="store_true", help="use an existing finished run in --out")
    a = ap.parse_args()

    vitscope_bin = Path(sys.executable).parent / "vitscope"
    cmd = [str(vitscope_bin), "train", *RECIPE_ARGS, "--threads", str(a.threads), "--out", str(a.out)]
    if not a.skip_train:
        print("$", " ".join(cmd), flush=True)
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True)
        print(f"training command took {time.perf_counter() - t0:.0f} s", flush=True)
    metrics = json.loads((a.out / "metrics.json").read_text())
    if not metrics.get("complete"):
        raise SystemExit(f"{a.out} holds an unfinished run; run this script again to resume it")
    src = a.out / "fmnist_vit_tiny.safetensors"
    if src.stat().st_size > MAX_WEIGHTS_BYTES:
        raise SystemExit(f"{src} is {src.stat().st_size} bytes, over the {MAX_WEIGHTS_BYTES} byte limit for packaged weights")
    WEIGHTS_DST.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, WEIGHTS_DST)

    from vitscope.data.fashion_mnist import CLASSES, load_fashion_mnist

    images, labels = load_fashion_mnist("test")
    picked = write_sample(images, labels, list(CLASSES))
    check = check_sample(a.out, picked, images, labels)
    summary = {
        "command": " ".join(["vitscope", "train", *RECIPE_ARGS, "--threads", str(a.threads), "--out", "<out>"]),
        "final_test_accuracy": metrics["final_test_accuracy"],
        "wall_time_s": metrics["wall_time_s"],
        "epochs": [{k: r[k] for k in ("epoch", "train_loss", "test_accuracy", "epoch_time_s")} for r in metrics["epochs"]],
        "weights_bytes": WEIGHTS_DST.stat().st_size,
        "weights_sha256": hashlib.sha256(WEIGHTS_DST.read_bytes()).hexdigest(),
        "sample_images": len(picked),
        **check,
    }
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()

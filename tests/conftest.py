"""Shared fixtures. Data in ../shared is optional: tests that need it skip with a reason."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("VITSCOPE_SHARED", REPO.parent / "shared"))
DEIT_WEIGHTS = SHARED / "models" / "deit_tiny_patch16_224.safetensors"
IMAGENET_SAMPLE = SHARED / "data" / "imagenet-sample"

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a test module: its many small forwards are dominated by thread start-up
    otherwise (badly so on a busy machine). Modules opt in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def _need(path: Path, what: str) -> Path:
    if not path.exists():
        pytest.skip(f"{what} not found at {path} (set VITSCOPE_SHARED to the shared data folder)")
    return path


@pytest.fixture(scope="session")
def deit_weights() -> Path:
    return _need(DEIT_WEIGHTS, "DeiT-Tiny weights")


@pytest.fixture(scope="session")
def imagenet_sample() -> Path:
    return _need(IMAGENET_SAMPLE, "ImageNet sample")


@pytest.fixture(scope="session")
def deit_tiny(deit_weights):
    import vitscope

    return vitscope.load_model("deit_tiny_patch16_224", weights=deit_weights, device="cpu")


@pytest.fixture(scope="session")
def random_vit():
    """A small random timm ViT (3 layers x 2 heads, 4x4 grid + CLS)."""
    from timm.models.vision_transformer import VisionTransformer

    import vitscope

    torch.manual_seed(0)
    m = VisionTransformer(img_size=32, patch_size=8, num_classes=5, embed_dim=32, depth=3, num_heads=2, mlp_ratio=2.0)
    return vitscope.load_model(m, device="cpu")


@pytest.fixture(scope="session")
def imagenet_images(imagenet_sample):
    """A few dozen real ImageNet photos with their class indices: (paths, labels)."""
    import csv

    rows = list(csv.DictReader(open(imagenet_sample / "labels.csv")))[::25][:40]
    return [imagenet_sample / r["path"] for r in rows], [int(r["class_index"]) for r in rows]


@pytest.fixture(scope="session")
def server_run(tmp_path_factory):
    """A small real run of the built-in model on 16 sample images (fast settings)."""
    from vitscope.pipeline import AnalyzeSettings

    settings = AnalyzeSettings(batch_size=8, n_boot=20, curve_images=8, curve_points=2, ae_epochs=1, ae_min_steps=5, projection="pca", n_clusters=2)
    out = tmp_path_factory.mktemp("server") / "run"
    import vitscope

    return vitscope.analyze("fmnist_vit_tiny", "sample", out, limit=16, settings=settings, device="cpu", progress=False)

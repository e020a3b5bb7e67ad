"""``analyze --objective embedding``: a run over a backbone without a classifier (and over a
classifier, measured by its embedding), its tables against direct computations, and the refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import vitscope
from vitscope.analysis.settings import AnalyzeSettings

SETTINGS = AnalyzeSettings(batch_size=3, n_boot=20, ae_epochs=1, ae_min_steps=4, n_clusters=2, curve_images=3,
                           curve_points=3, projection="pca", objective="embedding")  # fmt: skip


def _backbone(num_classes: int = 0):
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(3)
    model = VisionTransformer(img_size=32, patch_size=8, num_classes=num_classes, embed_dim=32, depth=2, num_heads=2)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return vitscope.load_model(model.eval(), device="cpu")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(1)
    for i in range(7):
        (root / str(i % 3)).mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(root / str(i % 3) / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def backbone_run(folder, tmp_path_factory):
    vit = _backbone()
    return vit, vitscope.analyze(vit, folder, tmp_path_factory.mktemp("run") / "r", settings=SETTINGS, progress=False)


def test_embedding_run_stores_each_heads_embedding_change(backbone_run, folder):
    vit, run = backbone_run
    images = run.table("images")
    assert {"embedding_norm", "target"} <= set(images.columns) and "base_prob" not in images.columns
    assert list(images["label"]) == [int(p.parent.name) for p in sorted(folder.rglob("*.png"))]  # labels kept as metadata
    ih = run.table("image_heads")
    assert "embedding_change" in ih.columns and "pruned_prob" not in ih.columns and "taylor" not in ih.columns
    # Against the masked full forward of every head, 1 - cos by torch's cosine_similarity.
    from vitscope.data import iter_batches, load_images

    batch = next(iter_batches(load_images(folder), vit.preprocessing, batch_size=7))
    base = vit.embeddings(batch.x).double()
    for (l, h), rows in ih.groupby(["layer", "head"]):
        pruned = vit.embeddings(batch.x, masks={(int(l), int(h)): "all"}).double()
        want = (1 - F.cosine_similarity(pruned, base, dim=1)).numpy()
        got = rows.set_index("image_id")["embedding_change"].loc[batch.image_ids].to_numpy()
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-9)
    heads = run.heads
    assert {"embedding_change", "embedding_change_lo", "embedding_change_hi"} <= set(heads.columns)
    assert "acc_drop" not in heads.columns and (heads["target"] == "embedding").all()
    np.testing.assert_allclose(heads.sort_values(["layer", "head"])["embedding_change"].to_numpy(),
                               ih.groupby(["layer", "head"])["embedding_change"].mean().to_numpy(), rtol=1e-9)  # fmt: skip
    curves = run.table("curves")
    assert set(curves["metric"]) == {"embedding_change", "layer_change", "random"}
    assert curves["mean_embedding_change"].notna().all() and curves["accuracy"].isna().all()
    assert run.manifest["settings"]["objective"] == "embedding"
    assert np.isfinite(run.array("overview")[...]).all()


def test_backbones_are_told_to_use_the_embedding_objective(folder, tmp_path):
    with pytest.raises(ValueError, match="no classification head.*--objective embedding"):
        vitscope.analyze(_backbone(), folder, tmp_path / "r", settings=AnalyzeSettings(batch_size=4), progress=False)
    with pytest.raises(ValueError, match="patch interactions.*--objective label"):
        AnalyzeSettings(objective="embedding", interactions=True).validate()
    with pytest.raises(ValueError, match=r"\['relevance'\].*attention, rollout or random"):
        AnalyzeSettings(objective="embedding", explain=("rollout", "relevance")).validate()
    with pytest.raises(ValueError, match="objective must be one of label, embedding"):
        AnalyzeSettings(objective="logits").validate()
    # The label objective's settings keep the fingerprint of runs made before the option existed.
    assert "objective" not in AnalyzeSettings().to_dict()


def test_cli_objective_option(folder, tmp_path):
    from typer.testing import CliRunner

    from vitscope.cli import app

    res = CliRunner().invoke(app, ["analyze", "-m", "fmnist_vit_tiny", "-i", str(folder), "-o", str(tmp_path / "r"),
                                   "--objective", "embedding", "--interactions", "-q"])  # fmt: skip
    assert res.exit_code != 0 and "patch interactions" in res.output

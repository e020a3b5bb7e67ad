"""A short ``analyze`` on every supported model family (with a classifier; backbones by their embedding): the whole pipeline
(capture, head sweep, Taylor, strength, patterns, curves, overview) runs end to end on each layout
(CLS or none, distillation, registers, rotary, relative position bias, talking heads), and the
stored numbers agree with direct computations on the same model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import vitscope
from vitscope.analysis.settings import AnalyzeSettings

SETTINGS = AnalyzeSettings(batch_size=3, n_boot=20, ae_epochs=1, ae_min_steps=4, n_clusters=2, curve_images=3, curve_points=3, projection="pca")


def _randomise(model: torch.nn.Module, scale: float = 0.05) -> torch.nn.Module:
    """Random weights everywhere (biases and norms included) so no head is trivially inert."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale + (1.0 if p.ndim == 1 and p.shape[0] > 0 and p.mean() == 1.0 else 0.0))
    return model.eval()


def _timm(name: str, **kw):
    import timm

    torch.manual_seed(0)
    return _randomise(timm.create_model(name, pretrained=False, **kw))


def _hf(family: str):
    import transformers as tr

    c = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8)
    torch.manual_seed(0)
    model = {
        "hf-vit": lambda: tr.ViTForImageClassification(tr.ViTConfig(**c, num_labels=4)),
        "hf-deit-distilled": lambda: tr.DeiTForImageClassificationWithTeacher(tr.DeiTConfig(**c, num_labels=4)),
        "hf-dinov2-registers": lambda: tr.Dinov2WithRegistersForImageClassification(tr.Dinov2WithRegistersConfig(**c, num_register_tokens=2, num_labels=4)),
        "hf-clip": lambda: tr.CLIPForImageClassification(tr.CLIPConfig(vision_config=c, num_labels=4)),
        "hf-siglip": lambda: tr.SiglipForImageClassification(tr.SiglipConfig(vision_config=c, num_labels=4)),
        "hf-beit": lambda: tr.BeitForImageClassification(tr.BeitConfig(**c, use_relative_position_bias=True, num_labels=4)),
    }[family]()
    return _randomise(model)


SMALL = dict(img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2, num_classes=4)
FAMILIES = {
    "timm-deit-distilled": lambda: _timm("deit_tiny_distilled_patch16_224", **SMALL),
    "timm-registers": lambda: _timm("vit_small_patch16_224", **SMALL, reg_tokens=2, class_token=True),
    "timm-eva02": lambda: _timm("eva02_tiny_patch14_224", img_size=28, patch_size=7, depth=2, num_classes=4),
    "timm-rope-mixed": lambda: _timm("vit_small_patch16_rope_mixed_224", **SMALL),
    "timm-beit": lambda: _timm("beit_base_patch16_224", **SMALL),
    "timm-cait": lambda: _timm("cait_xxs24_224", img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2, num_classes=4, init_values=0.5),
    **{name: (lambda name=name: _hf(name)) for name in ("hf-vit", "hf-deit-distilled", "hf-dinov2-registers", "hf-clip", "hf-siglip", "hf-beit")},
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(6):
        cls = root / f"{i % 4}"  # class-index folders: every model names its classes differently
        cls.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(cls / f"{i}.png")
    return root


@pytest.mark.parametrize("family", list(FAMILIES))
def test_analyze_runs_on_every_family(family, folder, tmp_path):
    vit = vitscope.load_model(FAMILIES[family](), device="cpu")
    run = vitscope.analyze(vit, folder, tmp_path / "run", settings=SETTINGS, progress=False)
    L, H = vit.num_layers, vit.num_heads
    heads = run.heads
    assert len(heads) == L * H and run.manifest["status"] == "complete"
    images = run.table("images")
    assert len(images) == 6
    # The stored unpruned probabilities equal the model's own on the same preprocessed pixels.
    from vitscope.data import iter_batches, load_images

    ids, probs = [], []
    for batch in iter_batches(load_images(folder, class_names=vit.class_names), vit.preprocessing, batch_size=6):
        with torch.no_grad():
            p = vit.logits(batch.x).double().softmax(-1)
        ids += batch.image_ids
        probs += p[torch.arange(len(p)), batch.labels].tolist()
    stored = images.set_index("image_id").loc[ids, "base_prob"].to_numpy()
    np.testing.assert_allclose(stored, probs, rtol=0, atol=1e-6)
    # Every head has a strength profile and an importance value; CLS measures exist only with a CLS token.
    assert np.isfinite(heads["entropy_mean"]).all()
    has_cls = vit.layout.cls_index is not None
    assert np.isfinite(heads["cls_self_mean"]).all() == has_cls
    assert run.manifest["model"]["layout"]["num_prefix"] == vit.layout.num_prefix
    # The app offers the partial-pruning modes this layout has, and the live answer has the same.
    from fastapi.testclient import TestClient

    from vitscope.capture.masks import regions_for
    from vitscope.server.app import create_app

    client = TestClient(create_app(run.path, vit, warm=False))
    want = ["none", *regions_for(vit.layout)]
    assert [m["region"] for m in client.get("/api/run").json()["modes"]] == want
    live = client.get(f"/api/live/partial_pruning/{ids[0]}/{L - 1}/0").json()
    assert [m["region"] for m in live["modes"]] == want


def _hf_backbone(family: str):
    import transformers as tr

    c = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8)
    torch.manual_seed(0)
    model = {
        "hf-clip-vision": lambda: tr.CLIPVisionModel(tr.CLIPVisionConfig(**c)),
        "hf-siglip-vision": lambda: tr.SiglipVisionModel(tr.SiglipVisionConfig(**c)),
        "hf-vit-mae": lambda: tr.ViTMAEModel(tr.ViTMAEConfig(**c, mask_ratio=0.0)),
        "hf-dinov2-registers": lambda: tr.Dinov2WithRegistersModel(tr.Dinov2WithRegistersConfig(**c, num_register_tokens=2)),
        "hf-dinov3": lambda: tr.DINOv3ViTModel(tr.DINOv3ViTConfig(**c, num_register_tokens=2)),
    }[family]()
    return _randomise(model)


BACKBONES = {
    "timm-dinov3": lambda: _timm("vit_small_patch16_dinov3", img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2, num_classes=0),
    "timm-eva02": lambda: _timm("eva02_tiny_patch14_224", img_size=28, patch_size=7, depth=2, num_classes=0),
    **{name: (lambda name=name: _hf_backbone(name)) for name in ("hf-clip-vision", "hf-siglip-vision", "hf-vit-mae", "hf-dinov2-registers", "hf-dinov3")},
}


@pytest.mark.parametrize("family", list(BACKBONES))
def test_analyze_runs_on_every_backbone_by_its_embedding(family, folder, tmp_path):
    """Backbones without a classifier: ``objective="embedding"`` runs every analysis, and the stored
    embedding change of a head equals 1 - cos of the masked model's embedding."""
    import dataclasses

    import torch.nn.functional as F

    vit = vitscope.load_model(BACKBONES[family](), device="cpu")
    assert not vit.num_classes
    run = vitscope.analyze(vit, folder, tmp_path / "run", settings=dataclasses.replace(SETTINGS, objective="embedding"), progress=False)
    assert run.manifest["status"] == "complete" and len(run.heads) == vit.num_layers * vit.num_heads
    from vitscope.data import iter_batches, load_images

    batch = next(iter_batches(load_images(folder), vit.preprocessing, batch_size=6))
    ih = run.table("image_heads").set_index(["layer", "head", "image_id"]).sort_index()
    base = vit.embeddings(batch.x).double()
    pruned = vit.embeddings(batch.x, masks={(1, 0): "all"}).double()
    want = (1 - F.cosine_similarity(pruned, base, dim=1)).numpy()
    got = ih.loc[(1, 0)].loc[batch.image_ids, "embedding_change"].to_numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-9)

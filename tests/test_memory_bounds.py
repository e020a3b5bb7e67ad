"""Runs of long-sequence models stay within one layer's maps: the per-run mean attention matrix
(L x H x T x T) is left out above a size bound, and the run is otherwise the same."""

from __future__ import annotations

import numpy as np

import vitscope
from vitscope.analysis.settings import AnalyzeSettings
from vitscope.pipeline import batch as batch_step


def test_mean_attention_is_left_out_for_long_sequences(tmp_path, monkeypatch):
    settings = AnalyzeSettings(batch_size=4, n_boot=10, ae_epochs=1, ae_min_steps=4, n_clusters=2, curve_images=3, curve_points=3, projection="pca")
    full = vitscope.analyze("fmnist_vit_tiny", "sample", tmp_path / "full", limit=8, settings=settings, progress=False)
    L, H, T = 6, 4, 50
    assert batch_step.keeps_mean_attention(L, H, T) and "attention_mean" in full.arrays()
    monkeypatch.setattr(batch_step, "MEAN_ATTENTION_MAX_CELLS", L * H * T * T - 1)  # as if the sequence were long
    bounded = vitscope.analyze("fmnist_vit_tiny", "sample", tmp_path / "bounded", limit=8, settings=settings, progress=False)
    assert "attention_mean" not in bounded.arrays() and bounded.manifest["status"] == "complete"
    for name in ("heads", "image_heads", "images"):
        a, b = full.table(name), bounded.table(name)
        assert a.drop(columns=["path"], errors="ignore").equals(b.drop(columns=["path"], errors="ignore")), name
    np.testing.assert_array_equal(full.array("patterns/patch/codes")[...], bounded.array("patterns/patch/codes")[...])
    from vitscope.server.app import create_app
    from fastapi.testclient import TestClient

    info = TestClient(create_app(bounded.path, warm=False)).get("/api/run").json()
    assert info["capabilities"]["attention_mean"] is False


def test_max_memory_sizes_the_batch_or_says_what_to_change(tmp_path):
    import pytest

    from vitscope.pipeline.memory import estimate_memory, fit_batch_size, parse_size

    assert parse_size("8G") == 8 << 30 and parse_size("512MB") == 512 << 20 and parse_size("1.5GiB") == 3 << 29
    assert parse_size(1000) == 1000 and parse_size("1000") == 1000
    with pytest.raises(ValueError, match="cannot read '8 apples' as a memory size; write e.g. 8G"):
        parse_size("8 apples")
    vit = vitscope.load_model("fmnist_vit_tiny", device="cpu")
    est = estimate_memory(vit)
    assert est.per_image > 0 and est.weights == sum(p.numel() * 4 for p in vit.module.parameters())
    assert fit_batch_size(vit, 32, est.batch(3) + 1) == 3
    assert fit_batch_size(vit, 2, "64G") == 2  # never above the batch asked for
    with pytest.raises(ValueError, match=r"needs about .* for one image .* more than --max-memory .* Raise --max-memory"):
        fit_batch_size(vit, 32, est.weights + est.per_image - 1)
    settings = AnalyzeSettings(batch_size=8, n_boot=10, ae_epochs=1, ae_min_steps=4, n_clusters=2, curve_images=3, curve_points=3, projection="pca")
    run = vitscope.analyze("fmnist_vit_tiny", "sample", tmp_path / "run", limit=6, settings=settings, progress=False,
                           max_memory=est.batch(3) + 1)
    assert run.manifest["settings"]["batch_size"] == 3 and run.manifest["chunks"]["count"] == 2

"""`vitscope analyze --interactions`: Paper 2's patch interactions in a run folder, and their report figures.

Checked against independent references: the stored interaction mean/std and per-image key importance
against `first_order_impact` on all images in one batch; the per-image field sizes against
`image_fields` image by image; resumption (interrupted in the chunked stage and in the final
interaction step) against an uninterrupted run.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from vitscope.store import RunMismatchError, RunStore, UnfinishedRunError, open_run
from interruption import interrupt_at_call

N_IMAGES = 40
INTERACTION_TABLES = ("interaction_layers", "field_image_queries", "field_image_layers", "field_queries", "field_layers",
                      "window_curve", "removal_curve", "removal_summary", "interaction_agreement")
INTERACTION_ARRAYS = ("interaction_mean", "interaction_std", "interaction_sem", "interaction_p", "interaction_q",
                      "interaction_significant", "interaction_abs_mean", "interaction_key_importance",
                      "field_image_dx", "field_image_dy", "field_image_size")


# Many small forwards: one thread avoids thread start-up costs (shared fixture in conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


def _settings(**kw):
    from vitscope.pipeline import AnalyzeSettings

    base = dict(batch_size=16, n_boot=50, n_clusters=3, curve_points=3, latent_dim=4, ae_epochs=2, ae_min_steps=20,
                projection="pca", curve_images=12, interactions=True)
    base.update(kw)
    return AnalyzeSettings(**base)


def _analyze(out, **kw):
    from vitscope.pipeline import analyze

    return analyze("fmnist_vit_tiny", "sample", out, limit=N_IMAGES, settings=_settings(**kw), progress=False, device="cpu")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return _analyze(tmp_path_factory.mktemp("interactions") / "run")


def _assert_interactions_equal(a, b, tol: float = 1e-9) -> None:
    for name in INTERACTION_TABLES:
        x, y = a.table(name), b.table(name)
        assert list(x.columns) == list(y.columns), name
        pd.testing.assert_frame_equal(x, y, check_exact=False, rtol=tol, atol=tol, obj=name)
    for name in INTERACTION_ARRAYS:
        np.testing.assert_allclose(a.array(name)[...], b.array(name)[...], rtol=tol, atol=tol, err_msg=name)


def test_settings_switch():
    from vitscope.pipeline import AnalyzeSettings

    assert AnalyzeSettings().interactions is False  # opt-in: the default run costs what it did
    AnalyzeSettings(interactions=True).validate()
    with pytest.raises(ValueError, match="interactions must be True or False"):
        AnalyzeSettings(interactions=1).validate()  # type: ignore[arg-type]


def test_outputs_exist_with_sane_shapes(run):
    from vitscope.models import load_model

    vit = load_model("fmnist_vit_tiny", device="cpu")
    L, P = vit.num_layers, vit.layout.num_patches
    n = len(run.images)
    assert n == N_IMAGES and run.manifest["settings"]["interactions"] is True
    assert run.manifest["chunks"]["count"] >= 2
    for name in ("interaction_mean", "interaction_std", "interaction_p", "interaction_q", "interaction_significant", "interaction_abs_mean"):
        assert run.array(name).shape == (L, P, P), name
    p = run.array("interaction_p")[...]
    q = run.array("interaction_q")[...]
    assert ((p >= 0) & (p <= 1)).all() and (q >= p - 1e-12).all()
    assert run.array("interaction_key_importance").shape == (n, P)
    for k in ("dx", "dy", "size"):
        assert run.array(f"field_image_{k}").shape == (L, P)
    layers = run.table("interaction_layers")
    assert list(layers["layer"]) == list(range(L)) and (layers["n_images"] == n).all()
    for name in ("field_image_queries", "field_queries"):
        t = run.table(name)
        assert len(t) == L * P and {"layer", "query", "row", "col", "size", "dx", "dy"} <= set(t.columns), name
    for name in ("field_image_layers", "field_layers"):
        assert list(run.table(name)["layer"]) == list(range(L)), name
    wc = run.table("window_curve")
    assert {"full", "window", "indicator", "indicator_pooled"} <= set(wc["method"])
    assert (wc["n_images"] == 6).all()  # the evaluation half of the 12-image curve subset
    assert wc["accuracy"].between(0, 1).all()
    # Attention restricted to a window that covers the grid is the unrestricted model.
    full = wc[wc["method"] == "full"]["accuracy"].iloc[0]
    assert np.isclose(wc[(wc["method"] == "window") & (wc["k"] == wc["k"].max())]["accuracy"].iloc[0], full)
    rc = run.table("removal_curve")
    assert {"impact", "impact_dataset", "cls_attention", "random"} <= set(rc["method"])
    assert set(rc[rc["method"] == "random"]["seed"]) == {0, 1, 2}
    assert (rc[rc["rate"] == 0]["agreement"] == 1).all()  # nothing removed: predictions unchanged
    ag = run.table("interaction_agreement")
    assert set(ag["layer"]) == set(range(L)) and ag["image_id"].nunique() == 4
    assert set(ag["image_id"]) <= set(run.images["image_id"])
    with pytest.raises(KeyError, match="no table 'nope'"):
        run.table("nope")


def test_numbers_match_a_direct_computation(run):
    from vitscope.analysis.fields import image_fields
    from vitscope.analysis.interaction import first_order_impact, key_importance
    from vitscope.data import iter_batches, load_images
    from vitscope.models import load_model

    vit = load_model("fmnist_vit_tiny", device="cpu")
    image_set = load_images("sample", limit=N_IMAGES, class_names=vit.class_names)
    x = torch.cat([b.x for b in iter_batches(image_set.records, vit.preprocessing, batch_size=N_IMAGES)])
    targets = np.array(run.images["target"], dtype=np.int64)
    r = first_order_impact(vit, x, targets)  # every image in one batch, unlike the chunked run
    impact = r["impact"].astype(np.float64)
    np.testing.assert_allclose(run.array("interaction_mean")[...], impact.mean(0), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(run.array("interaction_std")[...], impact.std(0, ddof=1), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(run.array("interaction_abs_mean")[...], np.abs(impact).mean(0), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(run.array("interaction_key_importance")[...], key_importance(r["impact"], r["prefix_impact"]), rtol=1e-4, atol=1e-6)
    sizes = np.mean([image_fields(impact[b], vit.layout)[1]["size"] for b in range(len(impact))], axis=0)
    np.testing.assert_allclose(run.array("field_image_size")[...], sizes, rtol=1e-9)


def test_report_draws_the_interaction_figures(run, tmp_path):
    from vitscope.report import write_report

    index = write_report(run, tmp_path / "report", svg=True)
    page = index.read_text()
    for stem in ("field_arrows", "field_flow", "field_growth", "window_curve", "removal_curve", "interaction_agreement"):
        for fmt in ("png", "svg"):
            assert (tmp_path / "report" / f"{stem}.{fmt}").stat().st_size > 1000, (stem, fmt)
        assert f'id="{stem}"' in page, stem


@pytest.mark.parametrize("stage", ["chunk", "final"])
def test_interrupted_run_resumes_to_the_same_interactions(stage, run, tmp_path, monkeypatch):
    from vitscope.analysis import interaction, windows

    name, when = {"chunk": ("first_order_impact", 2), "final": ("removal_curve", 1)}[stage]
    interrupt_at_call(monkeypatch, interaction if stage == "chunk" else windows, name, when)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        _analyze(out)
    with pytest.raises(UnfinishedRunError):
        open_run(out)
    if stage == "chunk":
        assert RunStore(out).done_chunks() == [0]
    else:
        assert RunStore(out).has_table("window_curve") and not RunStore(out).has_table("removal_curve")
    with pytest.raises(RunMismatchError, match="interactions"):
        _analyze(out, interactions=False)  # the switch is part of the run's fingerprint
    resumed = _analyze(out)
    assert resumed.manifest["resumed"] == 1
    _assert_interactions_equal(resumed, run)

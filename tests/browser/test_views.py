"""Each view in headless Chromium shows the run's numbers and the model's: what a view draws (the rows
behind it, and the values on its marks) equals the run's Parquet/zarr files read here with pandas and
zarr, and the live parts equal vitscope's library functions called here on the model (1e-4). Clicks
on the views change the shared selection, and every view that depends on it follows."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import zarr

import vitscope
from harness import select, shot, wait_drawn

TOL = 1e-4


def _rows(pg, view: str) -> pd.DataFrame:
    rows = pg.evaluate("(v) => window.vitscope.table(v)", view)
    assert rows, f"view {view} shows no rows"
    return pd.DataFrame(rows)


def _images(run_dir) -> pd.DataFrame:
    return pd.read_parquet(run_dir / "images.parquet").set_index("image_id")


def _label(images: pd.DataFrame, image_id: int):
    v = images.loc[image_id, "label"]
    return None if pd.isna(v) else int(v)


def _counts(pg) -> dict:
    return pg.evaluate("() => ({...window.vitscope.drawn.count})")


def test_head_importance_shows_the_heads_table_and_the_images_pruned_probabilities(page, open_app, browser_run):
    heads = pd.read_parquet(browser_run / "heads.parquet").set_index(["layer", "head"])
    ih = pd.read_parquet(browser_run / "image_heads.parquet").set_index(["image_id", "layer", "head"])
    image = int(_images(browser_run).index[4])
    open_app(page)
    for metric in ("prob_drop", "acc_drop", "taylor", "loss_increase"):
        page.select_option('[data-role="metric"]', metric)
        select(page, image=image, layer=3, head=2)
        got = _rows(page, "head-importance").set_index(["layer", "head"])
        assert len(got) == len(heads)
        for col, want in (("mean", metric), ("lo", metric + "_lo"), ("hi", metric + "_hi")):
            np.testing.assert_allclose(got[col].astype(float), heads.loc[got.index, want], atol=TOL, err_msg=f"{metric} {col}")
        want_pp = [ih.loc[(image, layer, head), "pruned_prob"] for layer, head in got.index]
        np.testing.assert_allclose(got["pruned_prob"].astype(float), want_pp, atol=TOL)
        assert got["selected"].sum() == 1 and got.loc[(3, 2), "selected"]
    assert page.locator('[data-role="head-label"]').inner_text() == "L3 H2"
    shown = float(page.locator('[data-role="pruned-prob"]').inner_text())
    assert abs(shown - ih.loc[(image, 3, 2), "pruned_prob"]) < 1e-3


def test_partial_pruning_bars_and_top5_equal_the_library(page, open_app, browser_run, vit):
    images = _images(browser_run)
    open_app(page)
    for image, layer, head, mode in [(int(images.index[2]), 1, 3, 4), (int(images.index[9]), 5, 0, 6), (int(images.index[0]), 0, 1, 2)]:
        select(page, image=image, layer=layer, head=head, mode=mode)
        want = vitscope.partial_pruning(vit, images.loc[image, "path"], layer, head, label=_label(images, image))
        bars = page.locator('[data-role="partial-pruning"] .bar')
        assert bars.count() == 6
        got = [float(bars.nth(i).get_attribute("data-prob")) for i in range(6)]
        np.testing.assert_allclose(got, want["label_prob"], atol=TOL)
        assert [int(bars.nth(i).get_attribute("data-mode")) for i in range(6)] == list(want["mode"])
        # The selected mode's bar is marked, and the top-5 list is that mode's.
        assert "sel" in bars.nth(mode - 1).get_attribute("class")
        top = page.locator('[data-role="top5"] li')
        w = want.set_index("mode").loc[mode]
        assert [int(top.nth(i).get_attribute("data-class")) for i in range(top.count())] == list(w["top_classes"])
        np.testing.assert_allclose([float(top.nth(i).get_attribute("data-prob")) for i in range(top.count())], w["top_probs"], atol=TOL)
    # A click on a bar chooses the mode.
    bars.nth(2).click()
    assert page.evaluate("() => window.vitscope.selection().mode") == 3
    shot(page, "view-head-importance-live", '[data-view="head-importance"]')


def test_image_view_overlays_the_runs_explanation_maps(page, open_app, browser_run):
    """The overlay is the run's stored map of the selected image: one pixel per patch, brighter where
    the map is larger (inferno's lightness rises with the value)."""
    from scipy.stats import spearmanr

    image = int(_images(browser_run).index[5])
    row = list(_images(browser_run).index).index(image)
    open_app(page)
    select(page, image=image)
    options = page.locator('[data-role="explain-method"] option').all_inner_texts()
    assert options[0] == "no overlay" and sorted(options[1:]) == ["relevance", "rollout"]
    page.select_option('[data-role="explain-method"]', "relevance")
    want = np.asarray(zarr.open_group(str(browser_run / "arrays.zarr"), mode="r")["explain/relevance"][row], dtype=float)
    rows, cols = want.shape
    page.wait_for_function("([c]) => document.querySelector('[data-role=\"explain-overlay\"]').width === c", arg=[cols])
    pixels = np.asarray(page.evaluate("""() => {
        const c = document.querySelector('[data-role="explain-overlay"]');
        return Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data);
    }"""), dtype=float).reshape(rows, cols, 4)
    lightness = pixels[..., :3] @ np.array([0.299, 0.587, 0.114])
    assert spearmanr(lightness.ravel(), want.ravel())[0] > 0.98
    assert np.unravel_index(lightness.argmax(), lightness.shape) == np.unravel_index(want.argmax(), want.shape)
    shot(page, "image-explanation-overlay", '[data-role="image-detail"]')


def test_attention_strength_shows_the_runs_measures_and_hop_profiles(page, open_app, browser_run):
    heads = pd.read_parquet(browser_run / "heads.parquet").set_index(["layer", "head"])
    ih = pd.read_parquet(browser_run / "image_heads.parquet").set_index(["image_id", "layer", "head"])
    image = int(_images(browser_run).index[7])
    open_app(page)
    for measure in ("entropy", "mean_distance"):
        page.select_option('[data-role="strength-measure"]', measure)
        select(page, image=image, layer=4, head=1)
        got = _rows(page, "attention-strength").set_index(["layer", "head"])
        for col in ("median", "q25", "q75"):
            np.testing.assert_allclose(got[col].astype(float), heads.loc[got.index, f"{measure}_{col}"], atol=TOL)
        want = [ih.loc[(image, layer, head), measure] for layer, head in got.index]
        np.testing.assert_allclose(got["image_value"].astype(float), want, atol=TOL)
    dots = page.locator('[data-role="hop-profile"] circle[data-hop]')
    want_hop = np.asarray(ih.loc[(image, 4, 1), "hop_profile"], dtype=float)
    assert dots.count() == len(want_hop)
    np.testing.assert_allclose([float(dots.nth(i).get_attribute("data-value")) for i in range(dots.count())], want_hop, atol=TOL)


def test_attention_pattern_matrix_and_edges_equal_the_model(page, open_app, browser_run, vit):
    images = _images(browser_run)
    image = int(images.index[3])
    open_app(page)
    threshold = 0.05
    select(page, image=image, layer=2, head=3, query=11, threshold=threshold)
    got = _rows(page, "attention-pattern")
    T = vit.num_tokens
    assert len(got) == T * T and set(got["source"]) == {"live"}
    want = vit.attention(vit.preprocess([images.loc[image, "path"]]))[0, 2, 3].numpy()
    m = np.zeros((T, T))
    m[got["query_token"].astype(int), got["key_token"].astype(int)] = got["attention"].astype(float)
    np.testing.assert_allclose(m, want, atol=TOL)
    # Edge counts of the bipartite view at the threshold: CLS edges touch a prefix token.
    pre = vit.layout.num_prefix
    above = want >= threshold
    cls_edges = int(above[:pre].sum() + above[pre:, :pre].sum())
    patch_edges = int(above[pre:, pre:].sum())
    assert page.locator('[data-role="cls-edges"]').inner_text().endswith(str(cls_edges))
    assert page.locator('[data-role="patch-edges"]').inner_text().endswith(str(patch_edges))
    # The cluster shown is the (image, head)'s cluster in the catalogue.
    patterns = pd.read_parquet(browser_run / "patterns.parquet")
    row = patterns[(patterns["kind"] == "patch") & (patterns["image_id"] == image) & (patterns["layer"] == 2) & (patterns["head"] == 3)]
    assert page.locator('[data-role="cluster"]').inner_text().startswith(str(int(row["cluster"].iloc[0])))
    # Clicking a patch of the image makes it the source; the views redraw for it.
    box = page.locator('[data-role="pattern-image"] canvas').bounding_box()
    rows_, cols_ = vit.layout.grid
    r, c = 1, 5
    page.mouse.click(box["x"] + (c + 0.5) * box["width"] / cols_, box["y"] + (r + 0.5) * box["height"] / rows_)
    wait_drawn(page)
    assert page.evaluate("() => window.vitscope.selection().query") == r * cols_ + c
    shot(page, "view-attention-pattern-selected", '[data-view="attention-pattern"]')


def test_without_a_model_the_pattern_view_shows_the_runs_mean_map(page, open_app, make_server, browser_run):
    srv = make_server(browser_run, None, live_reason="the server was started with --no-model; restart it without --no-model")
    open_app(page, srv)
    select(page, layer=1, head=2)
    got = _rows(page, "attention-pattern")
    assert set(got["source"]) == {"mean"}
    want = np.asarray(zarr.open_group(str(browser_run / "arrays.zarr"), mode="r")["attention_mean"][1, 2])
    T = want.shape[0]
    m = np.zeros((T, T))
    m[got["query_token"].astype(int), got["key_token"].astype(int)] = got["attention"].astype(float)
    np.testing.assert_allclose(m, want, atol=TOL)
    # And the interaction view its set-mean impacts.
    select(page, ilayer=3, query=7)
    got = _rows(page, "patch-interactions")
    want = np.asarray(zarr.open_group(str(browser_run / "arrays.zarr"), mode="r")["interaction_mean"][3, 7])
    assert set(got["source"]) == {"mean"}
    np.testing.assert_allclose(got.sort_values("key_patch")["impact"].astype(float), want, rtol=1e-5, atol=1e-9)


def test_patch_interactions_live_impact_and_fields_equal_the_library(page, open_app, browser_run, vit):
    from vitscope.analysis.interaction import first_order_impact

    images = _images(browser_run)
    image = int(images.index[5])
    open_app(page)
    select(page, image=image, ilayer=4, query=20)
    got = _rows(page, "patch-interactions").sort_values("key_patch")
    assert set(got["source"]) == {"live"}
    want = first_order_impact(vit, vit.preprocess([images.loc[image, "path"]]), targets=[_label(images, image)])["impact"][0, 4, 20]
    np.testing.assert_allclose(got["impact"].astype(float), want, rtol=1e-4, atol=1e-8)
    g = zarr.open_group(str(browser_run / "arrays.zarr"), mode="r")
    np.testing.assert_allclose(got["field_dx"].astype(float), np.asarray(g["field_image_dx"][4]), atol=TOL)
    np.testing.assert_allclose(got["field_dy"].astype(float), np.asarray(g["field_image_dy"][4]), atol=TOL)
    # The layer selector and a click on the map drive the view.
    page.select_option('[data-role="interaction-layer"]', "1")
    box = page.locator('[data-role="interaction-image"] canvas').bounding_box()
    page.mouse.click(box["x"] + 2, box["y"] + 2)
    wait_drawn(page)
    s = page.evaluate("() => window.vitscope.selection()")
    assert s["ilayer"] == 1 and s["query"] == 0
    assert page.locator('[data-role="window-curve"] path').count() >= 2
    assert page.locator('[data-role="removal-curve"] path').count() >= 2


def test_clicks_link_the_views(page, open_app, browser_run):
    images = _images(browser_run)
    open_app(page, hash="image=%d&layer=0&head=0" % int(images.index[0]))
    # A click on a cell of the layers x heads grid selects that head; every head-dependent view redraws.
    before = _counts(page)
    grid = page.locator('[data-role="grid-metric"]')
    box = grid.bounding_box()
    cell = (box["width"] - 24) / 4  # H = 4; the grid has a 20 px label margin and 4 px slack
    page.mouse.click(box["x"] + 20 + 2.5 * cell, box["y"] + 12 + 3.5 * cell)
    wait_drawn(page)
    s = page.evaluate("() => window.vitscope.selection()")
    assert (s["layer"], s["head"]) == (3, 2)
    after = _counts(page)
    for view in ("head-importance", "attention-strength", "attention-pattern"):
        assert after[view] > before[view], f"{view} did not redraw for the new head"
    assert "L3 H2" in page.locator('[data-view="attention-strength"] header').inner_text()
    # Searching a class name and pressing Enter picks an image of that class; the detail shows it.
    name = str(images["label_name"].iloc[6])
    page.fill('[data-role="image-search"]', name.lower())
    page.press('[data-role="image-search"]', "Enter")
    wait_drawn(page)
    image = page.evaluate("() => window.vitscope.selection().image")
    assert name.lower() in (str(images.loc[image, "label_name"]) + str(images.loc[image, "prediction_name"])).lower()
    assert page.locator('[data-role="label"]').inner_text() == str(images.loc[image, "label_name"])
    assert page.locator('[data-role="prediction"]').inner_text() == str(images.loc[image, "prediction_name"])
    assert abs(float(page.locator('[data-role="probability"]').inner_text()) - images.loc[image, "probability"]) < 1e-3
    # A click on a dot of the overview selects the nearest image.
    rows = _rows(page, "image-overview")
    assert rows["selected"].sum() == 1 and int(rows.loc[rows["selected"], "image_id"].iloc[0]) == image
    canvas = page.locator('[data-role="overview-canvas"]')
    box = canvas.bounding_box()
    page.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    wait_drawn(page)
    # The colour toggle switches to correct / incorrect.
    page.select_option('[data-role="colour-by"]', "correct")
    wait_drawn(page)
    assert page.evaluate("() => window.vitscope.selection().colour") == "correct"
    shot(page, "app-linked")


@pytest.fixture(scope="module")
def winft_run(tmp_path_factory):
    """A run of a WinfT with random per-layer masks (random weights), and the masks themselves."""
    import timm
    import torch

    from vitscope.pipeline import AnalyzeSettings
    from vitscope.models.builtin import fmnist_pretrained_cfg
    from vitscope.training import ModelSpec, save_weights

    gen = torch.Generator().manual_seed(3)
    L, P = 6, 49
    masks = (torch.rand(L, P, P, generator=gen) < 0.3) | torch.eye(P, dtype=torch.bool)
    torch.manual_seed(0)
    model = timm.create_model("winft_fmnist_tiny", masks=masks)
    folder = tmp_path_factory.mktemp("winft")
    weights = folder / "winft.safetensors"
    save_weights(model, weights, ModelSpec("winft_fmnist_tiny", {}), fmnist_pretrained_cfg(), [str(i) for i in range(10)])
    settings = AnalyzeSettings(batch_size=8, n_boot=20, curve_images=8, curve_points=2, ae_epochs=1, ae_min_steps=5, projection="pca", n_clusters=2)
    run = vitscope.analyze(str(weights), "sample", folder / "run", limit=8, settings=settings, device="cpu", progress=False)
    return run.path, weights, masks.numpy()


def test_patch_interactions_show_a_winft_runs_masks(page, open_app, make_server, winft_run):
    run_dir, weights, masks = winft_run
    srv = make_server(run_dir, vitscope.load_model(str(weights), device="cpu"))
    open_app(page, srv)
    assert page.evaluate("async () => (await (await fetch('/api/run')).json()).capabilities.winft") is True
    for layer, query in ((0, 0), (3, 10), (5, 48)):
        select(page, ilayer=layer, query=query)
        got = _rows(page, "patch-interactions").sort_values("key_patch")
        np.testing.assert_array_equal(got["winft_allowed"].astype(bool).to_numpy(), masks[layer, query])
        keys = int(page.locator('[data-role="winft-keys"]').get_attribute("data-keys"))
        assert keys == int(masks[layer, query].sum()), (layer, query, keys)
    text = page.locator('[data-view="patch-interactions"]').inner_text()
    assert f"{masks[5].sum(-1).mean():.3f} per query in this layer" in text
    shot(page, "view-patch-interactions-winft", '[data-view="patch-interactions"]')


def test_a_backbone_run_by_its_embedding_shows_embedding_changes(page, open_app, make_server, tmp_path):
    """A run of a backbone without a classifier (``--objective embedding``): the app opens without
    errors, the metric selector has the embedding change, the per-image grid shows each head's
    embedding change (equal to the run's table) and the image view says why it has no prediction."""
    import torch
    from timm.models.vision_transformer import VisionTransformer

    from vitscope.pipeline import AnalyzeSettings

    torch.manual_seed(2)
    model = VisionTransformer(img_size=28, patch_size=7, in_chans=3, num_classes=0, embed_dim=32, depth=2, num_heads=2)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    settings = AnalyzeSettings(batch_size=6, n_boot=20, ae_epochs=1, ae_min_steps=4, n_clusters=2, curve_images=3,
                               curve_points=3, projection="pca", objective="embedding")  # fmt: skip
    run = vitscope.analyze(model.eval(), "sample", tmp_path / "run", limit=8, settings=settings, progress=False)
    srv = make_server(run.path, None, live_reason="no model in this test")
    open_app(page, srv)
    options = page.locator('[data-role="metric"] option').all_inner_texts()
    assert any("embedding change" in o for o in options)
    page.select_option('[data-role="metric"]', "embedding_change")
    image = int(run.images["image_id"].iloc[3])
    select(page, image=image, layer=1, head=1)
    got = _rows(page, "head-importance").set_index(["layer", "head"])
    ih = run.table("image_heads").set_index(["image_id", "layer", "head"])
    want = [ih.loc[(image, layer, head), "embedding_change"] for layer, head in got.index]
    np.testing.assert_allclose(got["embedding_change"].astype(float), want, rtol=1e-5, atol=1e-9)
    assert "No prediction" in page.locator('[data-role="no-classifier"]').inner_text()
    shot(page, "view-image-overview-embedding-objective", '[data-view="image-overview"]')


def test_a_model_whose_readout_attends_shows_its_readout_heads(page, open_app, make_server, tmp_path):
    """A CaiT run: the importance view adds its readout layers (class attention) as a readout layer x
    head grid, with the values of the run's ``readout_heads`` table."""
    import timm
    import torch

    from vitscope.pipeline import AnalyzeSettings

    torch.manual_seed(3)
    model = timm.create_model("cait_xxs24_224", pretrained=False, img_size=32, patch_size=8, depth=2, depth_token_only=2, num_classes=10)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("gamma_1", "gamma_2")):
                p.fill_(1.0)  # (so the readout heads matter)
    settings = AnalyzeSettings(batch_size=6, n_boot=20, ae_epochs=1, ae_min_steps=4, n_clusters=2, curve_images=3,
                               curve_points=3, projection="pca")  # fmt: skip
    run = vitscope.analyze(model.eval(), "sample", tmp_path / "run", limit=8, settings=settings, progress=False)
    srv = make_server(run.path, None, live_reason="no model in this test")
    open_app(page, srv)
    grid = page.locator('[data-role="readout-heads"] canvas')
    grid.wait_for()
    assert grid.get_attribute("data-metric") == "prob_drop"
    rh = run.table("readout_heads").sort_values(["readout_layer", "head"])
    np.testing.assert_allclose(json.loads(grid.get_attribute("data-values")), rh["prob_drop"].to_numpy(), rtol=1e-6, atol=1e-12)
    assert "readout layers" in page.locator('[data-role="readout-heads"]').inner_text()
    box, panel = grid.bounding_box(), page.locator('[data-view="head-importance"]').bounding_box()
    assert box["height"] > 10 and box["y"] + box["height"] <= panel["y"] + panel["height"], (box, panel)  # drawn, and not cut off
    shot(page, "view-head-importance-readout-layers", '[data-view="head-importance"]')

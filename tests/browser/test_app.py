"""The app as a whole in headless Chromium: it loads, every view draws, the selection lives in the URL,
the keyboard drives it, exports are valid files, it fits one 1920x1080 screen, and it degrades in
place when the run or the server lacks something."""

from __future__ import annotations

import io
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pandas as pd
import pytest
from PIL import Image

import vitscope
from harness import ARTIFACTS, READY_TIMEOUT_MS, VIEWS, select, shot, wait_drawn


def _selection(pg) -> dict:
    return pg.evaluate("() => window.vitscope.selection()")


def _hash_state(pg) -> dict:
    h = pg.evaluate("() => window.location.hash").lstrip("#")
    return {k: v[0] for k, v in parse_qs(h).items()}


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory) -> Path:
    """A run without patch interactions (12 images, fast settings)."""
    from vitscope.pipeline import AnalyzeSettings

    settings = AnalyzeSettings(batch_size=12, n_boot=20, curve_images=6, curve_points=2, ae_epochs=1, ae_min_steps=10, projection="pca", n_clusters=2)
    out = tmp_path_factory.mktemp("plain") / "run"
    return Path(vitscope.analyze("fmnist_vit_tiny", "sample", out, limit=12, settings=settings, device="cpu", progress=False).path)


def test_every_view_draws_and_the_app_fits_one_screen(page, open_app, browser_run):
    open_app(page)
    for view in VIEWS:
        el = page.locator(f'[data-view="{view}"]')
        assert el.count() == 1, f"view {view} is missing"
        assert int(el.get_attribute("data-drawn") or 0) >= 1, f"view {view} never drew"
        box = el.bounding_box()
        assert box and box["width"] > 200 and box["height"] > 150, f"view {view} is too small: {box}"
        assert box["x"] >= 0 and box["y"] >= 0 and box["x"] + box["width"] <= 1920 + 0.5 and box["y"] + box["height"] <= 1080 + 0.5, f"view {view} leaves the screen: {box}"
    size = page.evaluate("() => [document.documentElement.scrollWidth, document.documentElement.scrollHeight]")
    assert size[0] <= 1920 and size[1] <= 1080, f"the page scrolls: {size}"
    header = page.locator("header.top").inner_text()
    assert "fmnist_vit_tiny" in header and "24 images" in header
    shot(page, "app")
    for view in VIEWS:
        shot(page, f"view-{view}", f'[data-view="{view}"]')


def test_ready_means_every_view_has_drawn_its_data_and_each_start_up_request_goes_once(page, server, browser_run):
    """`ready` is set only once every view has drawn what the first selection asks of it, the live
    model's answers included, even when they come last; the requests the index page preloads are
    each sent once (the app's own fetches are answered by the preloads)."""
    image = int(pd.read_parquet(browser_run / "images.parquet")["image_id"].iloc[3])
    sent: list[str] = []
    page.on("request", lambda req: sent.append(urlsplit(req.url).path))
    # A selection the server did not prepare at start-up, and the model busy for a while: the live
    # answers arrive well after every table and array.
    busy = server.app.state.live.worker.executor.submit(time.sleep, 1.5)
    page.goto(server.url + f"#image={image}&layer=1&head=2&ilayer=2&query=5")
    page.wait_for_function("() => window.vitscope && window.vitscope.ready === true", timeout=READY_TIMEOUT_MS)
    assert busy.done()
    state = page.evaluate(
        """() => ({
            pending: [...window.vitscope.drawn.pending],
            counts: window.vitscope.drawn.count,
            pattern: window.vitscope.table("attention-pattern")[0],
            interaction: window.vitscope.table("patch-interactions")[0],
            modes: document.querySelectorAll('[data-role="partial-pruning"] [data-mode]').length,
        })"""
    )
    assert state["pending"] == [], state["pending"]
    assert all(state["counts"].get(v, 0) >= 1 for v in VIEWS), state["counts"]
    assert state["pattern"].get("source") == "live" and state["pattern"].get("attention") is not None, state["pattern"]
    assert state["interaction"].get("source") == "live" and state["interaction"].get("impact") is not None, state["interaction"]
    assert state["modes"] == 6
    for path in ("/api/run", "/api/table/images", "/api/table/heads", "/api/table/image_heads", "/api/table/patterns"):
        assert sent.count(path) == 1, (path, sent.count(path))


def test_a_permalink_restores_the_whole_selection(page, open_app, browser_run):
    images = pd.read_parquet(browser_run / "images.parquet")
    image = int(images["image_id"].iloc[5])
    want = {"image": image, "layer": 2, "head": 1, "query": 9, "mode": 4, "metric": "acc_drop", "catalogue": "cls", "colour": "correct", "strength": "mean_distance", "ilayer": 3}
    hash_ = "&".join(f"{k}={v}" for k, v in want.items())
    open_app(page, hash=hash_)
    got = _selection(page)
    for k, v in want.items():
        assert got[k] == v, f"{k}: the permalink said {v}, the app has {got[k]}"
    # A changed selection is written back to the URL, and the URL alone restores it in a new page.
    select(page, head=3, query=2)
    url = page.url
    assert _hash_state(page)["head"] == "3" and _hash_state(page)["query"] == "2"
    page.goto("about:blank")
    page.goto(url)
    page.wait_for_function("() => window.vitscope && window.vitscope.ready === true")
    got = _selection(page)
    assert got["head"] == 3 and got["query"] == 2 and got["layer"] == 2 and got["mode"] == 4 and got["image"] == image


def test_a_permalink_out_of_range_is_clamped_to_the_run(page, open_app):
    open_app(page, hash="image=999999&layer=99&head=-4&query=100000&mode=9&metric=nonsense")
    got = _selection(page)
    assert 0 <= got["layer"] < 6 and got["head"] == 0 and 1 <= got["mode"] <= 6
    assert got["metric"] != "nonsense"


def test_the_keyboard_moves_head_layer_and_mode_and_focuses_the_search(page, open_app, vit):
    open_app(page, hash="layer=1&head=0&mode=2")
    page.locator("body").click(position={"x": 5, "y": 1075})
    page.keyboard.press("ArrowRight")
    assert _selection(page)["head"] == 1
    page.keyboard.press("ArrowLeft")
    page.keyboard.press("ArrowLeft")
    assert _selection(page)["head"] == vit.num_heads - 1
    page.keyboard.press("ArrowDown")
    assert _selection(page)["layer"] == 2
    page.keyboard.press("ArrowUp")
    page.keyboard.press("ArrowUp")
    assert _selection(page)["layer"] == 0
    for key in "613":
        page.keyboard.press(key)
        assert _selection(page)["mode"] == int(key)
    page.keyboard.press("/")
    assert page.evaluate("() => document.activeElement && document.activeElement.getAttribute('data-role')") == "image-search"
    # Typing in the search does not move the selection.
    page.keyboard.type("4")
    assert _selection(page)["mode"] == 3
    wait_drawn(page)


def _check_png(data: bytes, what: str) -> None:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{what} is not a PNG"
    im = Image.open(io.BytesIO(data))
    im.load()
    assert im.width > 50 and im.height > 50, f"{what} is only {im.size}"


def _check_svg(data: bytes, what: str) -> None:
    root = ET.fromstring(data)
    assert root.tag.endswith("svg"), f"{what} is not an SVG document"
    assert float(root.get("width")) > 50 and float(root.get("height")) > 50
    assert len(list(root.iter())) > 3, f"{what} is empty"


def _check_html_parts_exported(panel, data: bytes, what: str) -> None:
    """The partial-pruning bars are HTML on screen; the SVG must carry them as rects and text."""
    root = ET.fromstring(data)
    texts = " ".join(t.text or "" for t in root.iter() if t.tag.endswith("text"))
    bars = panel.locator(".bar[data-mode]")
    assert bars.count() == 6, "the partial-pruning bars are not on screen"
    for i in range(bars.count()):
        value = bars.nth(i).locator(".val").inner_text().strip()
        name = bars.nth(i).locator(".name").inner_text().strip()
        assert name in texts and value in texts, f"{what} lacks the bar {name!r} = {value}: {texts[:400]}"
    assert "partial pruning of" in texts, f"{what} lacks the bars' caption"
    fills = [r for r in root.iter() if r.tag.endswith("rect") and r.get("fill") == "rgb(0,114,178)"]
    assert len(fills) >= 5, f"{what} has {len(fills)} blue bar fills, expected one per unselected mode"
    assert any(g.tag.endswith("linearGradient") for g in root.iter()), f"{what} lacks the colour-scale gradients"


def test_every_view_exports_png_svg_and_csv(page, open_app):
    for view in VIEWS:
        # A fresh load per view: Chromium holds back a tab's downloads after many in a row (it would
        # ask the user), which says nothing about the exports themselves.
        open_app(page)
        panel = page.locator(f'[data-view="{view}"]')
        for kind in ("png", "svg", "csv"):
            button = panel.locator(f'header [data-export="{kind}"]')
            assert button.count() == 1, f"view {view} has no {kind.upper()} export"
            try:
                with page.expect_download() as info:
                    button.click()
                download = info.value
            except Exception as e:  # a timeout says nothing about which export
                raise AssertionError(f"view {view}'s {kind.upper()} export gave no download: {e}; page problems: {page.problems.report()}") from None
            path = Path(download.path())
            data = path.read_bytes()
            (ARTIFACTS / f"export-{view}.{kind}").write_bytes(data)
            what = f"{view}'s {kind.upper()} export"
            assert download.suggested_filename.endswith("." + kind), download.suggested_filename
            if kind == "png":
                _check_png(data, what)
            elif kind == "svg":
                _check_svg(data, what)
                if view == "head-importance":
                    _check_html_parts_exported(panel, data, what)
            else:
                df = pd.read_csv(io.BytesIO(data))
                assert len(df) > 0 and len(df.columns) > 0, f"{what} has no rows"


def test_without_a_model_the_app_opens_and_says_why_live_parts_are_off(page, open_app, make_server, browser_run):
    reason = "the server was started with --no-model; restart it without --no-model to turn live queries on"
    srv = make_server(browser_run, None, live_reason=reason)
    open_app(page, srv)  # the page fixture fails the test on any live request answered 409 no_model
    assert "live model off" in page.locator("header.top").inner_text()
    text = page.locator(".grid").inner_text()
    assert "--no-model" in text, "no view says why the live parts are off"
    select(page, head=1, mode=5, query=3)
    shot(page, "app-no-model")


def test_a_run_without_interactions_says_how_to_get_them(page, open_app, make_server, plain_run, vit):
    srv = make_server(plain_run, vit)
    open_app(page, srv)
    text = page.locator('[data-view="patch-interactions"]').inner_text()
    assert "--interactions" in text
    shot(page, "view-patch-interactions-absent", '[data-view="patch-interactions"]')

"""`vitscope report`: a figure per analysis (PNG + SVG, labelled axes, legends) and an offline index.html."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_analyze import _make_images, _save_tiny_model, _tiny_settings  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from vitscope.pipeline import analyze

    root = tmp_path_factory.mktemp("report")
    model = _save_tiny_model(root / "tiny.safetensors")
    images = _make_images(root / "images", 8, corrupt=True)
    return analyze(str(model), images, root / "run", settings=_tiny_settings(), progress=False, device="cpu")


EXPECTED = [
    "importance_prob_drop", "importance_acc_drop", "importance_loss_increase", "importance_layer_change", "importance_taylor",
    "agreement", "pruning_curves", "entropy_by_layer", "hop_profiles", "mean_distance",
    "patterns_patch", "prototypes_patch", "patterns_cls", "prototypes_cls", "image_overview",
]  # fmt: skip


def test_report_writes_every_figure_and_an_offline_page(run, tmp_path):
    from vitscope.report import write_report

    index = write_report(run, tmp_path / "rep", svg=True)
    folder = index.parent
    for stem in EXPECTED:
        for ext in ("png", "svg"):
            f = folder / f"{stem}.{ext}"
            assert f.is_file() and f.stat().st_size > 1000, f
        assert (folder / f"{stem}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert b"<svg" in (folder / f"{stem}.svg").read_bytes()[:2000]
    page = index.read_text()
    shown = re.findall(r'<img src="([^"]+)"', page)
    assert sorted(shown) == sorted(f"{s}.png" for s in EXPECTED)
    assert all((folder / s).is_file() for s in shown)
    assert len(re.findall(r"<figcaption>", page)) == len(EXPECTED)
    assert "http://" not in page and "https://" not in page  # works offline
    assert "img_broken.png" in page  # the skipped image is listed
    # drawing a figure again gives identical files (no timestamps or random ids inside)
    from vitscope.figures.run import fig_agreement
    from vitscope.figures.save import save_figure

    save_figure(fig_agreement(run), tmp_path, "again", ("png", "svg"))
    for ext in ("png", "svg"):
        assert (tmp_path / f"again.{ext}").read_bytes() == (folder / f"agreement.{ext}").read_bytes()


def test_every_figure_has_labelled_axes_and_a_key(run):
    from vitscope.report import figure_plan

    for entry in figure_plan(run):
        stem, fig = entry.stem, entry.draw()
        axes = [ax for ax in fig.get_axes() if ax.get_visible()]
        plots = [ax for ax in axes if ax.get_label() != "<colorbar>"]
        assert plots, stem
        for ax in plots:
            assert ax.get_xlabel() and ax.get_ylabel(), f"{stem}: an axis without labels"
        legends = [ax.get_legend() for ax in plots if ax.get_legend() is not None]
        colorbars = [ax for ax in axes if ax.get_label() == "<colorbar>"]
        assert legends or colorbars, f"{stem}: no legend or colour bar"
        for cb in colorbars:
            assert cb.get_ylabel() or cb.get_xlabel(), f"{stem}: unlabelled colour bar"


def test_importance_figure_shows_the_intervals(run):
    """The error bars drawn are the run's bootstrap intervals, head by head on the paper's axis."""
    import numpy as np
    from matplotlib.collections import LineCollection

    from vitscope.figures.run import fig_importance

    fig = fig_importance(run, "prob_drop")
    ax = next(a for a in fig.get_axes() if a.get_xlabel().startswith("head index"))
    segs = [s for c in ax.collections if isinstance(c, LineCollection) for s in c.get_segments()]
    heads = run.heads.sort_values(["layer", "head"])
    H = run.num_heads
    got = sorted((float(s[0][0]), float(min(s[0][1], s[1][1])), float(max(s[0][1], s[1][1]))) for s in segs)
    want = sorted(zip((heads["layer"] * H + heads["head"]).astype(float), heads["prob_drop_lo"], heads["prob_drop_hi"]))
    np.testing.assert_allclose(np.array(got), np.array(want, dtype=float), rtol=1e-9, atol=1e-12)



"""Responsive fields (geometry, membership, summaries, flow colours, masks) and the interaction figures."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pandas as pd
import pytest

from vitscope.analysis.fields import (
    FIELD_MEASURES,
    field_attention_mask,
    field_frame,
    field_layer_summary,
    field_membership,
    field_statistics,
    image_field_membership,
    responsive_fields,
)
from vitscope.figures.interaction import flow_colours
from vitscope.models.layout import TokenLayout

LAYOUT = TokenLayout(1, 0, None, (), (6, 7), (16, 16))  # CLS + a non-square 6 x 7 grid
P = LAYOUT.num_patches


def _pos() -> np.ndarray:
    return np.array([(i // 7, i % 7) for i in range(P)], dtype=float)


def _shifted_blocks(shift: tuple[int, int], half: int = 1) -> np.ndarray:
    """Field of query (r, c) = the (2 half + 1)^2 block centred on (r + dr, c + dc), clipped to the grid."""
    pos = _pos()
    m = np.zeros((P, P), dtype=bool)
    for i, (r, c) in enumerate(pos):
        for j, (r2, c2) in enumerate(pos):
            m[i, j] = abs(r2 - (r + shift[0])) <= half and abs(c2 - (c + shift[1])) <= half
    return m


def _direct(member: np.ndarray, weights: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Field geometry by explicit loops over each query's key list."""
    pos = _pos()
    out = {k: np.full(P, np.nan) for k in FIELD_MEASURES}
    for i in range(P):
        keys = np.nonzero(member[i])[0]
        out["size"][i] = len(keys)
        out["size_frac"][i] = len(keys) / P
        if not len(keys):
            continue
        w = np.ones(len(keys)) if weights is None else weights[i, keys]
        w = w / w.sum()
        cy, cx = (w * pos[keys, 0]).sum(), (w * pos[keys, 1]).sum()
        out["dy"][i], out["dx"][i] = cy - pos[i, 0], cx - pos[i, 1]
        out["magnitude"][i] = np.hypot(out["dx"][i], out["dy"][i])
        out["angle"][i] = np.degrees(np.arctan2(-out["dy"][i], out["dx"][i])) % 360
        out["spread"][i] = np.sqrt((w * ((pos[keys, 0] - cy) ** 2 + (pos[keys, 1] - cx) ** 2)).sum())
        out["extent"][i] = (w * np.hypot(pos[keys, 0] - pos[i, 0], pos[keys, 1] - pos[i, 1])).sum()
    return out


def test_statistics_of_shifted_blocks():
    m = _shifted_blocks((2, -1))
    s = field_statistics(m, LAYOUT)
    ref = _direct(m)
    for k in FIELD_MEASURES:
        np.testing.assert_allclose(s[k], ref[k], rtol=1e-12, atol=1e-12, err_msg=k)
    # A query whose shifted block lies fully inside the grid: known closed-form answers.
    i = 1 * 7 + 3  # (1, 3) -> block centred at (3, 2)
    assert s["size"][i] == 9
    assert (s["dy"][i], s["dx"][i]) == pytest.approx((2.0, -1.0))
    assert s["spread"][i] == pytest.approx(np.sqrt(4 / 3))
    assert s["angle"][i] == pytest.approx(np.degrees(np.arctan2(-2, -1)) % 360)  # down-left
    # Queries whose block falls off the grid have empty fields and NaN geometry.
    empty = _pos()[:, 0] + 2 - 1 > 5
    assert (s["size"][empty] == 0).all() and np.isnan(s["dx"][empty]).all()


def test_weighted_statistics_and_layers():
    rng = np.random.default_rng(0)
    m = rng.random((2, P, P)) < 0.2
    w = rng.normal(1.0, 1.0, size=(2, P, P))
    s = field_statistics(m, LAYOUT, weights=w)
    for l in range(2):
        ww = np.clip(w[l], 0, None) * m[l]
        ww = np.where(ww.sum(-1, keepdims=True) > 0, ww, m[l].astype(float))  # all-zero weights: equal weights
        ref = _direct(m[l], ww)
        for k in FIELD_MEASURES:
            np.testing.assert_allclose(s[k][l], ref[k], rtol=1e-10, atol=1e-12, err_msg=k)
    with pytest.raises(ValueError, match="42"):
        field_statistics(np.zeros((3, 3), dtype=bool), LAYOUT)


def test_membership_from_summary():
    rng = np.random.default_rng(1)
    mean = rng.normal(size=(2, P, P))
    sig = rng.random((2, P, P)) < 0.5
    summary = {"mean": mean, "significant": sig}
    np.testing.assert_array_equal(field_membership(summary), sig & (mean > 0))
    np.testing.assert_array_equal(field_membership(summary, min_impact=0.5), sig & (mean > 0.5))
    member, stats = responsive_fields(summary, LAYOUT, weighted=True)
    np.testing.assert_array_equal(stats["size"], (sig & (mean > 0)).sum(-1))
    np.testing.assert_allclose(stats["dx"], field_statistics(member, LAYOUT, mean)["dx"])
    with pytest.raises(ValueError, match="significant"):
        field_membership({"mean": mean})


def test_image_field_membership_matches_loop():
    rng = np.random.default_rng(2)
    impact = rng.normal(size=(3, P, P))
    impact[0, 5] = -1.0  # a row without positive impact: empty field
    for mass in (0.3, 0.5, 1.0):
        got = image_field_membership(impact, mass=mass)
        for l in range(3):
            for i in range(P):
                row = impact[l, i]
                pos = np.clip(row, 0, None)
                order = np.argsort(-pos, kind="stable")
                chosen, acc = [], 0.0
                for j in order:
                    if pos[j] <= 0 or acc >= mass * pos.sum() - 1e-15:
                        break
                    chosen.append(j)
                    acc += pos[j]
                ref = np.zeros(P, dtype=bool)
                ref[chosen] = True
                np.testing.assert_array_equal(got[l, i], ref, err_msg=f"mass {mass} layer {l} query {i}")
    assert not image_field_membership(impact)[0, 5].any()
    with pytest.raises(ValueError, match="mass"):
        image_field_membership(impact, mass=0)


def test_layer_summary_matches_direct():
    rng = np.random.default_rng(3)
    m = rng.random((2, P, P)) < 0.15
    m[1] = _shifted_blocks((0, 2), half=0)  # one key, two patches to the right (none for the last two columns)
    s = field_statistics(m, LAYOUT)
    t = field_layer_summary(s, LAYOUT)
    centre = np.array([2.5, 3.0])
    pos = _pos()
    for l in range(2):
        ok = s["size"][l] > 0
        assert t.loc[l, "frac_nonempty"] == pytest.approx(ok.mean())
        assert t.loc[l, "size_mean"] == pytest.approx(s["size"][l][ok].mean())
        mdx, mdy = s["dx"][l][ok].mean(), s["dy"][l][ok].mean()
        assert t.loc[l, "coherence"] == pytest.approx(np.hypot(mdx, mdy) / s["magnitude"][l][ok].mean())
        toward = []
        for i in np.nonzero(ok)[0]:
            v = centre - pos[i]
            toward.append((s["dy"][l][i] * v[0] + s["dx"][l][i] * v[1]) / np.linalg.norm(v))
        assert t.loc[l, "toward_centre"] == pytest.approx(np.mean(toward))
    # Layer 1: every non-empty field sits exactly 2 patches to the right of its query: parallel arrows.
    assert t.loc[1, "mean_angle"] == pytest.approx(0.0, abs=1e-9)
    assert t.loc[1, "coherence"] == pytest.approx(1.0)
    assert t.loc[1, "offset_mean"] == pytest.approx(2.0) and t.loc[1, "frac_nonempty"] == pytest.approx(5 / 7)
    frame = field_frame(s, LAYOUT)
    assert len(frame) == 2 * P and list(frame.columns[:4]) == ["layer", "query", "row", "col"]
    np.testing.assert_array_equal(frame["col"].to_numpy()[:7], np.arange(7))


def test_flow_colours():
    dy = np.array([0.0, -1.0, 0.0, 1.0, 0.0, np.nan])
    dx = np.array([1.0, 0.0, -1.0, 0.0, 0.0, np.nan])
    rgb = flow_colours(dy, dx, max_magnitude=1.0)
    np.testing.assert_allclose(rgb[0], [1.0, 0.0, 0.0])  # right: red
    np.testing.assert_allclose(rgb[1], [0.5, 1.0, 0.0])  # up: hue 90 deg
    np.testing.assert_allclose(rgb[2], [0.0, 1.0, 1.0])  # left: cyan
    np.testing.assert_allclose(rgb[3], [0.5, 0.0, 1.0])  # down: hue 270 deg
    np.testing.assert_allclose(rgb[4], [1.0, 1.0, 1.0])  # no offset: white
    np.testing.assert_allclose(rgb[5], [0.5, 0.5, 0.5])  # empty field: grey
    half = flow_colours(np.array([0.0]), np.array([0.5]))  # default scale: the longest arrow -> saturated
    np.testing.assert_allclose(half[0], [1.0, 0.0, 0.0])


def test_field_attention_mask():
    rng = np.random.default_rng(4)
    m = rng.random((2, P, P)) < 0.1
    allowed = field_attention_mask(m, LAYOUT)
    assert allowed.shape == (2, P + 1, P + 1)
    assert allowed[:, 0].all() and allowed[:, :, 0].all()
    expect = m | np.eye(P, dtype=bool)
    np.testing.assert_array_equal(allowed[:, 1:, 1:], expect)
    np.testing.assert_array_equal(field_attention_mask(m, LAYOUT, include_self=False)[:, 1:, 1:], m)


def test_figures_render():
    from vitscope.figures import interaction as fi

    rng = np.random.default_rng(5)
    m = rng.random((3, P, P)) < 0.1
    stats = field_statistics(m, LAYOUT)
    image = rng.random((96, 112, 3))
    fig = fi.plot_field_arrows(stats, LAYOUT, image=image, title="fields")
    assert len([a for a in fig.axes if a.get_visible()]) == 3 + 1  # 3 layers + colour bar
    fig = fi.plot_flow_colours(stats, LAYOUT, layers=[0, 2])
    assert len([a for a in fig.axes if a.get_visible()]) == 3  # 2 layers + colour-wheel key
    fig = fi.plot_query_impact(rng.normal(size=(3, P, P)), LAYOUT, query=8, membership=m)
    assert len([a for a in fig.axes if a.get_visible()]) == 6  # 3 panels + 3 colour bars
    fig = fi.plot_field_growth(field_layer_summary(stats, LAYOUT))
    assert len(fig.axes) == 3
    agreement = pd.DataFrame(
        {"layer": [0, 1, 0, 1], "query_kind": ["patch", "patch", "cls", "cls"], "spearman_mean": [0.9, 0.8, 0.7, 0.95], "spearman_sem": [0.01] * 4}
    )
    assert len(fi.plot_agreement(agreement).axes[0].lines) >= 2
    curve = pd.DataFrame(
        {"method": ["full", "window", "window", "indicator", "indicator"], "keys_per_query": [42, 1, 9, 1, 9], "accuracy": [0.8, 0.1, 0.5, 0.2, 0.6]}
    )
    assert len(fi.plot_window_curve(curve).axes[0].lines) == 3
    removal = pd.DataFrame(
        {
            "method": ["random"] * 4 + ["impact"] * 2,
            "seed": [0, 0, 1, 1, -1, -1],
            "rate": [0.0, 0.5, 0.0, 0.5, 0.0, 0.5],
            "accuracy": [0.8, 0.5, 0.8, 0.4, 0.8, 0.7],
        }
    )
    ax = fi.plot_removal_curve(removal).axes[0]
    assert len(ax.lines) == 2 and len(ax.collections) == 1  # random band only
    with pytest.raises(ValueError, match="out of range"):
        fi.plot_field_arrows(stats, LAYOUT, layers=[5])
    with pytest.raises(ValueError, match="patch index"):
        fi.plot_query_impact(rng.normal(size=(3, P, P)), LAYOUT, query=P)


def test_field_accumulator_matches_direct():
    from scipy import stats as st

    from vitscope.analysis.fields import FieldAccumulator

    rng = np.random.default_rng(6)
    n, L = 9, 2
    impact = rng.normal(size=(n, L, P, P))
    impact[:, 0, :, :7] += 1.5  # layer 0: every query leans towards the top row
    impact[2, 1, 4] = -1.0  # one empty field
    acc = FieldAccumulator(L, LAYOUT, mass=0.4)
    for chunk in np.array_split(impact, 3):
        acc.update(chunk)
    s = acc.summary(q=0.05)
    per = [field_statistics(image_field_membership(impact[b], 0.4), LAYOUT) for b in range(n)]
    size = np.stack([p["size"] for p in per])
    dy, dx = np.stack([p["dy"] for p in per]), np.stack([p["dx"] for p in per])
    np.testing.assert_allclose(s["size"], size.mean(0))
    np.testing.assert_array_equal(s["n"], np.isfinite(dx).sum(0))
    np.testing.assert_allclose(s["dx"], np.nanmean(dx, 0), rtol=1e-10)
    np.testing.assert_allclose(s["extent"], np.nanmean(np.stack([p["extent"] for p in per]), 0), rtol=1e-10)
    np.testing.assert_allclose(s["offset_mean"], np.nanmean(np.stack([p["magnitude"] for p in per]), 0), rtol=1e-10)
    freq = np.mean([image_field_membership(impact[b], 0.4) for b in range(n)], axis=0)
    np.testing.assert_allclose(s["frequency"], freq)
    # Hotelling T^2 for a few cells, from the stored arrows.
    for l, i in [(0, 30), (1, 4), (1, 17)]:
        ok = np.isfinite(dx[:, l, i])
        v = np.stack([dy[ok, l, i], dx[ok, l, i]], axis=1)
        m = v.mean(0)
        k = len(v)
        t2 = k * m @ np.linalg.solve(np.cov(v, rowvar=False), m)
        p = st.f.sf((k - 2) / (2 * (k - 1)) * t2, 2, k - 2)
        assert s["arrow_t2"][l, i] == pytest.approx(t2, rel=1e-8)
        assert s["arrow_p"][l, i] == pytest.approx(p, rel=1e-6)
    assert s["arrow_significant"][0].mean() > 0.5  # the planted upward lean is detected
    assert (s["dy"][0][_pos()[:, 0] >= 2] < 0).all()
    back = FieldAccumulator.from_state(acc.state(), LAYOUT)
    np.testing.assert_array_equal(back.summary()["arrow_p"], s["arrow_p"])
    summ = field_layer_summary(s, LAYOUT)  # set-level geometry feeds the same summaries and figures
    assert len(summ) == 2 and summ.loc[0, "mean_dy"] < 0 < summ.loc[0, "mean_angle"] <= 180  # pointing up
    with pytest.raises(ValueError, match="expected impact"):
        acc.update(impact[0])


def test_layer_summary_uniform_baselines():
    full = np.ones((1, P, P), dtype=bool)
    s = field_statistics(full, LAYOUT)
    t = field_layer_summary(s, LAYOUT)
    # A field covering the grid: its arrow is exactly the way to the grid centre.
    assert t.loc[0, "toward_centre"] == pytest.approx(t.loc[0, "offset_uniform"])
    assert t.loc[0, "extent_mean"] == pytest.approx(t.loc[0, "extent_uniform"])


def test_image_fields_shortcut():
    from vitscope.analysis.fields import image_fields

    impact = np.random.default_rng(7).normal(size=(2, P, P))
    member, stats = image_fields(impact, LAYOUT, mass=0.3)
    np.testing.assert_array_equal(member, image_field_membership(impact, 0.3))
    np.testing.assert_allclose(stats["spread"], field_statistics(member, LAYOUT)["spread"])

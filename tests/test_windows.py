"""Attention-window design and patch removal against independent references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from reference_interaction import reference_logits
from vitscope.analysis.interaction import InteractionAccumulator, first_order_impact, key_importance
from vitscope.analysis.windows import (
    allowed_from_keys,
    cls_attention_scores,
    impact_scores,
    keep_count,
    removal_curve,
    removal_summary,
    remove_patches,
    top_keys,
    window_curve,
    window_key_sets,
    window_keys,
    window_mask,
    window_sizes,
)
from vitscope.models.layout import TokenLayout


# Many small forwards: one thread avoids thread start-up costs (shared fixture in conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def xs() -> torch.Tensor:
    return torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(11))


# ----------------------------------------------------------------------------- masks
def test_window_keys_against_loops():
    lay = TokenLayout(1, 0, None, (), (4, 5), (8, 8))
    P = lay.num_patches
    assert window_sizes(lay) == [1, 3, 5, 7, 9]
    np.testing.assert_array_equal(window_keys(lay, 1), np.eye(P, dtype=bool))
    assert window_keys(lay, 9).all()
    assert not window_keys(lay, 7).all()  # a corner query cannot see the far corner with radius 3
    for k in (3, 5):
        ref = np.zeros((P, P), dtype=bool)
        for i in range(P):
            for j in range(P):
                ref[i, j] = max(abs(i // 5 - j // 5), abs(i % 5 - j % 5)) <= (k - 1) // 2
        np.testing.assert_array_equal(window_keys(lay, k), ref)
    m = window_mask(lay, 1)
    assert m.shape == (P + 1, P + 1) and m[0].all() and m[:, 0].all()
    np.testing.assert_array_equal(m[1:, 1:], np.eye(P, dtype=bool))  # k = 1: self + CLS only
    assert window_mask(lay, 9).all()
    for bad in (0, 2, -1, 3.0):
        with pytest.raises(ValueError, match="odd"):
            window_keys(lay, bad)


def test_top_keys_against_loop():
    rng = np.random.default_rng(0)
    score = rng.integers(0, 4, size=(2, 6, 6)).astype(float)  # many ties
    counts = rng.integers(0, 7, size=(2, 6))
    got = top_keys(score, counts)
    for l in range(2):
        for i in range(6):
            ranked = sorted(range(6), key=lambda j: (-score[l, i, j], j))
            ref = np.zeros(6, dtype=bool)
            ref[ranked[: counts[l, i]]] = True
            np.testing.assert_array_equal(got[l, i], ref)


def test_window_key_sets_share_the_budget():
    lay = TokenLayout(1, 0, None, (), (4, 4), (8, 8))
    rng = np.random.default_rng(1)
    impact = rng.normal(size=(3, 16, 16))
    for k in (1, 3, 5):
        counts = window_keys(lay, k).sum(-1)
        sets = {m: window_key_sets(lay, k, m, impact, seed=2) for m in ("window", "indicator", "indicator_pooled", "random")}
        for m, s in sets.items():
            assert s.shape == (3, 16, 16)
            np.testing.assert_array_equal(s.sum(-1), np.broadcast_to(counts, (3, 16)), err_msg=m)
        np.testing.assert_array_equal(sets["indicator"], top_keys(impact, counts))
        pooled = top_keys(impact.sum(0), counts)
        assert all((sets["indicator_pooled"][l] == pooled).all() for l in range(3))
    named = window_key_sets(lay, 3, "by_abs", scores={"by_abs": np.abs(impact)})
    np.testing.assert_array_equal(named, top_keys(np.abs(impact), window_keys(lay, 3).sum(-1)))
    with pytest.raises(ValueError, match="impact_mean"):
        window_key_sets(lay, 3, "indicator", num_layers=3)
    with pytest.raises(ValueError, match="unknown window method"):
        window_key_sets(lay, 3, "nearest", impact)


# ----------------------------------------------------------------------------- window curve
def test_window_curve_matches_reference(random_vit, xs):
    targets = torch.tensor([0, 1, 2, 3, 4, 0])
    impact = np.random.default_rng(3).normal(size=(3, 16, 16))
    scores = {"by_abs": np.abs(impact)}
    df = window_curve(random_vit, [(xs[:4], targets[:4]), (xs[4:], targets[4:])], impact, ks=[1, 3, 7], scores=scores)
    assert list(df["method"]) == ["full"] + ["window"] * 3 + ["indicator"] * 3 + ["indicator_pooled"] * 3 + ["by_abs"] * 3
    assert (df["n_images"] == 6).all()
    with torch.no_grad():
        plain = random_vit.logits(xs)
        full = df[df["method"] == "full"].iloc[0]
        assert full["mean_loss"] == pytest.approx(F.cross_entropy(plain, targets).item(), rel=1e-5)
        for _, row in df[df["method"] != "full"].iterrows():
            keys = window_key_sets(random_vit.layout, int(row["k"]), row["method"], impact, scores=scores)
            allowed = {l: torch.as_tensor(a) for l, a in enumerate(allowed_from_keys(keys, random_vit.layout))}
            logits = reference_logits(random_vit.module, xs, allowed=allowed)
            assert row["mean_loss"] == pytest.approx(F.cross_entropy(logits, targets).item(), rel=1e-5), (row["method"], row["k"])
            assert row["accuracy"] == pytest.approx((logits.argmax(-1) == targets).float().mean().item())
            assert row["agreement"] == pytest.approx((logits.argmax(-1) == plain.argmax(-1)).float().mean().item())
            assert row["keys_per_query"] == pytest.approx(window_keys(random_vit.layout, int(row["k"])).sum(-1).mean())
    # The largest window allows everything: identical to full attention.
    k7 = df[(df["method"] == "window") & (df["k"] == 7)].iloc[0]
    assert k7["mean_loss"] == pytest.approx(full["mean_loss"], rel=1e-6) and k7["keys_per_query"] == 16


# ----------------------------------------------------------------------------- patch removal
def test_removal_at_zero_is_the_plain_model(random_vit, xs):
    scores = np.random.default_rng(0).random((6, 16))
    with torch.no_grad():
        torch.testing.assert_close(remove_patches(random_vit, xs, scores, 0.0), random_vit.logits(xs), rtol=1e-5, atol=1e-5)


def test_removal_matches_references(random_vit, xs):
    rng = np.random.default_rng(1)
    scores = rng.integers(0, 5, size=(6, 16)).astype(float)  # ties: lower index removed first
    for rate in (0.25, 0.5, 0.9):
        n_keep = keep_count(16, rate)
        keep = np.stack([sorted(sorted(range(16), key=lambda j: (scores[b, j], j))[16 - n_keep :]) for b in range(6)])
        got = remove_patches(random_vit, xs, scores, rate)
        with torch.no_grad():
            ref = reference_logits(random_vit.module, xs, keep_patches=torch.as_tensor(keep))
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
            # Dropping tokens = hiding them as keys (pre-softmax) in every layer, for a CLS readout.
            allowed = torch.ones(6, 17, 17, dtype=torch.bool)
            for b in range(6):
                dropped = sorted(set(range(16)) - set(keep[b].tolist()))
                allowed[b][:, [1 + j for j in dropped]] = False
                allowed[b][[1 + j for j in dropped], 1 + np.array(dropped)] = True  # dropped rows: keep a key
            hidden = reference_logits(random_vit.module, xs, allowed={l: allowed for l in range(3)})
            torch.testing.assert_close(got, hidden, rtol=1e-5, atol=1e-5)
    assert keep_count(196, 0.9) == 20 and keep_count(196, 0.0) == 196
    with pytest.raises(ValueError, match="rate"):
        keep_count(16, 1.5)
    with pytest.raises(ValueError, match="scores"):
        remove_patches(random_vit, xs, scores[:, :5], 0.5)


def test_ranking_scores(random_vit, xs):
    with torch.no_grad():
        attn = random_vit.attention(xs)
    np.testing.assert_allclose(cls_attention_scores(random_vit, xs), attn[:, -1, :, 0, 1:].mean(1).numpy(), rtol=1e-6)
    r = first_order_impact(random_vit, xs)  # targets: the prediction
    np.testing.assert_allclose(impact_scores(random_vit, xs), key_importance(r["impact"], r["prefix_impact"]), rtol=1e-6)


def test_removal_curve_random_vit(random_vit, xs):
    targets = torch.tensor([0, 1, 2, 3, 4, 0])
    acc = InteractionAccumulator.for_model(random_vit).update(first_order_impact(random_vit, xs[:3]))
    ds = acc.summary()["key_importance_mean"]
    df = removal_curve(random_vit, [xs[:4], xs[4:]], rates=(0.0, 0.5), seeds=(0, 1), dataset_scores=ds)
    assert set(df["method"]) == {"impact", "impact_dataset", "cls_attention", "random"}
    assert len(df) == (3 + 2) * 2
    at0 = df[df["rate"] == 0.0]
    assert (at0["accuracy"] == 1.0).all() and (at0["agreement"] == 1.0).all()  # targets: unpruned prediction
    assert (df[df["rate"] == 0.5]["n_kept"] == 8).all()
    # One curve point by hand: the dataset ranking at 50 %.
    row = df[(df["method"] == "impact_dataset") & (df["rate"] == 0.5)].iloc[0]
    logits = remove_patches(random_vit, xs, np.broadcast_to(ds, (6, 16)), 0.5)
    with torch.no_grad():
        assert row["agreement"] == pytest.approx((logits.argmax(-1) == random_vit.logits(xs).argmax(-1)).float().mean().item())
    # Same seeds give the same random curves; the batch split does not matter.
    again = removal_curve(random_vit, [xs[:2], xs[2:]], rates=(0.5,), methods=("random",), seeds=(0, 1))
    np.testing.assert_allclose(again["accuracy"], df[(df["method"] == "random") & (df["rate"] == 0.5)]["accuracy"])
    summ = removal_summary(df)
    assert summ.set_index(["method", "rate"]).loc[("random", 0.5), "n_seeds"] == 2
    labelled = removal_curve(random_vit, [(xs, targets)], rates=(0.0,), methods=("impact",), rank_with_labels=True)
    with torch.no_grad():
        assert labelled["accuracy"].iloc[0] == pytest.approx((random_vit.logits(xs).argmax(-1) == targets).float().mean().item())
    with pytest.raises(ValueError, match="dataset_scores"):
        removal_curve(random_vit, [xs], methods=("impact_dataset",))
    with pytest.raises(ValueError, match="unknown removal"):
        removal_curve(random_vit, [xs], methods=("entropy",))


def test_deit_window_and_removal_smoke(deit_tiny, imagenet_images):
    paths, labels = imagenet_images
    x = deit_tiny.preprocess(paths[:6])
    y = torch.tensor(labels[:6])
    acc = InteractionAccumulator.for_model(deit_tiny).update(first_order_impact(deit_tiny, x[:3], y[:3]))
    s = acc.summary()
    wc = window_curve(deit_tiny, [(x[3:], y[3:])], s["mean"], ks=[1, 27], methods=("window", "indicator"))
    full = wc[wc["method"] == "full"].iloc[0]
    k27 = wc[(wc["method"] == "window") & (wc["k"] == 27)].iloc[0]
    assert k27["keys_per_query"] == 196 and k27["mean_loss"] == pytest.approx(full["mean_loss"], rel=1e-4)
    assert (wc[wc["k"] == 1]["keys_per_query"] == 1).all()
    rc = removal_curve(deit_tiny, [(x[3:], y[3:])], rates=(0.0, 0.5), seeds=(0,), dataset_scores=s["key_importance_mean"])
    assert set(rc["method"]) == {"impact", "impact_dataset", "cls_attention", "random"}
    base = rc[rc["rate"] == 0.0]["accuracy"]
    assert base.nunique() == 1  # every ranking starts from the same unpruned model
    assert np.isfinite(rc["mean_loss"]).all()

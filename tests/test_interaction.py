"""Interaction indicator: first-order estimate, exact knock-out and aggregation against independent references."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from scipy import stats

from reference_interaction import reference_logits
from vitscope.analysis.interaction import (
    InteractionAccumulator,
    Welford,
    agreement_summary,
    benjamini_hochberg,
    first_order_impact,
    interaction_layer_table,
    interaction_summary,
    key_importance,
    knockout_agreement,
    knockout_impact,
    ttest_pvalues,
    zero_spread,
)
from vitscope.capture.runtime import LayerPlan


# Many small forwards: one thread avoids thread start-up costs (shared fixture in conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def vit64():
    """A small random timm ViT in float64 (3 layers x 2 heads, 4x4 grid + CLS), for tight comparisons."""
    from timm.models.vision_transformer import VisionTransformer

    import vitscope

    torch.manual_seed(5)
    m = VisionTransformer(img_size=32, patch_size=8, num_classes=5, embed_dim=32, depth=3, num_heads=2, mlp_ratio=2.0)
    return vitscope.load_model(m.double(), device="cpu")


@pytest.fixture(scope="module")
def x64() -> torch.Tensor:
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2), dtype=torch.float64)


@pytest.fixture(scope="module")
def deit_batch(deit_tiny, imagenet_images):
    paths, labels = imagenet_images
    return deit_tiny.preprocess(paths[:2]), torch.tensor(labels[:2])


def _loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.double(), target, reduction="none")


# ----------------------------------------------------------------------------- first-order estimate
def test_reference_forward_matches_timm(vit64, x64):
    with torch.no_grad():
        torch.testing.assert_close(reference_logits(vit64.module, x64), vit64.logits(x64), rtol=1e-10, atol=1e-10)


def test_first_order_equals_gate_gradient(vit64, x64):
    """-grad.A summed over heads equals d loss / d (edge gate shared by all heads), from timm's unfused path."""
    target = torch.tensor([1, 4, 0])
    out = first_order_impact(vit64, x64, target)
    T, pre = vit64.num_tokens, vit64.layout.num_prefix
    gates = {l: torch.ones(3, T, T, dtype=torch.float64, requires_grad=True) for l in range(vit64.num_layers)}
    loss = _loss(reference_logits(vit64.module, x64, gates=gates), target).sum()
    grads = torch.autograd.grad(loss, [gates[l] for l in range(vit64.num_layers)])
    ref = -torch.stack(grads, dim=1)  # (B, L, T, T)
    assert out["impact"].shape == (3, 3, 16, 16) and out["impact"].dtype == np.float32
    np.testing.assert_allclose(out["impact"], ref[:, :, pre:, pre:].numpy(), rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(out["prefix_impact"], ref[:, :, :pre, pre:].numpy(), rtol=1e-5, atol=1e-9)
    np.testing.assert_array_equal(out["target"], target.numpy())
    np.testing.assert_allclose(out["loss"], _loss(vit64.logits(x64), target).numpy(), rtol=1e-10)
    assert all(p.grad is None for p in vit64.module.parameters()), "parameter gradients must not be computed"


def test_first_order_matches_finite_difference(vit64, x64):
    """Scaling one cell by (1 - eps) in every head changes the loss by ~ eps * impact."""
    out = first_order_impact(vit64, x64)  # targets: the prediction
    target = torch.as_tensor(out["target"])
    base = _loss(vit64.logits(x64), target)
    T, pre, eps = vit64.num_tokens, vit64.layout.num_prefix, 1e-6
    for layer, i, j in [(0, 3, 7), (1, 10, 10), (2, 0, 15)]:
        keep = torch.ones(1, 1, T, T, dtype=torch.float64)
        keep[..., pre + i, pre + j] = 1 - eps
        with torch.no_grad():
            logits = vit64.readout(vit64.run_blocks(vit64.embed(x64), plans={layer: LayerPlan(keep=keep)}))
        fd = ((_loss(logits, target) - base) / eps).numpy()
        np.testing.assert_allclose(out["impact"][:, layer, i, j], fd, rtol=1e-3, atol=1e-8)


def test_first_order_layer_subset(vit64, x64):
    full = first_order_impact(vit64, x64)
    part = first_order_impact(vit64, x64, layers=[2, 0])
    np.testing.assert_array_equal(part["layers"], [0, 2])
    np.testing.assert_allclose(part["impact"], full["impact"][:, [0, 2]], rtol=1e-6, atol=1e-12)


def test_last_layer_patch_queries_have_no_impact(random_vit):
    """In a CLS-readout model the last layer's patch rows never reach the logits: both methods give 0."""
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    L = random_vit.num_layers
    est = first_order_impact(random_vit, x)
    assert np.all(est["impact"][:, L - 1] == 0)
    ko = knockout_impact(random_vit, x, L - 1, [0, 9], chunk=5)
    assert np.abs(ko["impact"]).max() < 1e-6  # only batch-size rounding remains


# ----------------------------------------------------------------------------- exact knock-out
def test_knockout_equals_masked_logits(vit64, x64):
    layer, queries = 1, [0, 6]
    target = torch.tensor([2, 2, 3])
    ko = knockout_impact(vit64, x64, layer, queries, target, prefix_queries=[0], chunk=11)
    T, pre, P = vit64.num_tokens, vit64.layout.num_prefix, vit64.layout.num_patches
    base = _loss(vit64.logits(x64), target)
    np.testing.assert_allclose(ko["base_loss"], base.numpy(), rtol=1e-10)
    np.testing.assert_array_equal(ko["query_tokens"], [0, pre + 0, pre + 6])
    assert ko["impact"].shape == (3, 3, P)
    for qi, q_tok in enumerate(ko["query_tokens"]):
        for j in range(P):
            m = torch.zeros(T, T, dtype=torch.bool)
            m[q_tok, pre + j] = True
            ref = (_loss(vit64.logits(x64, masks={(layer, None): m}), target) - base).numpy()
            np.testing.assert_allclose(ko["impact"][:, qi, j], ref, rtol=1e-7, atol=1e-12)


def test_knockout_key_subset_and_chunking(random_vit):
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    full = knockout_impact(random_vit, x, 0, [3], chunk=1000)
    part = knockout_impact(random_vit, x, 0, [3], keys=[1, 5, 14], chunk=2)
    np.testing.assert_allclose(part["impact"], full["impact"][:, :, [1, 5, 14]], atol=2e-6)


def test_knockout_rejects_bad_input(random_vit):
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(ValueError, match="not patch indices"):
        knockout_impact(random_vit, x, 0, [16])
    with pytest.raises(ValueError, match="prefix"):
        knockout_impact(random_vit, x, 0, [], prefix_queries=[1])
    with pytest.raises(ValueError, match="out of range"):
        knockout_impact(random_vit, x, 3, [0])
    with pytest.raises(ValueError, match="class indices"):
        first_order_impact(random_vit, x, [7])


def test_knockout_agreement_random_vit(vit64, x64):
    df = knockout_agreement(vit64, x64, queries_per_layer=2, keys=8, seed=1)
    assert set(df["query_kind"]) == {"cls", "patch"}
    assert len(df) == 3 * 3 * 3  # layers x images x (CLS + 2 patch queries)
    assert (df["n_keys"] == 8).all()
    # Recompute one row by hand.
    est = first_order_impact(vit64, x64)
    row = df[(df["layer"] == 1) & (df["query_kind"] == "patch")].iloc[0]
    rng = np.random.default_rng(1)
    picks = []
    for _ in range(2):  # replay the draws of layers 0 and 1
        q = np.sort(rng.choice(16, size=2, replace=False))
        k = np.sort(rng.choice(16, size=8, replace=False))
        picks.append((q, k))
    q, k = picks[1]
    assert row["query"] == q[0]
    exact = knockout_impact(vit64, x64, 1, [q[0]], est["target"], keys=k)["impact"][int(row["image"]), 0]
    a = est["impact"][int(row["image"]), 1, q[0], k]
    assert row["spearman"] == pytest.approx(stats.spearmanr(a, exact).statistic)
    summ = agreement_summary(df)
    assert {"layer", "query_kind", "spearman_mean", "spearman_sem", "n_pairs"} <= set(summ.columns)
    assert len(summ) == 6
    # In float64 the first-order estimate ranks these small edits almost perfectly.
    assert summ["spearman_mean"].min() > 0.8


def test_first_order_deit_agrees_with_knockout(deit_tiny, deit_batch):
    x, y = deit_batch
    est = first_order_impact(deit_tiny, x, y)
    assert est["impact"].shape == (2, 12, 196, 196)
    assert np.isfinite(est["impact"]).all() and np.isfinite(est["prefix_impact"]).all()
    np.testing.assert_array_equal(est["target"], y.numpy())
    df = knockout_agreement(deit_tiny, x, layers=[6, 11], queries_per_layer=1, keys=24, estimate=est, seed=0)
    summ = agreement_summary(df).set_index(["layer", "query_kind"])
    assert summ.loc[(6, "patch"), "spearman_mean"] > 0.6
    assert summ.loc[(11, "cls"), "spearman_mean"] > 0.6
    assert summ.loc[(11, "patch"), "n_defined"] == 0  # patch rows of the last layer cannot matter


# ----------------------------------------------------------------------------- aggregation
def test_welford_matches_numpy():
    rng = np.random.default_rng(0)
    data = rng.standard_t(3, size=(37, 2, 4, 4)) * 1e-3 + 5e-4
    w = Welford((2, 4, 4))
    for chunk in np.split(data, [1, 9, 10, 30]):
        w.update(chunk.astype(np.float32))
    ref = data.astype(np.float32).astype(np.float64)
    assert w.count == 37
    np.testing.assert_allclose(w.mean, ref.mean(0), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(w.std, ref.std(0, ddof=1), rtol=1e-10)
    np.testing.assert_allclose(w.sem, ref.std(0, ddof=1) / np.sqrt(37), rtol=1e-10)
    a, b = Welford((2, 4, 4)).update(ref[:20]), Welford((2, 4, 4)).update(ref[20:])
    merged = a.merge(b)
    np.testing.assert_allclose(merged.var, ref.var(0, ddof=1), rtol=1e-10)
    back = Welford.from_state(merged.state())
    np.testing.assert_array_equal(back.m2, merged.m2)
    assert back.count == 37
    with pytest.raises(ValueError, match="shape"):
        w.update(np.zeros((2, 3, 4, 4)))


def test_ttest_matches_scipy():
    rng = np.random.default_rng(1)
    data = rng.normal(0.1, 1.0, size=(25, 30))
    w = Welford((30,)).update(data)
    for alt in ("greater", "less", "two-sided"):
        t, p = ttest_pvalues(w.mean, w.sem, w.count, alt)
        ref = stats.ttest_1samp(data, 0.0, alternative=alt)
        np.testing.assert_allclose(t, ref.statistic, rtol=1e-10)
        np.testing.assert_allclose(p, ref.pvalue, rtol=1e-8)
    # Zero spread: the exact sign test (all 10 impacts share one sign), not p = 0.
    n = 10
    const = np.array([[2.5] * n, [0.0] * n, [-1.0] * n]).T  # (images, cells)
    w = Welford((3,)).update(const)
    for alt in ("greater", "less", "two-sided"):
        _, p = ttest_pvalues(w.mean, w.sem, w.count, alt)
        ref = []
        for v in const[0]:
            positives = n if v > 0 else 0
            tested = {"greater": v > 0, "less": v < 0, "two-sided": v != 0}[alt]
            ref.append(stats.binomtest(positives, n, 0.5, alternative=alt).pvalue if tested else 1.0)
        np.testing.assert_allclose(p, ref, rtol=1e-12, err_msg=alt)
    assert zero_spread(w.mean, w.sem).tolist() == [True, True, True]
    assert not zero_spread(np.array([1.0]), np.array([1e-6])).any()


def _naive_bh(p: np.ndarray, q: float) -> np.ndarray:
    m = p.size
    order = np.argsort(p)
    k = 0
    for rank in range(1, m + 1):
        if p[order[rank - 1]] <= rank * q / m:
            k = rank
    out = np.zeros(m, dtype=bool)
    out[order[:k]] = True
    return out


def test_benjamini_hochberg_step_up():
    rng = np.random.default_rng(2)
    p = np.concatenate([rng.uniform(0, 0.01, size=(3, 20)), rng.uniform(0, 1, size=(3, 80))], axis=1)
    for q in (0.01, 0.05, 0.2):
        adj, rej = benjamini_hochberg(p, q=q, axis=1)
        np.testing.assert_allclose(adj, stats.false_discovery_control(p, axis=1, method="bh"))
        for l in range(3):
            np.testing.assert_array_equal(rej[l], _naive_bh(p[l], q))
    with pytest.raises(ValueError, match="NaN"):
        benjamini_hochberg(np.array([0.1, np.nan]))


def test_interaction_summary_matches_naive_tests():
    rng = np.random.default_rng(3)
    L, P, n = 2, 5, 40
    effect = np.zeros((L, P, P))
    effect[0, 1, :3] = 0.6
    effect[1, 4, 4] = 1.0
    data = rng.normal(effect, 1.0, size=(n, L, P, P))
    acc = InteractionAccumulator(L, P, 1)
    for chunk in np.array_split(data, 4):
        acc.update({"impact": chunk, "prefix_impact": chunk[:, :, :1, :]})
    s = acc.summary(q=0.05)
    ref_p = stats.ttest_1samp(data, 0.0, alternative="greater").pvalue
    np.testing.assert_allclose(s["p_value"], ref_p, rtol=1e-8)
    for l in range(L):
        np.testing.assert_array_equal(s["significant"][l].ravel(), _naive_bh(ref_p[l].ravel(), 0.05))
    # across layers: one family of every edge of every layer
    np.testing.assert_array_equal(s["significant_all"].ravel(), _naive_bh(ref_p.ravel(), 0.05))
    assert s["significant"][0, 1, :3].all() and s["significant"][1, 4, 4]
    np.testing.assert_allclose(s["key_importance_mean"], key_importance(data, data[:, :, :1, :]).mean(0), rtol=1e-10)
    np.testing.assert_allclose(s["abs_mean"], np.abs(data).mean(0), rtol=1e-10)
    back = InteractionAccumulator.from_state(acc.state())
    np.testing.assert_array_equal(back.summary()["significant"], s["significant"])
    with pytest.raises(ValueError, match="at least 2"):
        interaction_summary(Welford((1, 2, 2)).update(np.zeros((1, 1, 2, 2))))


def test_key_importance_is_first_order_key_removal(vit64, x64):
    """Sum over queries and layers = first-order loss change of scaling key j's column in every layer."""
    out = first_order_impact(vit64, x64)
    score = key_importance(out["impact"], out["prefix_impact"])
    target = torch.as_tensor(out["target"])
    base = _loss(vit64.logits(x64), target)
    T, pre, eps = vit64.num_tokens, vit64.layout.num_prefix, 1e-6
    for j in (0, 9):
        keep = torch.ones(1, 1, T, T, dtype=torch.float64)
        keep[..., pre + j] = 1 - eps
        plans = {l: LayerPlan(keep=keep) for l in range(vit64.num_layers)}
        with torch.no_grad():
            logits = vit64.readout(vit64.run_blocks(vit64.embed(x64), plans=plans))
        np.testing.assert_allclose(score[:, j], ((_loss(logits, target) - base) / eps).numpy(), rtol=1e-3, atol=1e-8)
    loop = np.zeros((3, 16))
    for b in range(3):
        for j in range(16):
            loop[b, j] = out["impact"][b, :, :, j].sum() + out["prefix_impact"][b, :, :, j].sum()
    np.testing.assert_allclose(score, loop, rtol=1e-5, atol=1e-9)


def test_accumulator_from_first_order(random_vit):
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(9))
    acc = InteractionAccumulator.for_model(random_vit)
    r1, r2 = first_order_impact(random_vit, x[:3]), first_order_impact(random_vit, x[3:])
    acc.update(r1).update(r2)
    both = np.concatenate([r1["impact"], r2["impact"]]).astype(np.float64)
    np.testing.assert_allclose(acc.impact.mean, both.mean(0), rtol=1e-10, atol=1e-14)
    s = acc.summary()
    table = interaction_layer_table(s, random_vit.layout)
    assert list(table["layer"]) == [0, 1, 2]
    l = 1
    np.testing.assert_allclose(table.loc[l, "mean_impact"], s["mean"][l].mean())
    np.testing.assert_allclose(table.loc[l, "self_impact"], np.diagonal(s["mean"][l]).mean())
    np.testing.assert_allclose(table.loc[l, "mean_abs_impact"], np.abs(both[:, l]).mean(), rtol=1e-6)
    assert table.loc[l, "n_significant"] == s["significant"][l].sum()
    with pytest.raises(ValueError, match="layers"):
        acc.update(first_order_impact(random_vit, x[:1], layers=[0]))


def test_interaction_layer_table_distances():
    from vitscope.models.layout import TokenLayout

    lay = TokenLayout(1, 0, None, (), (2, 2), (8, 8))
    mean = np.zeros((1, 4, 4))
    sig = np.zeros((1, 4, 4), dtype=bool)
    sig[0, 0, 3] = True  # (0,0) -> (1,1): distance sqrt(2)
    sig[0, 1, 1] = True  # self: distance 0
    mean[0, 0, 3], mean[0, 1, 1] = 1.0, 3.0
    t = interaction_layer_table({"mean": mean, "significant": sig, "n": np.asarray(10)}, lay)
    assert t.loc[0, "significant_distance"] == pytest.approx(np.sqrt(2) / 2)
    assert t.loc[0, "impact_distance"] == pytest.approx(np.sqrt(2) * 1 / 4)
    assert t.loc[0, "n_significant"] == 2 and isinstance(t, pd.DataFrame)

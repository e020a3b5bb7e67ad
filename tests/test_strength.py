"""Attention strength: hop profiles, entropy, mean attention distance and CLS mass."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from vitscope.analysis.strength import (
    SCALAR_MEASURES,
    attention_strength,
    entropy_from_profile,
    hop_distance_matrix,
    hop_profile,
    mean_attention_distance,
    strength_frame,
    summarize_strength,
    uniform_entropy,
)
from vitscope.models.layout import TokenLayout


def layout(grid=(4, 4), prefix=1, cls=0, dist=None, registers=(), patch=(8, 8)) -> TokenLayout:
    return TokenLayout(
        num_prefix=prefix, cls_index=cls, dist_index=dist, register_indices=tuple(registers), grid=grid, patch_size=patch
    )


LAYOUTS = {
    "cls_4x4": layout(),
    "distilled_5x3": layout(grid=(5, 3), prefix=2, dist=1, patch=(8, 6)),
    "registers_3x5": layout(grid=(3, 5), prefix=5, registers=(1, 2, 3, 4), patch=(6, 10)),
    "no_cls_4x4": layout(prefix=0, cls=None),
}


def random_attention(lay: TokenLayout, b=2, h=3, seed=0, sharpness=3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, h, lay.num_tokens, lay.num_tokens, generator=g) * sharpness
    return logits.softmax(dim=-1)


# ----------------------------------------------------------------------- naive references
def naive_rc(lay: TokenLayout, k: int) -> tuple[int, int]:
    return divmod(k, lay.grid[1])


def naive_hop_profile(a: np.ndarray, lay: TokenLayout) -> np.ndarray:
    b, h = a.shape[:2]
    g = max(lay.grid)
    total = np.zeros((b, h, g))
    count = np.zeros(g)
    for i in range(lay.num_patches):
        for j in range(lay.num_patches):
            (ri, ci), (rj, cj) = naive_rc(lay, i), naive_rc(lay, j)
            d = max(abs(ri - rj), abs(ci - cj))
            total[:, :, d] += a[:, :, lay.num_prefix + i, lay.num_prefix + j]
            count[d] += 1
    return total / count


def naive_entropy(profile) -> float:
    total = sum(profile)
    if total == 0:
        return float("nan")
    e = 0.0
    for s in profile:
        p = s / total
        if p > 0:
            e -= p * math.log(p)
    return e


def naive_mean_distance(a: np.ndarray, lay: TokenLayout, normalize=True) -> np.ndarray:
    b, h = a.shape[:2]
    ph, pw = lay.patch_size
    out = np.zeros((b, h))
    for bi in range(b):
        for hi in range(h):
            per_query = []
            for i in range(lay.num_patches):
                ri, ci = naive_rc(lay, i)
                num = mass = 0.0
                for j in range(lay.num_patches):
                    rj, cj = naive_rc(lay, j)
                    w = a[bi, hi, lay.num_prefix + i, lay.num_prefix + j]
                    num += w * math.hypot((ri - rj) * ph, (ci - cj) * pw)
                    mass += w
                if normalize and mass > 0:
                    per_query.append(num / mass)
                elif not normalize:
                    per_query.append(num)
            out[bi, hi] = np.mean(per_query) if per_query else np.nan
    return out


# -------------------------------------------------------------------------------- geometry
@pytest.mark.parametrize("grid", [(4, 4), (5, 3), (1, 6)])
def test_hop_distance_matrix_is_chebyshev(grid):
    lay = layout(grid=grid)
    d = hop_distance_matrix(lay)
    p = lay.num_patches
    assert d.shape == (p, p)
    for i in range(p):
        for j in range(p):
            (ri, ci), (rj, cj) = naive_rc(lay, i), naive_rc(lay, j)
            assert d[i, j] == max(abs(ri - rj), abs(ci - cj))
    assert int(d.max()) + 1 == max(grid)


# ------------------------------------------------------------------------------ hop profile
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_hop_profile_matches_double_loop(name):
    lay = LAYOUTS[name]
    a = random_attention(lay, seed=len(name))
    got = hop_profile(a, lay)
    want = naive_hop_profile(a.numpy().astype(np.float64), lay)
    assert got.shape == (2, 3, max(lay.grid))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-8)
    # numpy input gives the same answer as a tensor
    np.testing.assert_allclose(hop_profile(a.numpy(), lay), got, rtol=1e-6)


def test_entropy_from_profile_matches_loop_on_hand_made_profiles():
    profiles = [
        [1.0],
        [0.5, 0.5],
        [0.98, 0.01, 0.005, 0.005],
        [0.2, 0.0, 0.3, 0.0, 0.5],  # empty bins count as 0 ln 0 = 0
        [3.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0],
        [1 / 197] * 14,
        [0.0, 0.0, 0.0],  # fully pruned head: undefined
    ]
    for prof in profiles:
        got = float(entropy_from_profile(np.array(prof)))
        want = naive_entropy(prof)
        if math.isnan(want):
            assert math.isnan(got)
        else:
            assert got == pytest.approx(want, abs=1e-12)
    assert float(entropy_from_profile([1 / 197] * 14)) == pytest.approx(math.log(14))
    # batched input keeps the leading axes
    batch = np.random.default_rng(0).random((2, 3, 5))
    np.testing.assert_allclose(
        entropy_from_profile(batch), [[naive_entropy(p) for p in row] for row in batch], rtol=1e-12
    )
    with pytest.raises(ValueError, match="negative"):
        entropy_from_profile([0.5, -0.1])


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_uniform_head_has_maximal_entropy(name):
    lay = LAYOUTS[name]
    t = lay.num_tokens
    a = torch.full((1, 2, t, t), 1.0 / t)
    out = attention_strength(a, lay)
    np.testing.assert_allclose(out["hop_profile"], 1.0 / t, rtol=1e-6)
    np.testing.assert_allclose(out["entropy"], math.log(max(lay.grid)), rtol=1e-6)
    assert uniform_entropy(lay) == pytest.approx(math.log(max(lay.grid)))


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_identity_head_has_zero_entropy_and_distance(name):
    lay = LAYOUTS[name]
    a = torch.eye(lay.num_tokens).expand(2, 3, -1, -1)
    out = attention_strength(a, lay)
    np.testing.assert_allclose(out["entropy"], 0.0, atol=1e-7)
    np.testing.assert_allclose(out["mean_distance"], 0.0, atol=1e-7)
    expected_hop = np.zeros(max(lay.grid))
    expected_hop[0] = 1.0  # every patch pair at hop 0 is (i, i) and carries weight 1
    np.testing.assert_allclose(out["hop_profile"][0, 0], expected_hop, atol=1e-7)


# -------------------------------------------------------------------------- mean distance
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_mean_distance_matches_loop(name):
    lay = LAYOUTS[name]
    a = random_attention(lay, b=2, h=2, seed=7, sharpness=2.0)
    a64 = a.numpy().astype(np.float64)
    np.testing.assert_allclose(attention_strength(a, lay)["mean_distance"], naive_mean_distance(a64, lay), rtol=1e-5)
    np.testing.assert_allclose(
        mean_attention_distance(a, lay, normalize=False), naive_mean_distance(a64, lay, normalize=False), rtol=1e-5
    )


def test_mean_distance_of_fixed_offset_head_is_the_offset_in_pixels():
    # Every patch attends to its right-hand neighbour (the last column attends to itself).
    lay = layout(grid=(3, 4), patch=(8, 6))
    t = lay.num_tokens
    a = torch.zeros(1, 1, t, t)
    a[0, 0, 0, 0] = 1.0
    for k in range(lay.num_patches):
        r, c = divmod(k, 4)
        target = k + 1 if c < 3 else k
        a[0, 0, 1 + k, 1 + target] = 1.0
    out = attention_strength(a, lay)
    # 9 of 12 queries move one column (6 px); the 3 in the last column stay.
    assert out["mean_distance"][0, 0] == pytest.approx(9 * 6 / 12)


def test_queries_without_patch_mass_are_skipped():
    lay = layout()
    t = lay.num_tokens
    a = torch.zeros(1, 1, t, t)
    a[0, 0, :, 0] = 1.0  # every token attends only to CLS
    a[0, 0, 1, 2] = 1.0  # except patch 0, which attends to patch 1 (8 px away)
    a[0, 0, 1, 0] = 0.0
    out = attention_strength(a, lay)
    assert out["mean_distance"][0, 0] == pytest.approx(8.0)
    pruned = attention_strength(torch.zeros(1, 1, t, t), lay)
    assert np.isnan(pruned["mean_distance"][0, 0]) and np.isnan(pruned["entropy"][0, 0])


# ------------------------------------------------------------------------------ CLS mass
@pytest.mark.parametrize("name", ["cls_4x4", "distilled_5x3", "registers_3x5"])
def test_cls_measures_match_direct_indexing(name):
    lay = LAYOUTS[name]
    a = random_attention(lay, seed=3)
    out = attention_strength(a, lay)
    an = a.numpy().astype(np.float64)
    p0 = lay.num_prefix
    for b in range(2):
        for h in range(3):
            assert out["cls_self"][b, h] == pytest.approx(an[b, h, 0, 0], rel=1e-6)
            assert out["cls_to_patch"][b, h] == pytest.approx(sum(an[b, h, 0, p0:]), rel=1e-5)
            assert out["patch_to_cls"][b, h] == pytest.approx(np.mean([an[b, h, i, 0] for i in range(p0, lay.num_tokens)]), rel=1e-5)


def test_models_without_cls_get_nan_cls_measures():
    lay = LAYOUTS["no_cls_4x4"]
    out = attention_strength(random_attention(lay), lay)
    for k in ("cls_self", "cls_to_patch", "patch_to_cls"):
        assert out[k].shape == (2, 3) and np.isnan(out[k]).all()
    assert np.isfinite(out["entropy"]).all()


def test_shapes_dtypes_and_errors():
    lay = LAYOUTS["distilled_5x3"]
    out = attention_strength(random_attention(lay, b=4, h=2), lay)
    assert out["hop_profile"].shape == (4, 2, 5)
    for k in SCALAR_MEASURES:
        assert out[k].shape == (4, 2) and out[k].dtype == np.float32
    with pytest.raises(ValueError, match="tokens but the layout"):
        attention_strength(torch.rand(1, 2, 10, 10), lay)
    with pytest.raises(ValueError, match=r"\(B, H, T, T\)"):
        attention_strength(torch.rand(1, 12, 2, 17, 17), lay)


# ----------------------------------------------------------------------------- summaries
def test_strength_frame_and_summary_match_pandas_by_hand():
    lay = LAYOUTS["cls_4x4"]
    frames = []
    for layer in range(2):
        a = random_attention(lay, b=5, h=3, seed=layer)
        frames.append(strength_frame(attention_strength(a, lay), layer, image_ids=[f"img{i}" for i in range(5)]))
    rows = pd.concat(frames, ignore_index=True)
    assert len(rows) == 2 * 5 * 3 and set(rows["image"]) == {f"img{i}" for i in range(5)}
    summary = summarize_strength(rows)
    assert len(summary) == 6 and (summary["n_images"] == 5).all()
    for _, row in summary.iterrows():
        sel = rows[(rows["layer"] == row["layer"]) & (rows["head"] == row["head"])]
        for m in SCALAR_MEASURES:
            v = np.sort(sel[m].to_numpy(dtype=np.float64))
            assert row[f"{m}_mean"] == pytest.approx(v.mean(), rel=1e-6)
            assert row[f"{m}_median"] == pytest.approx(v[2], rel=1e-6)  # 5 values: the 3rd
            assert row[f"{m}_q25"] == pytest.approx(v[1], rel=1e-6)  # linear quantile at 0.25*(5-1) = 1
            assert row[f"{m}_q75"] == pytest.approx(v[3], rel=1e-6)
        np.testing.assert_allclose(row["hop_profile_mean"], np.mean(np.stack(sel["hop_profile"].to_list()), axis=0), rtol=1e-6)
    with pytest.raises(ValueError, match="layer"):
        summarize_strength(rows.drop(columns=["layer"]))


# ------------------------------------------------------------------------- real DeiT-Tiny
def test_deit_tiny_strength_follows_the_paper_direction(deit_tiny, imagenet_images):
    from PIL import Image

    paths, _ = imagenet_images
    x = deit_tiny.preprocess([Image.open(p).convert("RGB") for p in paths[:2]])
    attn = deit_tiny.attention(x)  # (2, 12, 3, 197, 197)
    lay = deit_tiny.layout
    per_layer = [attention_strength(attn[:, layer], lay) for layer in range(deit_tiny.num_layers)]
    ent = np.stack([r["entropy"] for r in per_layer], axis=1)  # (B, L, H)
    ln14 = math.log(14)
    assert (ent >= -1e-6).all() and (ent <= ln14 + 1e-5).all()
    # Early layers hold local heads: at least one layer-0 head is far below the uniform ln 14.
    assert ent[:, 0].min() < 1.0
    # Layers 8-11 are distance-agnostic: every head near ln 14.
    late = ent[:, 8:]
    assert late.min() > ln14 - 0.4 and late.mean() > ln14 - 0.1
    assert ent[:, 0].mean() < late.mean()
    # Mass identity on real maps: sum_n S_n * (pairs at hop n) = total patch -> patch mass.
    d = hop_distance_matrix(lay)
    counts = np.bincount(d.reshape(-1).numpy(), minlength=14)
    for layer in (0, 11):
        app = attn[:, layer, :, 1:, 1:].double().sum(dim=(-1, -2)).numpy()
        np.testing.assert_allclose(per_layer[layer]["hop_profile"] @ counts, app, rtol=1e-5)
        # Rows sum to one: CLS row mass splits into CLS->CLS and CLS->patches (no other prefix).
        np.testing.assert_allclose(per_layer[layer]["cls_self"] + per_layer[layer]["cls_to_patch"], 1.0, rtol=1e-5)
    # Pixel distances live on a 224 px image: between 0 and the diagonal.
    md = np.stack([r["mean_distance"] for r in per_layer], axis=1)
    assert (md >= 0).all() and (md < 224 * math.sqrt(2)).all()
    assert md[:, 8:].mean() > md[:, 0].min()

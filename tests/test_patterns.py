"""Attention patterns: autoencoder inputs, the autoencoder, the catalogue and the heuristic names."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import adjusted_rand_score

from vitscope.analysis.patterns import (
    PATTERN_NAMES,
    AutoencoderResult,
    catalogue_patterns,
    density_grid,
    describe_prototype,
    dominant_cluster,
    image_overview,
    offset_profile,
    pattern_inputs,
    project_2d,
    train_autoencoder,
)
from vitscope.models.layout import TokenLayout


def layout(grid=(7, 7), prefix=1, cls=0) -> TokenLayout:
    return TokenLayout(num_prefix=prefix, cls_index=cls, dist_index=None, register_indices=(), grid=grid, patch_size=(16, 16))


# ----------------------------------------------------------------- synthetic pattern families
FAMILY_NAMES = {
    "self": "self/diagonal",
    "left": "neighbour left",
    "right": "neighbour right",
    "up": "neighbour up",
    "down": "neighbour down",
    "row": "row",
    "column": "column",
    "local": "local window",
    "uniform": "uniform/global",
    "content": "content",
}


def family_attention(family: str, lay: TokenLayout, n: int, rng: np.random.Generator, noise: float = 0.3) -> torch.Tensor:
    """``(n, 1, T, T)`` softmax attention whose patch block follows one pattern family, plus logit noise."""
    gr, gc = lay.grid
    t, p0 = lay.num_tokens, lay.num_prefix
    r, c = np.repeat(np.arange(gr), gc), np.tile(np.arange(gc), gr)
    dr, dc = r[None, :] - r[:, None], c[None, :] - c[:, None]  # key minus query
    same = (dr == 0) & (dc == 0)
    out = np.zeros((n, 1, t, t))
    for k in range(n):
        logits = np.zeros((t, t))
        block = {
            "self": same,
            # a query on the edge with no such neighbour attends to itself
            "left": ((dr == 0) & (dc == -1)) | ((c[:, None] == 0) & same),
            "right": ((dr == 0) & (dc == 1)) | ((c[:, None] == gc - 1) & same),
            "up": ((dc == 0) & (dr == -1)) | ((r[:, None] == 0) & same),
            "down": ((dc == 0) & (dr == 1)) | ((r[:, None] == gr - 1) & same),
            "row": dr == 0,
            "column": dc == 0,
            "uniform": np.zeros_like(same),
        }
        if family == "local":
            logits[p0:, p0:] = -(dr**2 + dc**2) / 1.0
        elif family == "content":  # every query looks at one 3x3 object, placed at random
            cr, cc = rng.integers(1, gr - 1), rng.integers(1, gc - 1)
            obj = (np.abs(r - cr) <= 1) & (np.abs(c - cc) <= 1)
            logits[p0:, p0:] = 6.0 * obj[None, :]
        elif family == "sink":
            logits[p0:, 0] = 10.0
        else:
            logits[p0:, p0:] = 6.0 * block[family]
        logits += noise * rng.standard_normal((t, t))
        e = np.exp(logits - logits.max(axis=-1, keepdims=True))
        out[k, 0] = e / e.sum(axis=-1, keepdims=True)
    return torch.from_numpy(out).float()


def family_maps(families, lay, n, seed=0, noise=0.5, key="offset"):
    rng = np.random.default_rng(seed)
    maps, labels = [], []
    for i, fam in enumerate(families):
        maps.append(pattern_inputs(family_attention(fam, lay, n, rng, noise=noise), lay)[key][:, 0])
        labels += [i] * n
    return np.concatenate(maps), np.array(labels)


# ------------------------------------------------------------------------------------ inputs
@pytest.mark.parametrize("grid", [(7, 7), (14, 14), (5, 9)])
def test_pattern_inputs_shapes_and_ranges_for_any_grid(grid):
    lay = layout(grid)
    g = torch.Generator().manual_seed(0)
    attn = torch.randn(2, 3, lay.num_tokens, lay.num_tokens, generator=g).softmax(-1)
    out = pattern_inputs(attn, lay, size=16, radius=7, cls_size=14)
    assert out["offset"].shape == (2, 3, 2, 15, 15)
    assert out["patch"].shape == (2, 3, 1, 16, 16)
    assert out["cls"].shape == (2, 3, 2, 14, 14)
    for name, v in out.items():
        assert v.dtype == np.float16, name
        assert np.isfinite(v).all() and v.min() >= 0 and v.max() <= 1, name
    # every max-normalised map peaks at exactly 1
    np.testing.assert_allclose(out["offset"].max(axis=(-1, -2)), 1.0, atol=1e-3)
    np.testing.assert_allclose(out["patch"].max(axis=(-1, -2)), 1.0, atol=1e-3)
    np.testing.assert_allclose(out["cls"][:, :, 0].max(axis=(-1, -2)), 1.0, atol=1e-3)


def test_models_without_cls_have_no_cls_maps():
    lay = layout((4, 4), prefix=0, cls=None)
    out = pattern_inputs(torch.full((1, 2, 16, 16), 1 / 16), lay)
    assert set(out) == {"offset", "patch"}


@pytest.mark.parametrize("grid,radius", [((4, 5), 2), ((3, 4), 7)])
def test_offset_profile_matches_naive_loop(grid, radius):
    lay = layout(grid, prefix=0, cls=None)
    p = lay.num_patches
    a = torch.rand(2, 1, p, p, generator=torch.Generator().manual_seed(1))
    got = offset_profile(a, lay, radius).numpy()
    k = 2 * radius + 1
    want = np.zeros((2, 1, k, k))
    for drow in range(-radius, radius + 1):
        for dcol in range(-radius, radius + 1):
            vals = []
            for i in range(p):
                ri, ci = divmod(i, grid[1])
                rj, cj = ri + drow, ci + dcol
                if 0 <= rj < grid[0] and 0 <= cj < grid[1]:
                    vals.append(a[:, 0, i, rj * grid[1] + cj].numpy())
            if vals:
                want[:, 0, drow + radius, dcol + radius] = np.mean(vals, axis=0)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def test_patch_block_pooling_matches_block_means():
    lay = layout((4, 4))  # P = 16
    a = torch.rand(1, 1, 17, 17, generator=torch.Generator().manual_seed(2)).softmax(-1)
    block = a[0, 0, 1:, 1:].double().numpy()
    pooled = pattern_inputs(a, lay, size=4)["patch"][0, 0, 0].astype(np.float64)
    means = block.reshape(4, 4, 4, 4).mean(axis=(1, 3))
    np.testing.assert_allclose(pooled, means / means.max(), atol=2e-3)  # float16 storage
    full = pattern_inputs(a, lay, size=16)["patch"][0, 0, 0].astype(np.float64)
    np.testing.assert_allclose(full, block / block.max(), atol=2e-3)


def test_cls_maps_keep_column_level_and_row_peak_position():
    lay = layout((7, 7))
    t = lay.num_tokens
    a = torch.full((1, 1, t, t), 0.0)
    a[0, 0, 1:, 0] = 0.3  # every patch sends 0.3 to CLS ...
    a[0, 0, 1:, 1:] = 0.7 / 49
    a[0, 0, 0, 1 + 2 * 7 + 5] = 1.0  # ... and CLS reads only patch (2, 5)
    cls = pattern_inputs(a, lay, cls_size=14)["cls"][0, 0].astype(np.float64)
    np.testing.assert_allclose(cls[1], 0.3, atol=1e-3)  # probability units, not max-normalised
    r, c = np.unravel_index(np.argmax(cls[0]), cls[0].shape)
    assert r in (4, 5) and c in (10, 11)  # (2, 5) on 7x7 lands at (2*2.., 5*2..) on 14x14
    # on a 14x14 grid the row is the CLS row itself, divided by its max
    lay14 = layout((14, 14))
    b = torch.rand(1, 1, 197, 197, generator=torch.Generator().manual_seed(3)).softmax(-1)
    row = pattern_inputs(b, lay14)["cls"][0, 0, 0].astype(np.float64)
    want = b[0, 0, 0, 1:].double().numpy().reshape(14, 14)
    np.testing.assert_allclose(row, want / want.max(), atol=2e-3)


def test_key_map_is_centred_on_its_peak():
    lay = layout((7, 7))
    t = lay.num_tokens
    a = torch.full((1, 1, t, t), 0.01)
    a[0, 0, :, 1 + 0 * 7 + 6] = 5.0  # everyone looks at the top-right patch
    a = a / a.sum(-1, keepdim=True)
    keys = pattern_inputs(a, lay)["offset"][0, 0, 1].astype(np.float64)
    assert np.unravel_index(np.argmax(keys), keys.shape) == (7, 7)
    flat = pattern_inputs(torch.full((1, 1, t, t), 1 / t), lay)["offset"][0, 0, 1].astype(np.float64)
    np.testing.assert_allclose(flat, 1.0, atol=1e-3)


# --------------------------------------------------------------------------------- naming
@pytest.mark.parametrize("grid", [(14, 14), (7, 7), (5, 9)])
def test_describe_prototype_names_each_synthetic_family(grid):
    lay = layout(grid)
    rng = np.random.default_rng(0)
    for fam, expected in FAMILY_NAMES.items():
        maps = pattern_inputs(family_attention(fam, lay, 3, rng), lay)
        for i in range(3):
            assert describe_prototype(maps["offset"][i, 0], "offset") == expected, (fam, grid)
            assert describe_prototype(maps["offset"][i, 0], "offset", grid=grid) == expected, (fam, grid)
        assert describe_prototype(maps["cls"][0, 0], "cls") != "CLS-sink"
    sink = pattern_inputs(family_attention("sink", lay, 2, rng), lay)
    assert describe_prototype(sink["cls"][0, 0], "cls") == "CLS-sink"
    assert set(FAMILY_NAMES.values()) | {"CLS-sink"} <= set(PATTERN_NAMES)


def test_describe_prototype_on_patch_blocks():
    p = 16
    assert describe_prototype(np.eye(p), "patch") == "self/diagonal"
    assert describe_prototype(np.ones((p, p)), "patch") == "uniform/global"
    # shift by one column on a 4x4 grid: every query attends to the patch on its left
    shift = np.zeros((p, p))
    for i in range(p):
        r, c = divmod(i, 4)
        shift[i, i - 1 if c > 0 else i] = 1.0
    assert describe_prototype(shift, "patch", grid=(4, 4)) == "neighbour left"
    assert describe_prototype(shift.T, "patch", grid=(4, 4)) == "neighbour right"
    # a 196x196 identity pooled to 16x16 is still a diagonal
    pooled = pattern_inputs(torch.eye(197)[None, None], layout((14, 14)))["patch"][0, 0]
    assert describe_prototype(pooled, "patch") == "self/diagonal"
    assert describe_prototype(np.zeros((p, p)), "patch") == "empty"
    with pytest.raises(ValueError, match="2 channels"):
        describe_prototype(np.ones((1, 14, 14)), "cls")
    with pytest.raises(ValueError, match="unknown map kind"):
        describe_prototype(np.ones((15, 15)), "rows")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- autoencoder
@pytest.fixture(scope="module")
def positional_families():
    families = ["self", "left", "row", "uniform"]
    maps, labels = family_maps(families, layout((7, 7)), n=60, seed=0)
    ae = train_autoencoder(maps, latent_dim=8, epochs=30, seed=0, batch_size=32)
    return families, maps, labels, ae


def test_autoencoder_recovers_synthetic_families(positional_families):
    families, maps, labels, ae = positional_families
    assert ae.codes.shape == (len(maps), 8) and ae.reconstruction_error.shape == (len(maps),)
    assert ae.loss_history[-1] < ae.loss_history[0] / 3
    cat = catalogue_patterns(ae.codes, n_clusters=4, seed=0, projection="pca", autoencoder=ae, kind="offset", maps=maps)
    assert adjusted_rand_score(labels, cat.labels) > 0.9
    # each cluster's decoded prototype and member vote name the family it holds
    expected = {k: FAMILY_NAMES[families[Counter(labels[cat.labels == k]).most_common(1)[0][0]]] for k in range(4)}
    assert cat.names == [expected[k] for k in range(4)]
    assert cat.member_names == [expected[k] for k in range(4)]
    assert cat.prototypes.shape == (4, 2, 15, 15)
    assert cat.sizes.sum() == len(maps) and sorted(cat.sizes) == [60, 60, 60, 60]


def test_autoencoder_on_another_grid_and_kind():
    families = ["up", "column", "local", "uniform"]
    maps, labels = family_maps(families, layout((14, 14)), n=40, seed=1)
    ae = train_autoencoder(maps, latent_dim=8, epochs=30, seed=0, batch_size=32)
    cat = catalogue_patterns(ae.codes, n_clusters=4, seed=0, projection="pca")
    assert adjusted_rand_score(labels, cat.labels) > 0.9
    # the CLS maps of a non-square grid train too (any channel count / size)
    cls_maps, _ = family_maps(["sink", "uniform"], layout((5, 9)), n=20, seed=2, key="cls")
    ae_cls = train_autoencoder(cls_maps, latent_dim=4, epochs=5, seed=0, batch_size=16, min_steps=0)
    assert ae_cls.codes.shape == (40, 4) and ae_cls.decode(ae_cls.codes[:3]).shape == (3, 2, 14, 14)


def test_autoencoder_is_reproducible_and_leaves_global_state_alone(positional_families):
    _, maps, _, ae = positional_families
    sub = maps[::4]
    rng_before = torch.random.get_rng_state().clone()
    threads = torch.get_num_threads()
    a = train_autoencoder(sub, latent_dim=4, epochs=3, seed=5, batch_size=16, min_steps=0)
    b = train_autoencoder(sub, latent_dim=4, epochs=3, seed=5, batch_size=16, min_steps=0)
    c = train_autoencoder(sub, latent_dim=4, epochs=3, seed=6, batch_size=16, min_steps=0)
    assert np.array_equal(a.codes, b.codes) and a.loss_history == b.loss_history
    assert not np.array_equal(a.codes, c.codes)
    assert torch.equal(torch.random.get_rng_state(), rng_before)
    assert torch.get_num_threads() == threads
    # subsampled training still encodes every map
    d = train_autoencoder(sub, latent_dim=4, epochs=2, seed=5, batch_size=16, max_train=20, min_steps=0)
    assert len(d.train_indices) == 20 and d.codes.shape == (len(sub), 4)


def test_autoencoder_state_dict_round_trip(positional_families):
    _, maps, _, ae = positional_families
    state = ae.state_dict()
    again = AutoencoderResult.from_state_dict(state, maps=maps)
    np.testing.assert_array_equal(again.codes, ae.codes)
    np.testing.assert_allclose(again.decode(ae.codes[:5]), ae.decode(ae.codes[:5]))
    np.testing.assert_allclose(again.reconstruction_error, ae.reconstruction_error)


def test_autoencoder_input_errors(positional_families):
    ae = positional_families[3]
    bad = np.ones((3, 2, 15, 15), dtype=np.float32)
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        train_autoencoder(bad, epochs=1)
    with pytest.raises(ValueError, match=r"\(N, C, S, S\)"):
        train_autoencoder(np.ones((2, 3, 15, 15, 1)), epochs=1)
    with pytest.raises(ValueError, match="trained on"):
        ae.encode(np.ones((2, 1, 15, 15), dtype=np.float32))


# ------------------------------------------------------------------------------- catalogue
def test_catalogue_is_reproducible_and_density_integrates_to_one(positional_families):
    _, maps, labels, ae = positional_families
    a = catalogue_patterns(ae.codes, n_clusters=4, seed=3, projection="pca")
    b = catalogue_patterns(ae.codes, n_clusters=4, seed=3, projection="pca")
    assert np.array_equal(a.labels, b.labels) and np.array_equal(a.embedding, b.embedding)
    assert a.embedding.shape == (len(maps), 2) and a.centroids.shape == (4, 8)
    assert a.prototypes is None and a.names is None
    dx, dy = a.grid_x[1] - a.grid_x[0], a.grid_y[1] - a.grid_y[0]
    assert a.density.shape == (64, 64) and a.density.sum() * dx * dy == pytest.approx(1.0)
    for k in range(4):
        np.testing.assert_allclose(a.centroid_embedding[k], a.embedding[a.labels == k].mean(axis=0), rtol=1e-5)
    with pytest.raises(ValueError, match="n_clusters"):
        catalogue_patterns(ae.codes[:3], n_clusters=4)


def test_density_grid_agrees_with_gaussian_kde():
    from scipy.stats import gaussian_kde

    rng = np.random.default_rng(0)
    pts = np.concatenate([rng.normal((0, 0), 1.0, (300, 2)), rng.normal((5, 2), 0.5, (200, 2))])
    density, gx, gy = density_grid(pts, size=48)
    xx, yy = np.meshgrid(gx, gy)
    kde = gaussian_kde(pts.T)(np.vstack([xx.ravel(), yy.ravel()])).reshape(xx.shape)
    assert np.corrcoef(density.ravel(), kde.ravel())[0, 1] > 0.97
    np.testing.assert_allclose(density.max(), kde.max(), rtol=0.25)


def test_tsne_projection_and_errors():
    rng = np.random.default_rng(0)
    pts = np.concatenate([rng.normal(0, 1, (30, 5)), rng.normal(8, 1, (30, 5))]).astype(np.float32)
    a = project_2d(pts, "tsne", seed=1)
    b = project_2d(pts, "tsne", seed=1)
    assert a.shape == (60, 2) and np.array_equal(a, b)
    # the two groups stay apart
    gap = np.linalg.norm(a[:30].mean(0) - a[30:].mean(0))
    assert gap > 3 * max(a[:30].std(0).max(), a[30:].std(0).max())
    with pytest.raises(ValueError, match="unknown projection"):
        project_2d(pts, "mds")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="NaN"):
        project_2d(np.full((12, 2), np.nan))


@pytest.mark.slow
def test_umap_catalogue_overview_and_subsampled_fit(positional_families):
    _, maps, labels, ae = positional_families
    a = catalogue_patterns(ae.codes, n_clusters=4, seed=0, projection="umap")
    b = catalogue_patterns(ae.codes, n_clusters=4, seed=0, projection="umap")
    assert np.array_equal(a.embedding, b.embedding) and np.isfinite(a.embedding).all()
    # fitted on a 100-point subsample, the rest placed by nearest neighbours: families stay apart
    emb = project_2d(ae.codes, "umap", seed=0, max_fit_points=100)
    centres = np.stack([emb[labels == k].mean(0) for k in range(4)])
    spread = max(np.linalg.norm(emb[labels == k] - centres[k], axis=1).mean() for k in range(4))
    gaps = [np.linalg.norm(centres[i] - centres[j]) for i in range(4) for j in range(i + 1, 4)]
    assert min(gaps) > spread
    # image overview: two groups of images with different pruned-probability profiles
    rng = np.random.default_rng(0)
    probs = np.concatenate([rng.uniform(0.8, 1.0, (25, 36)), rng.uniform(0.0, 0.3, (25, 36))]).astype(np.float32)
    xy = image_overview(probs, seed=0)
    assert xy.shape == (50, 2) and np.array_equal(xy, image_overview(probs, seed=0))
    group = np.repeat([0, 1], 25)
    from sklearn.neighbors import KNeighborsClassifier

    assert KNeighborsClassifier(3).fit(xy, group).score(xy, group) == 1.0


def test_image_overview_falls_back_to_pca_for_few_images():
    from sklearn.decomposition import PCA

    probs = np.random.default_rng(0).random((6, 12)).astype(np.float32)
    xy = image_overview(probs)
    np.testing.assert_allclose(xy, PCA(2, svd_solver="full").fit_transform(probs), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match=r"\(N_images, L\*H\)"):
        image_overview(np.ones(5))


# ------------------------------------------------------------------------------- dominant
def test_dominant_cluster_from_array_and_frame():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, size=(20, 2, 3))
    labels[:, 1, 2] = np.array([4] * 10 + [1] * 10)  # a tie: the smaller id wins
    dom = dominant_cluster(labels)
    assert len(dom) == 6 and (dom["n_images"] == 20).all()
    for row in dom.itertuples():
        counts = Counter(labels[:, row.layer, row.head].tolist())
        best = max(counts.values())
        assert row.cluster == min(k for k, v in counts.items() if v == best)
        assert row.share == pytest.approx(best / 20)
    assert dom.set_index(["layer", "head"]).loc[(1, 2), "cluster"] == 1
    n, l, h = labels.shape
    frame = pd.DataFrame(
        {
            "image": np.repeat(np.arange(n), l * h),
            "layer": np.tile(np.repeat(np.arange(l), h), n),
            "head": np.tile(np.arange(h), n * l),
            "cluster": labels.reshape(-1),
        }
    )
    pd.testing.assert_frame_equal(dominant_cluster(frame), dom, check_dtype=False)
    with pytest.raises(ValueError, match="cluster"):
        dominant_cluster(frame.drop(columns=["cluster"]))


def test_autoencoder_reconstructs_sparse_maps_better_than_their_mean():
    # Sparse maps like a trained model's CLS rows (one bright blob on a near-zero grid, mean ~0.05):
    # a saturating output layer collapses to all zeros on these and loses to the per-pixel mean.
    rng = np.random.default_rng(0)
    n, s = 2000, 14
    yy, xx = np.mgrid[0:s, 0:s]
    cy, cx = rng.integers(0, s, n), rng.integers(0, s, n)
    blob = np.exp(-((yy[None] - cy[:, None, None]) ** 2 + (xx[None] - cx[:, None, None]) ** 2) / 2.0)
    maps = np.stack([blob, 0.3 * blob[:, ::-1]], axis=1).astype(np.float32)
    assert maps.mean() < 0.1
    ae = train_autoencoder(maps, latent_dim=8, seed=0)
    baseline = float(((maps - maps.mean(0)) ** 2).mean())
    assert ae.reconstruction_error.mean() < 0.5 * baseline
    decoded = ae.decode(ae.codes[:50])
    assert decoded.min() >= 0.0 and decoded.max() <= 1.0


def test_umap_kernels_get_numbas_disk_cache():
    """The kernels umap-learn compiles in every process (about 8 s) are cached on disk once
    :func:`vitscope.analysis.patterns._umap` has run; a rename in umap-learn shows up here."""
    import importlib

    from numba.core.caching import NullCache

    from vitscope.analysis import patterns

    patterns._umap()
    for module_name, names in patterns._UMAP_UNCACHED_KERNELS.items():
        module = importlib.import_module(module_name)
        for name in names:
            kernel = getattr(module, name)
            assert not isinstance(kernel._cache, NullCache), f"{module_name}.{name} is not cached"

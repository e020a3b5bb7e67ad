"""The window-free transformer: masked attention against an explicit reference, masks from fields,
mask round trips through `vitscope train` and `load_model`, and vitscope's capture on a WinfT."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import vitscope
from vitscope.models import registry  # noqa: F401 - registers the WinfT architectures
from vitscope.models.builtin import FMNIST_VIT_TINY_ARGS, create_fmnist_vit_tiny
from vitscope.models.layout import TokenLayout
from vitscope.analysis.fields import winft_masks_from_fields
from vitscope.core.grid import matching_window
from vitscope.figures.winft import draw_winft_masks, masks_and_layout
from vitscope.models.winft import (
    WinfT,
    WinfTMaskError,
    layout_of,
    mask_stats,
    read_mask_file,
    save_masks,
    window_masks,
)

#: The built-in Fashion-MNIST ViT's layout: CLS + 7x7 patches.
FMNIST_LAYOUT = TokenLayout(1, 0, None, (), (7, 7), (4, 4))


pytestmark = pytest.mark.usefixtures("one_thread")


def chebyshev_window(grid: tuple[int, int], k: int, num_prefix: int = 1) -> torch.Tensor:
    """(T, T) window mask written out with loops: CLS global, patch i sees patch j iff max(|dr|, |dc|) <= (k-1)/2."""
    R, C = grid
    T = num_prefix + R * C
    m = torch.ones(T, T, dtype=torch.bool)
    for i in range(R * C):
        for j in range(R * C):
            (ri, ci), (rj, cj) = divmod(i, C), divmod(j, C)
            m[num_prefix + i, num_prefix + j] = max(abs(ri - rj), abs(ci - cj)) <= (k - 1) // 2
    return m


def reference_forward(model: torch.nn.Module, x: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A timm pre-norm ViT written out with an explicit masked softmax: logits and every layer's attention."""
    h = model._pos_embed(model.patch_embed(x))
    attns = []
    for blk, allowed in zip(model.blocks, masks):
        a = blk.attn
        y = blk.norm1(h)
        B, N, C = y.shape
        q, k, v = a.qkv(y).reshape(B, N, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)
        scores = (q @ k.transpose(-2, -1)) * a.scale
        scores = scores.masked_fill(~allowed, float("-inf"))
        p = scores.softmax(-1)
        attns.append(p)
        h = h + a.proj((p @ v).transpose(1, 2).reshape(B, N, C))
        h = h + blk.mlp(blk.norm2(h))
    return model.head(model.norm(h)[:, 0]), attns


def random_masks(L: int, layout: TokenLayout, density: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    P, pre = layout.num_patches, layout.num_prefix
    keys = (torch.rand(L, P, P, generator=g) < density) | torch.eye(P, dtype=torch.bool)
    m = torch.ones(L, layout.num_tokens, layout.num_tokens, dtype=torch.bool)
    m[:, pre:, pre:] = keys
    return m


# --------------------------------------------------------------------------- model and masks


def test_window_model_matches_explicit_masked_attention():
    torch.manual_seed(0)
    model = timm.create_model("winft_fmnist_tiny", window=3).double().eval()
    assert isinstance(model, WinfT)
    expected_mask = chebyshev_window((7, 7), 3)
    assert torch.equal(model.allowed_masks(), expected_mask.expand(6, -1, -1))
    x = torch.randn(3, 1, 28, 28, dtype=torch.float64)
    with torch.no_grad():
        got = model(x)
        ref, _ = reference_forward(model, x, model.allowed_masks())
        unmasked, _ = reference_forward(model, x, torch.ones_like(model.allowed_masks()))
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)
    # The window really changes the computation (otherwise the comparison above proves nothing).
    assert (got - unmasked).abs().max() > 1e-4


def test_arbitrary_masks_match_reference_and_sizes_match_vit():
    layout = FMNIST_LAYOUT
    masks = random_masks(6, layout, 0.2, seed=1)
    torch.manual_seed(1)
    model = timm.create_model("winft_fmnist_tiny", masks=masks).double().eval()
    x = torch.randn(2, 1, 28, 28, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference_forward(model, x, masks)[0], rtol=1e-10, atol=1e-10)
    # Same parameters as the built-in plain ViT, plus one mask buffer per block.
    plain = create_fmnist_vit_tiny()
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in plain.state_dict().items()}
    assert {k: s for k, s in ours.items() if not k.endswith("attn_allowed")} == theirs
    assert sorted(k for k in ours if k.endswith("attn_allowed")) == sorted(f"blocks.{i}.attn_allowed" for i in range(6))


@pytest.mark.parametrize("name, vit_name", [("winft_tiny_patch16_224", "deit_tiny_patch16_224"),
                                            ("winft_small_patch16_224", "deit_small_patch16_224"),
                                            ("winft_base_patch16_224", "vit_base_patch16_224")])  # fmt: skip
def test_imagenet_sizes_match_deit_vit(name, vit_name):
    ours = timm.create_model(name, device="meta")
    theirs = timm.create_model(vit_name, device="meta")
    shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items() if not k.endswith("attn_allowed")}
    assert shapes == {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    assert ours.allowed_masks().shape == (12, 197, 197)
    assert ours.pretrained_cfg["input_size"] == (3, 224, 224)


def test_global_and_full_window_equal_plain_vit():
    torch.manual_seed(2)
    plain = create_fmnist_vit_tiny().double().eval()
    state = plain.state_dict()
    x = torch.randn(2, 1, 28, 28, dtype=torch.float64)
    with torch.no_grad():
        want = plain(x)
    for kwargs in ({"window": 13}, {}):  # k = 2 * 7 - 1 covers the grid from every query
        model = timm.create_model("winft_fmnist_tiny", **kwargs).double().eval()
        assert bool(model.allowed_masks().all())
        result = model.load_state_dict(state, strict=False)
        assert not result.unexpected_keys and all(k.endswith("attn_allowed") for k in result.missing_keys)
        with torch.no_grad():
            torch.testing.assert_close(model(x), want, rtol=1e-12, atol=1e-12)


def test_cls_global_and_mask_validation():
    layout = FMNIST_LAYOUT
    good = random_masks(6, layout, 0.1, seed=3)
    bad_cls_row = good.clone()
    bad_cls_row[2, 0, 5] = False
    bad_cls_col = good.clone()
    bad_cls_col[4, 7, 0] = False
    for bad in (bad_cls_row, bad_cls_col):
        with pytest.raises(WinfTMaskError, match="globally"):
            WinfT(masks=bad, **FMNIST_VIT_TINY_ARGS)
    with pytest.raises(WinfTMaskError, match=r"\(6, 50, 50\)"):
        WinfT(masks=good[:, 1:, 1:][:, :10, :10], **FMNIST_VIT_TINY_ARGS)
    with pytest.raises(WinfTMaskError, match="either"):
        WinfT(masks=good, window=3, **FMNIST_VIT_TINY_ARGS)
    with pytest.raises(ValueError, match="pretrained"):
        timm.create_model("winft_fmnist_tiny", pretrained=True)
    # A patch-block (L, P, P) mask gets a global CLS row and column.
    model = WinfT(masks=good[:, 1:, 1:], **FMNIST_VIT_TINY_ARGS)
    assert torch.equal(model.allowed_masks(), good)
    # A query without keys is refused, with a model that has no CLS token to fall back on.
    no_cls = dict(FMNIST_VIT_TINY_ARGS, class_token=False, global_pool="avg")
    empty = torch.ones(6, 49, 49, dtype=torch.bool)
    empty[1, 3] = False
    with pytest.raises(WinfTMaskError, match="query token 3 of layer 1"):
        WinfT(masks=empty, **no_cls)


def test_masks_from_synthetic_fields_and_matching_window():
    layout = FMNIST_LAYOUT
    L, P = 3, 49
    rng = np.random.default_rng(0)
    mean = rng.normal(size=(L, P, P))
    significant = rng.random((L, P, P)) < 0.1
    summary = {"mean": mean, "significant": significant}
    masks = winft_masks_from_fields(summary, layout, min_impact=0.5, top_n=2, include_self=True)
    assert masks.shape == (L, 50, 50) and masks.dtype == torch.bool
    expect = torch.ones(L, 50, 50, dtype=torch.bool)
    for l in range(L):
        for i in range(P):
            top2 = set(np.argsort(-mean[l, i], kind="stable")[:2].tolist())
            for j in range(P):
                expect[l, 1 + i, 1 + j] = bool(significant[l, i, j] and mean[l, i, j] > 0.5) or i == j or j in top2
    assert torch.equal(masks, expect)
    assert bool(masks[:, 0, :].all()) and bool(masks[:, :, 0].all())
    # Without self and top-n, a query with no significant key has an empty patch field but still sees CLS.
    bare = winft_masks_from_fields({"mean": mean, "significant": np.zeros_like(significant)}, layout, include_self=False)
    assert not bare[:, 1:, 1:].any() and bool(bare[:, :, 0].all())

    st = mask_stats(masks, layout)
    assert st["keys_per_query"] == pytest.approx(float(expect[:, 1:, 1:].sum()) / (L * P))
    assert st["sparsity"] == pytest.approx(1 - st["keys_per_query"] / P)
    # Mean distance of the non-self keys, with loops.
    total, count = 0.0, 0
    for l in range(L):
        for i in range(P):
            for j in range(P):
                if i != j and expect[l, 1 + i, 1 + j]:
                    total += max(abs(i // 7 - j // 7), abs(i % 7 - j % 7))
                    count += 1
    assert st["key_distance"] == pytest.approx(total / count)
    assert mask_stats(window_masks(layout, 3, 2), layout)["key_distance"] == pytest.approx(1.0)
    # Window budgets counted by hand: a clipped 3x3 window on a 7x7 grid.
    win3 = chebyshev_window((7, 7), 3)[1:, 1:].sum(-1).double().mean().item()
    assert win3 == pytest.approx((25 * 9 + 20 * 6 + 4 * 4) / 49)
    assert matching_window(layout, win3 + 0.4) == (3, pytest.approx(win3))
    assert matching_window(layout, 1.2)[0] == 1
    assert matching_window(layout, 49.0)[0] == 13


def test_window_masks_match_loops_on_other_grid():
    layout = TokenLayout(1, 0, None, (), (4, 6), (8, 8))
    for k in (1, 3, 5):
        assert torch.equal(window_masks(layout, k, 2)[1], chebyshev_window((4, 6), k))


# --------------------------------------------------------------------------- files, training, loading


def _image_folder(root: Path, n_per_class: int = 50) -> Path:
    """4 classes of noisy 28x28 grey images (stripes either way, checkerboard, plain)."""
    g = np.random.default_rng(0)
    r = (np.arange(28) // 4) % 2
    patterns = [np.repeat(r[:, None], 28, 1), np.repeat(r[None, :], 28, 0), r[:, None] ^ r[None, :], np.zeros((28, 28), int)]
    for c, pat in enumerate(patterns):
        d = root / f"class{c}"
        d.mkdir(parents=True)
        for i in range(n_per_class):
            img = np.clip(40 + 170 * pat + g.integers(0, 40, (28, 28)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(d / f"{i}.png")
    return root


def test_masks_roundtrip_through_vitscope_train_and_load_model(tmp_path):
    from typer.testing import CliRunner

    from vitscope.cli import app

    layout = FMNIST_LAYOUT
    masks = random_masks(6, layout, 0.15, seed=4)
    mask_file = save_masks(masks, tmp_path / "masks.safetensors", layout, info={"source": "test"})
    loaded, meta = read_mask_file(mask_file)
    assert torch.equal(loaded, masks) and meta["source"] == "test" and meta["grid"] == [7, 7]

    data = _image_folder(tmp_path / "data")
    out = tmp_path / "run"
    result = CliRunner().invoke(app, [
        "train", "--arch", "winft_fmnist_tiny", "--dataset", str(data), "--out", str(out), "--epochs", "1",
        "--batch-size", "50", "--holdout", "0.2", "--model-arg", f"masks={json.dumps(str(mask_file))}",
        "--device", "cpu", "--no-progress",
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    weights = out / "winft_fmnist_tiny.safetensors"
    mask_file.unlink()  # the weights file alone must rebuild the masks

    vit = vitscope.load_model(str(weights), device="cpu")
    assert isinstance(vit.module, WinfT)
    assert torch.equal(vit.module.allowed_masks(), masks)
    assert vit.num_classes == 4
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        ref, _ = reference_forward(vit.module, x, masks)
        torch.testing.assert_close(vit.module(x), ref, rtol=1e-5, atol=1e-5)
    # The trained weights file is itself a mask source (e.g. for the report figures).
    m2, lay2 = masks_and_layout(weights, layout)
    assert torch.equal(m2, masks) and lay2 == layout


def test_draw_winft_masks_writes_figures(tmp_path):
    layout = FMNIST_LAYOUT
    masks = random_masks(6, layout, 0.2, seed=5)
    model = WinfT(masks=masks, **FMNIST_VIT_TINY_ARGS)
    paths = draw_winft_masks(model, tmp_path / "fig")
    assert [p.name for p in paths] == ["winft_masks.png", "winft_mask_budget.png"]
    for p in paths:
        with Image.open(p) as img:
            assert img.size[0] > 200 and img.size[1] > 150
        assert p.with_suffix(".svg").stat().st_size > 1000
    # A mask file with its layout in the metadata and a bare tensor give the same masks.
    f = save_masks(masks, tmp_path / "m.safetensors", layout)
    assert torch.equal(masks_and_layout(f)[0], masks) and masks_and_layout(f)[1].grid == (7, 7)
    assert masks_and_layout(masks)[1].grid == (7, 7)
    with pytest.raises(WinfTMaskError, match="not a WinfT"):
        masks_and_layout(create_fmnist_vit_tiny())


def test_layout_of_matches_vitscope_backend():
    model = timm.create_model("winft_fmnist_tiny")
    vit = vitscope.load_model(model, device="cpu")
    assert layout_of(vit.module) == vit.layout


# --------------------------------------------------------------------------- vitscope's analysis kernel on a WinfT


def test_vitscope_captures_masked_attention_exactly():
    """The analysis kernel removes the same keys as the model: captured maps, logits and interaction gradients."""
    from vitscope.analysis.interaction import first_order_impact

    torch.manual_seed(6)
    masks = random_masks(6, FMNIST_LAYOUT, 0.2, seed=6)
    vit = vitscope.load_model(timm.create_model("winft_fmnist_tiny", masks=masks), device="cpu")
    x = torch.randn(2, 1, 28, 28)
    attn = vit.attention(x)
    with torch.no_grad():
        ref_logits, ref_attn = reference_forward(vit.module, x, masks)
    torch.testing.assert_close(attn, torch.stack(ref_attn, 1), rtol=1e-5, atol=1e-6)
    assert float((attn * (~masks)[None, :, None]).abs().max()) == 0.0
    # The model's own (fused) forward and the kernel path agree, and gradients reach every layer.
    torch.testing.assert_close(vit.logits(x), ref_logits, rtol=1e-5, atol=1e-5)
    out = first_order_impact(vit, x)
    allowed_patch = masks[:, 1:, 1:]
    assert np.all(out["impact"][:, ~allowed_patch.numpy()] == 0)


# --------------------------------------------------------------------------- experiment bookkeeping


def test_experiment_summary_matches_direct_formulas():
    from vitscope.experiments.winft import markdown_table, summarise

    acc = {("plain", 0): 0.80, ("plain", 1): 0.82, ("plain", 2): 0.81,
           ("window", 0): 0.83, ("window", 1): 0.84, ("window", 2): 0.86,
           ("winft", 0): 0.84, ("winft", 1): 0.83, ("winft", 2): 0.88}  # fmt: skip
    runs = [{"arm": a, "seed": s, "test_accuracy": v, "wall_time_s": 60.0 + s} for (a, s), v in acc.items()]
    summ = summarise(runs, ["plain", "window", "winft"])
    w = [0.84, 0.83, 0.88]
    assert summ["arms"]["winft"]["accuracy_mean"] == pytest.approx(sum(w) / 3)
    assert summ["arms"]["winft"]["accuracy_std"] == pytest.approx((sum((v - sum(w) / 3) ** 2 for v in w) / 2) ** 0.5)
    assert summ["arms"]["plain"]["wall_time_mean_s"] == pytest.approx(61.0)
    d = [0.01, -0.01, 0.02]
    paired = summ["paired"]["winft-window"]
    assert paired["differences"] == pytest.approx(d)
    mean, sd = sum(d) / 3, (sum((v - sum(d) / 3) ** 2 for v in d) / 2) ** 0.5
    assert paired["t"] == pytest.approx(mean / (sd / 3**0.5))
    results = {
        "config": {"arms": ["plain", "window", "winft"]},
        "masks": {"num_patches": 49, "window": 3, "plain_keys_per_query": 49.0, "plain_sparsity": 0.0, "plain_key_distance": 2.5,
                  "window_keys_per_query": 7.37, "window_sparsity": 0.85, "window_key_distance": 1.0,
                  "winft_keys_per_query": 7.1, "winft_sparsity": 0.855, "winft_key_distance": 3.25},
        "summary": summ,
        "runs": runs,
    }  # fmt: skip
    table = markdown_table(results)
    assert "| winft | responsive-field masks | 7.10 | 85.5% | 3.25 | 85.00 ± 2.65 (n=3) | 84.00, 83.00, 88.00 | 1.0 min |" in table
    assert "| winft − window | +0.67 ± 1.53 | +1.00, -1.00, +2.00 |" in table


def test_report_draws_the_masks_of_an_analysed_winft(tmp_path):
    """`vitscope report` on a run of a WinfT draws the model's masks (from the run's winft_masks)."""
    import timm
    import torch

    import vitscope
    from vitscope.pipeline import AnalyzeSettings
    from vitscope.models.builtin import fmnist_pretrained_cfg
    from vitscope.report import write_report
    from vitscope.training import ModelSpec, save_weights

    torch.manual_seed(0)
    model = timm.create_model("winft_fmnist_tiny", window=3)
    path = tmp_path / "winft.safetensors"
    save_weights(model, path, ModelSpec("winft_fmnist_tiny", {"window": 3}), fmnist_pretrained_cfg(), [str(i) for i in range(10)])
    settings = AnalyzeSettings(batch_size=8, n_boot=20, curve_images=8, curve_points=2, ae_epochs=1, ae_min_steps=5, projection="pca", n_clusters=2)
    run = vitscope.analyze(str(path), "sample", tmp_path / "run", limit=8, settings=settings, device="cpu", progress=False)
    path.unlink()  # the report draws the masks from the run alone
    index = write_report(run, svg=True)
    assert (index.parent / "winft_masks.png").exists() and (index.parent / "winft_mask_budget.svg").exists()
    assert "winft_masks.png" in index.read_text()

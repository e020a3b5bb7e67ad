"""Head importance: every measure against an independent reference."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from vitscope.analysis.importance import (
    MODES,
    head_sweep,
    head_sweep_naive,
    metric_agreement,
    partial_pruning,
    pruning_curve,
    pruning_curves,
    summarize_importance,
    taylor_importance,
)
from vitscope.capture.runtime import LayerPlan

SWEEP_KEYS = ("base_prob", "base_loss", "pruned_prob", "pruned_loss")


# Many small forwards: one thread avoids thread start-up costs (shared fixture in conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def rand_x() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randn(5, 3, 32, 32, generator=g)


@pytest.fixture(scope="module")
def random_vit64():
    """The random test ViT in float64, for finite differences."""
    from timm.models.vision_transformer import VisionTransformer

    import vitscope

    torch.manual_seed(3)
    m = VisionTransformer(img_size=32, patch_size=8, num_classes=5, embed_dim=32, depth=3, num_heads=2, mlp_ratio=2.0)
    return vitscope.load_model(m.double(), device="cpu")


@pytest.fixture(scope="module")
def deit_batch(deit_tiny, imagenet_images):
    paths, labels = imagenet_images
    return deit_tiny.preprocess(paths[:2]), labels[:2]


@pytest.fixture(scope="module")
def deit_sweep(deit_tiny, deit_batch):
    x, y = deit_batch
    return head_sweep(deit_tiny, x, y)


def _assert_sweeps_equal(fast: dict, naive: dict, tol: float = 1e-5) -> None:
    for k in ("prediction", "target", "pruned_correct"):
        np.testing.assert_array_equal(fast[k], naive[k], err_msg=k)
    for k in SWEEP_KEYS:
        np.testing.assert_allclose(fast[k], naive[k], atol=tol, rtol=0, err_msg=k)


# ------------------------------------------------------------------ sweep
def test_sweep_matches_naive_random_vit(random_vit, rand_x):
    targets = [1, -1, 3, 0, -1]
    naive = head_sweep_naive(random_vit, rand_x, targets)
    for chunk in (None, 10, 3, 1):  # None = B rows on the CPU; 3 does not divide B * H, so chunks straddle images
        fast = head_sweep(random_vit, rand_x, targets, chunk=chunk)
        _assert_sweeps_equal(fast, naive)
        assert fast["pruned_prob"].shape == (5, random_vit.num_layers, random_vit.num_heads)
    assert fast["target"][1] == fast["prediction"][1] and fast["target"][0] == 1
    np.testing.assert_allclose(naive["pruned_loss"], -np.log(naive["pruned_prob"]), rtol=1e-10)


def test_sweep_matches_naive_deit(deit_tiny, deit_batch, deit_sweep):
    x, y = deit_batch
    naive = head_sweep_naive(deit_tiny, x, y)
    _assert_sweeps_equal(deit_sweep, naive)
    # DeiT-Tiny's head matters for real photos: some head changes some probability noticeably.
    assert np.abs(deit_sweep["pruned_prob"] - deit_sweep["base_prob"][:, None, None]).max() > 1e-2


def test_head_gate_equals_pruning_whole_matrix(random_vit, rand_x):
    """The sweep's head gate is the paper's pruning: every cell of the head's matrix set to 0."""
    T = random_vit.num_tokens
    for l, h in [(0, 1), (2, 0)]:
        gated = random_vit.logits(rand_x, masks={(l, h): "all"})
        masked = random_vit.logits(rand_x, masks={(l, h): torch.ones(T, T, dtype=torch.bool)})
        torch.testing.assert_close(gated, masked, atol=1e-5, rtol=0)


def _direct_layer_change(vit, x, l: int, h: int) -> tuple[np.ndarray, np.ndarray]:
    _, cache = vit.run_with_cache(x, names=[f"blocks.{l}.out"])
    base = cache[f"blocks.{l}.out"].double().flatten(1)
    with torch.no_grad():
        pruned = vit.run_blocks(vit.embed(x), 0, l + 1, plans=vit.plans_for_masks({(l, h): "all"})).double().flatten(1)
    cos = F.cosine_similarity(pruned, base, dim=1)
    rel = (pruned - base).norm(dim=1) / base.norm(dim=1)
    return (1 - cos).numpy(), rel.numpy()


def test_layer_change_matches_direct_random_vit(random_vit, rand_x):
    sweep = head_sweep(random_vit, rand_x, chunk=4)
    for l in range(random_vit.num_layers):
        for h in range(random_vit.num_heads):
            change, rel = _direct_layer_change(random_vit, rand_x, l, h)
            np.testing.assert_allclose(sweep["layer_change"][:, l, h], change, rtol=1e-3, atol=1e-9)
            np.testing.assert_allclose(sweep["layer_rel_l2"][:, l, h], rel, rtol=1e-4, atol=1e-9)


def test_layer_change_matches_direct_deit(deit_tiny, deit_batch, deit_sweep):
    x, _ = deit_batch
    for l, h in [(0, 2), (5, 1), (11, 0)]:
        change, rel = _direct_layer_change(deit_tiny, x, l, h)
        np.testing.assert_allclose(deit_sweep["layer_change"][:, l, h], change, rtol=1e-3, atol=1e-7)
        np.testing.assert_allclose(deit_sweep["layer_rel_l2"][:, l, h], rel, rtol=1e-4, atol=1e-7)


# ------------------------------------------------------------------ sweep shortcuts, model by model
def _randomised(model: torch.nn.Module, scale: float) -> torch.nn.Module:
    """Random weights everywhere (libraries zero-initialise biases and the like), so pruning a head
    changes the outputs noticeably and an equality test has something to compare."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    return model.eval()


def _timm_model(kind: str):
    from timm.models.deit import VisionTransformerDistilled
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(4)
    kw = dict(img_size=32, patch_size=8, num_classes=5, embed_dim=32, depth=3, num_heads=2, mlp_ratio=2.0)
    if kind == "timm-distilled":  # CLS + distillation token, read out by two heads
        return _randomised(VisionTransformerDistilled(**kw), 0.02)
    if kind == "timm-avg":  # global average pooling: the last block's every token is read
        return _randomised(VisionTransformer(**kw, global_pool="avg", class_token=True), 0.02)
    if kind == "timm-layerscale":  # layer scale and q/k norm on the split path
        return _randomised(VisionTransformer(**kw, init_values=0.5, qk_norm=True), 0.02)
    raise KeyError(kind)


def _hf_model(kind: str):
    import transformers as tr

    torch.manual_seed(4)
    c = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8, num_labels=5)
    if kind == "hf-vit":
        return _randomised(tr.ViTForImageClassification(tr.ViTConfig(**c)), 0.3)
    if kind == "hf-deit-distilled":
        return _randomised(tr.DeiTForImageClassificationWithTeacher(tr.DeiTConfig(**c)), 0.3)
    raise KeyError(kind)


#: model -> (tokens its readout reads, or None for the whole last block)
SWEEP_MODELS = {"timm-distilled": 2, "timm-avg": None, "timm-layerscale": 1, "hf-vit": 1, "hf-deit-distilled": 2}


@pytest.fixture(scope="module", params=list(SWEEP_MODELS))
def sweep_model(request):
    import vitscope

    kind = request.param
    model = _hf_model(kind) if kind.startswith("hf") else _timm_model(kind)
    return kind, vitscope.load_model(model, device="cpu")


def _attention_module(block: torch.nn.Module) -> torch.nn.Module:
    return block.attn if hasattr(block, "attn") else block.attention


def _output_projection(block: torch.nn.Module) -> torch.nn.Module:
    """The attention's output projection, found by the library's own names."""
    att = _attention_module(block)
    return att.proj if hasattr(att, "proj") else att.o_proj


def _zero_head_hook(vit, prune: tuple[int, int] | None) -> list:
    """Hooks that remove head ``prune = (l, h)`` by zeroing its slice of the context where it
    enters the output projection (none for ``prune=None``); the caller removes them."""
    if prune is None:
        return []
    l, h = prune
    proj = _output_projection(vit.backend.blocks[l])
    d = proj.in_features // vit.num_heads

    def zero_slice(_m, args):
        ctx = args[0].clone()
        ctx[..., h * d : (h + 1) * d] = 0
        return (ctx, *args[1:])

    return [proj.register_forward_pre_hook(zero_slice)]


def _library_forward(vit, x: torch.Tensor, prune: tuple[int, int] | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The library's own forward of the model (vitscope idle, no plan), with head ``prune = (l, h)``
    removed by zeroing its slice of the context where it enters the output projection: the logits
    and every block's output."""
    outs: list[torch.Tensor] = []
    hooks = [b.register_forward_hook(lambda _m, _a, o: outs.append(o[0] if isinstance(o, tuple) else o)) for b in vit.backend.blocks]
    hooks += _zero_head_hook(vit, prune)
    try:
        with torch.no_grad():
            out = vit.module(x) if vit.library == "timm" else vit.module(pixel_values=x).logits
    finally:
        for hook in hooks:
            hook.remove()
    return out, outs


def test_sweep_shortcuts_match_naive(sweep_model, rand_x):
    """Every model family and readout: the sweep equals one full masked forward per head."""
    kind, vit = sweep_model
    targets = [1, -1, 3, 0, -1]
    naive = head_sweep_naive(vit, rand_x, targets)
    # pruning does something on these weights, so the equality below is not vacuous
    assert np.abs(naive["pruned_prob"] - naive["base_prob"][:, None, None]).max() > 1e-3
    for chunk in (None, 3):  # 3 does not divide B * H: chunks straddle images
        _assert_sweeps_equal(head_sweep(vit, rand_x, targets, chunk=chunk), naive)
    _assert_sweeps_equal(head_sweep(vit, rand_x, targets, shortcuts=False), naive)


def test_sweep_layer_change_matches_library_forward(sweep_model, rand_x):
    """``layer_change`` / ``layer_rel_l2`` and the pruned probability against the library's own
    forward with the head's context slice zeroed, block outputs read by hooks."""
    _, vit = sweep_model
    x = rand_x[:3]
    sweep = head_sweep(vit, x, chunk=4)
    base_logits, base_outs = _library_forward(vit, x)
    target = base_logits.argmax(-1)
    for l in range(vit.num_layers):
        base = base_outs[l].double().flatten(1)
        for h in range(vit.num_heads):
            logits, outs = _library_forward(vit, x, (l, h))
            pruned = outs[l].double().flatten(1)
            change = 1 - F.cosine_similarity(pruned, base, dim=1)
            rel = (pruned - base).norm(dim=1) / base.norm(dim=1)
            np.testing.assert_allclose(sweep["layer_change"][:, l, h], change.numpy(), rtol=1e-3, atol=1e-9)
            np.testing.assert_allclose(sweep["layer_rel_l2"][:, l, h], rel.numpy(), rtol=1e-4, atol=1e-9)
            prob = logits.double().softmax(-1)[torch.arange(3), target]
            np.testing.assert_allclose(sweep["pruned_prob"][:, l, h], prob.numpy(), atol=1e-5, rtol=0)
    assert sweep["layer_change"].min() > 0


def _rows_through_attention(vit, fn) -> list[int]:
    """How many images (rows) pass through each block's attention module while ``fn`` runs."""
    rows = [0] * vit.num_layers
    hooks = [
        _attention_module(b).register_forward_pre_hook(lambda _m, args, _i=i: rows.__setitem__(_i, rows[_i] + args[0].shape[0]))
        for i, b in enumerate(vit.backend.blocks)
    ]
    try:
        fn()
    finally:
        for hook in hooks:
            hook.remove()
    return rows


def test_sweep_skips_the_attention_that_pruning_leaves_unchanged(sweep_model, rand_x):
    """The pruned layer never runs its attention again (only its post-attention half), and with a
    CLS readout neither does the last block for heads pruned below it; a global-average readout
    runs the last block whole. Whole blocks (``shortcuts=False``) run every block from the pruned one on."""
    kind, vit = sweep_model
    L, H, B = vit.num_layers, vit.num_heads, rand_x.shape[0]
    assert vit.readout_tokens() == SWEEP_MODELS[kind]
    assert all(vit.output_projection(l) is not None for l in range(L))
    fast = _rows_through_attention(vit, lambda: head_sweep(vit, rand_x))
    whole = _rows_through_attention(vit, lambda: head_sweep(vit, rand_x, shortcuts=False))
    # block j: the recording forward (B rows) plus the B * H rows of every layer pruned before j ...
    want = [B + j * B * H for j in range(L)]
    if SWEEP_MODELS[kind] is not None:
        want[L - 1] = B  # ... except the last block, which only computes the readout tokens' rows there
    assert fast == want
    assert whole == [B + (j + 1) * B * H for j in range(L)]


def test_run_block_queries_equals_the_whole_block(sweep_model, rand_x):
    _, vit = sweep_model
    _, outs = _library_forward(vit, rand_x)
    for n in (1, 2, vit.num_tokens):
        got = vit.run_block_queries(vit.num_layers - 1, outs[-2], n)
        torch.testing.assert_close(got, outs[-1][:, :n], atol=2e-5, rtol=0)
    with pytest.raises(ValueError, match="unpruned"):
        with vit.intervene({vit.num_layers - 1: LayerPlan(head_gate=torch.ones(vit.num_heads))}):
            vit.run_block_queries(vit.num_layers - 1, outs[-2], 1)


def test_sweep_falls_back_where_blocks_cannot_be_split(rand_x):
    """A sub-LN between the heads' contexts and the projection (timm ``scale_attn_norm``) mixes the
    heads, so pruning one is no subtraction there: the sweep runs those blocks whole, still exact."""
    from timm.models.vision_transformer import VisionTransformer

    import vitscope

    torch.manual_seed(6)
    m = VisionTransformer(img_size=32, patch_size=8, num_classes=5, embed_dim=32, depth=3, num_heads=2, mlp_ratio=2.0, scale_attn_norm=True)
    vit = vitscope.load_model(_randomised(m, 0.02), device="cpu")
    assert [vit.output_projection(l) for l in range(3)] == [None] * 3 and vit.readout_tokens() == 1
    naive = head_sweep_naive(vit, rand_x)
    _assert_sweeps_equal(head_sweep(vit, rand_x), naive)
    B, H = rand_x.shape[0], vit.num_heads
    assert _rows_through_attention(vit, lambda: head_sweep(vit, rand_x)) == [B + (j + 1) * B * H for j in range(2)] + [B + B * H]


def test_sweep_rejects_bad_targets(random_vit, rand_x):
    with pytest.raises(ValueError, match="class indices"):
        head_sweep(random_vit, rand_x, [0, 1, 2, 3, 99])
    with pytest.raises(ValueError, match="one class index per image"):
        head_sweep(random_vit, rand_x, [0, 1])


# ------------------------------------------------------------------ Taylor
def _loss_with_gate(vit, x, target, l: int, h: int, value: float) -> np.ndarray:
    gate = torch.ones(x.shape[0], vit.num_heads, dtype=torch.float64)
    gate[:, h] = value
    with torch.no_grad():
        logits = vit.readout(vit.run_blocks(vit.embed(x), plans={l: LayerPlan(head_gate=gate)}))
    return F.cross_entropy(logits, target, reduction="none").numpy()


@pytest.mark.parametrize("recompute", [False, True])
def test_taylor_matches_finite_differences(random_vit64, rand_x, recompute):
    x = rand_x.double()
    target = torch.tensor([1, 0, 3, 4, 2])
    taylor = taylor_importance(random_vit64, x, target, recompute=recompute)
    eps = 1e-5
    for l in range(random_vit64.num_layers):
        for h in range(random_vit64.num_heads):
            fd = (_loss_with_gate(random_vit64, x, target, l, h, 1 + eps) - _loss_with_gate(random_vit64, x, target, l, h, 1 - eps)) / (2 * eps)
            np.testing.assert_allclose(taylor[:, l, h], np.abs(fd), rtol=1e-6, atol=1e-10)
    assert taylor.min() > 0  # every gate has some gradient on a random model


def test_taylor_recomputing_blocks_keeps_no_layer_maps_for_the_backward(random_vit, rand_x):
    """With ``recompute`` the backward pass keeps nothing of a block's insides from the forward (each
    block is run again there; only the blocks' inputs are kept): no (T, T) map, fewer bytes in all,
    and the same gradients."""
    T = random_vit.num_tokens
    maps = {False: 0, True: 0}
    saved = {False: 0, True: 0}
    for recompute in (False, True):
        def pack(t, recompute=recompute):
            saved[recompute] += t.numel() * t.element_size()
            if t.ndim >= 2 and tuple(t.shape[-2:]) == (T, T):
                maps[recompute] += 1
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            got = taylor_importance(random_vit, rand_x, recompute=recompute)
        if not recompute:
            want = got
    assert maps[True] == 0 and saved[True] < saved[False] / 2, (maps, saved)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9)
    from vitscope.analysis import importance

    assert importance.taylor_keeps_maps(random_vit, 5)  # small: the maps are kept (no extra forward)
    L, H = random_vit.num_layers, random_vit.num_heads
    assert not importance.taylor_keeps_maps(random_vit, importance.TAYLOR_CHECKPOINT_BYTES // (L * H * T * T * 4) + 1)


def test_taylor_default_target_and_per_image(random_vit, rand_x):
    pred = random_vit.logits(rand_x).argmax(-1)
    whole = taylor_importance(random_vit, rand_x)
    np.testing.assert_allclose(whole, taylor_importance(random_vit, rand_x, pred), rtol=1e-6)
    # Each image's gradient is its own: the same image alone gives the same numbers.
    np.testing.assert_allclose(whole[2], taylor_importance(random_vit, rand_x[2:3])[0], rtol=1e-4, atol=1e-7)


# ------------------------------------------------------------------ partial pruning
def _check_partial(vit, x: torch.Tensor, df: pd.DataFrame, layer: int, head: int, label: int) -> None:
    assert df["mode"].tolist() == [1, 2, 3, 4, 5, 6]
    assert df["region"].tolist() == list(MODES)
    for _, row in df.iterrows():
        masks = None if row.region == "none" else {(layer, head): row.region}
        probs = vit.logits(x, masks=masks).double().softmax(-1)[0]
        assert row.label == label
        assert abs(row.label_prob - float(probs[label])) <= 1e-5, row.region
        ref_p, ref_c = probs.topk(len(row.top_classes))
        np.testing.assert_allclose(row.top_probs, ref_p.numpy(), atol=1e-5)
        assert row.top_classes[0] == int(ref_c[0])


def test_partial_pruning_random_vit(random_vit, rand_x):
    x = rand_x[1:2]
    for layer, head in [(0, 0), (1, 1), (2, 1)]:
        df = partial_pruning(random_vit, x[0], layer, head, label=3, topk=3)  # a (C, H, W) tensor
        _check_partial(random_vit, x, df, layer, head, 3)
        assert all(len(c) == 3 for c in df["top_classes"])


def test_partial_pruning_from_a_kept_residual_stream(random_vit, rand_x):
    """Given the stream entering the layer (as the server keeps it), the modes equal masked logits."""
    x = rand_x[2:3]
    streams = [random_vit.embed(x)]
    random_vit.run_blocks(streams[0], 0, random_vit.num_layers - 1, on_block=lambda _i, out: streams.append(out))
    for layer, head in [(0, 1), (2, 0)]:
        df = partial_pruning(random_vit, None, layer, head, label=1, stream=streams[layer])
        _check_partial(random_vit, x, df, layer, head, 1)
    with pytest.raises(ValueError, match="residual stream entering block 1"):
        partial_pruning(random_vit, None, 1, 0, stream=streams[1][0])


def test_partial_pruning_deit(deit_tiny, imagenet_images):
    path = imagenet_images[0][4]
    x = deit_tiny.preprocess([path])
    pred = int(deit_tiny.logits(x).argmax())
    for layer, head in [(0, 1), (11, 2)]:
        df = partial_pruning(deit_tiny, path, layer, head)
        _check_partial(deit_tiny, x, df, layer, head, pred)
        assert df.loc[0, "top_names"][0] == deit_tiny.class_names[pred] if deit_tiny.class_names else True
    # Pruning the whole head changes more than pruning a single cell on some image/head: not all rows equal.
    assert df["label_prob"].nunique() > 1


def test_partial_pruning_rejects_bad_head(random_vit, rand_x):
    with pytest.raises(ValueError, match="head 7 out of range"):
        partial_pruning(random_vit, rand_x[:1], 0, 7)
    with pytest.raises(ValueError, match="one image"):
        partial_pruning(random_vit, rand_x[:2], 0, 0)


# ------------------------------------------------------------------ aggregation
def _frames(sweep: dict, taylor: np.ndarray, ids: list) -> tuple[pd.DataFrame, pd.DataFrame]:
    B, L, H = sweep["pruned_prob"].shape
    b, l, h = np.meshgrid(np.arange(B), np.arange(L), np.arange(H), indexing="ij")
    image_heads = pd.DataFrame(
        {
            "image_id": np.asarray(ids)[b.ravel()],
            "layer": l.ravel(),
            "head": h.ravel(),
            "pruned_prob": sweep["pruned_prob"].ravel(),
            "pruned_loss": sweep["pruned_loss"].ravel(),
            "pruned_correct": sweep["pruned_correct"].ravel(),
            "layer_change": sweep["layer_change"].ravel(),
            "taylor": taylor.ravel(),
        }
    )
    images = pd.DataFrame(
        {
            "image_id": ids,
            "base_prob": sweep["base_prob"],
            "base_loss": sweep["base_loss"],
            "correct": sweep["prediction"] == sweep["target"],
        }
    )
    return image_heads, images


@pytest.fixture(scope="module")
def synthetic_frames():
    """40 images x (4 layers x 3 heads) of random per-image results, rows shuffled."""
    rng = np.random.default_rng(5)
    B, L, H = 40, 4, 3
    sweep = {
        "pruned_prob": rng.uniform(size=(B, L, H)),
        "pruned_loss": rng.exponential(size=(B, L, H)),
        "pruned_correct": rng.uniform(size=(B, L, H)) < 0.6,
        "layer_change": rng.exponential(0.1, size=(B, L, H)),
        "base_prob": rng.uniform(size=B),
        "base_loss": rng.exponential(size=B),
        "prediction": rng.integers(0, 3, size=B),
        "target": rng.integers(0, 3, size=B),
    }
    ids = [f"img{i:03d}" for i in rng.permutation(B)]
    image_heads, images = _frames(sweep, rng.normal(size=(B, L, H)), ids)
    return image_heads.sample(frac=1.0, random_state=1).reset_index(drop=True), images.iloc[::-1]


def test_summarize_matches_naive_bootstrap(synthetic_frames):
    image_heads, images = synthetic_frames
    n_boot, seed = 200, 7
    got = summarize_importance(image_heads, images, n_boot=n_boot, seed=seed).set_index(["layer", "head"])

    # Reference: per-image effects with a pandas merge, then a plain loop over resamples.
    df = image_heads.merge(images, on="image_id")
    df["acc_drop"] = df["correct"].astype(float) - df["pruned_correct"].astype(float)
    df["prob_drop"] = df["base_prob"] - df["pruned_prob"]
    df["loss_increase"] = df["pruned_loss"] - df["base_loss"]
    df["taylor"] = df["taylor"].abs()
    metrics = ["acc_drop", "prob_drop", "loss_increase", "layer_change", "taylor"]
    means = df.groupby(["layer", "head"])[metrics].mean()
    ids = np.sort(df["image_id"].unique())
    wide = {m: df.pivot(index="image_id", columns=["layer", "head"], values=m).loc[ids] for m in metrics}
    rng = np.random.default_rng(seed)
    boots = {m: [] for m in metrics}
    for _ in range(n_boot):
        idx = rng.integers(0, len(ids), size=len(ids))
        for m in metrics:
            boots[m].append(wide[m].iloc[idx].mean(axis=0))
    for m in metrics:
        b = pd.DataFrame(boots[m])
        np.testing.assert_allclose(got[m], means.loc[got.index, m], rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(got[f"{m}_lo"], b.quantile(0.025).loc[got.index], rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(got[f"{m}_hi"], b.quantile(0.975).loc[got.index], rtol=1e-10, atol=1e-12)
    assert (got["n_images"] == 40).all()
    assert (got["head_index"] == got.index.get_level_values(0) * 3 + got.index.get_level_values(1)).all()


def test_bootstrap_interval_narrows_with_more_images():
    """Intervals contain the mean and shrink ~1/sqrt(N)."""
    rng = np.random.default_rng(0)

    def width(n: int) -> float:
        ih = pd.DataFrame({"image_id": np.arange(n), "layer": 0, "head": 0, "layer_change": rng.normal(1.0, 1.0, n)})
        s = summarize_importance(ih, pd.DataFrame({"image_id": np.arange(n)}), n_boot=500).iloc[0]
        assert s.layer_change_lo < s.layer_change < s.layer_change_hi
        return s.layer_change_hi - s.layer_change_lo

    w100, w1600 = width(100), width(1600)
    assert 2.5 < w100 / w1600 < 6  # ideal ratio 4
    assert abs(w1600 - 2 * 1.96 / 40) < 0.03  # normal-theory width of a mean of N(1, 1) samples


def test_summarize_rejects_incomplete(synthetic_frames):
    image_heads, images = synthetic_frames
    with pytest.raises(ValueError, match="incomplete"):
        summarize_importance(image_heads.iloc[1:], images, n_boot=0)
    with pytest.raises(ValueError, match="not in images"):
        summarize_importance(image_heads, images.iloc[1:], n_boot=0)


def test_metric_agreement_matches_rank_pearson(synthetic_frames):
    from scipy.stats import rankdata

    heads = summarize_importance(*synthetic_frames, n_boot=0)
    agree = metric_agreement(heads)
    assert len(agree) == 10  # 5 metrics -> 10 pairs
    for _, r in agree.iterrows():
        ref = np.corrcoef(rankdata(heads[r.metric_a]), rankdata(heads[r.metric_b]))[0, 1]
        assert r.spearman == pytest.approx(ref, abs=1e-12)
    self_check = metric_agreement(heads.assign(twin=-heads["prob_drop"]), ["prob_drop", "twin"])
    assert self_check.loc[0, "spearman"] == pytest.approx(-1.0)


# ------------------------------------------------------------------ pruning curves
def test_pruning_curve_matches_sweep_and_masks(random_vit, rand_x):
    targets = torch.tensor([1, 0, 3, 4, 2])
    sweep = head_sweep(random_vit, rand_x, targets)
    order = [(1, 1), (0, 0), (2, 1), (1, 0)]
    batches = ((rand_x[i : i + 2], targets[i : i + 2]) for i in range(0, 5, 2))  # a generator: read once
    curve = pruning_curve(random_vit, batches, order, steps=[0, 1, 2, 4]).set_index("k")
    assert curve.loc[0, "accuracy"] == pytest.approx(np.mean(sweep["prediction"] == sweep["target"]))
    assert curve.loc[0, "mean_prob"] == pytest.approx(sweep["base_prob"].mean(), rel=1e-6)
    assert curve.loc[1, "accuracy"] == pytest.approx(sweep["pruned_correct"][:, 1, 1].mean())
    assert curve.loc[1, "mean_prob"] == pytest.approx(sweep["pruned_prob"][:, 1, 1].mean(), rel=1e-6)
    for k in (2, 4):
        logits = random_vit.logits(rand_x, masks={head: "all" for head in order[:k]})
        probs = logits.double().softmax(-1)[torch.arange(5), targets]
        assert curve.loc[k, "mean_prob"] == pytest.approx(float(probs.mean()), rel=1e-6)
        assert curve.loc[k, "accuracy"] == pytest.approx(float((logits.argmax(-1) == targets).float().mean()))
    assert (curve["n_images"] == 5).all()


def test_pruning_curves_follow_metric_order(random_vit, rand_x):
    targets = torch.tensor([1, 0, 3, 4, 2])
    sweep = head_sweep(random_vit, rand_x, targets)
    heads = summarize_importance(*_frames(sweep, taylor_importance(random_vit, rand_x, targets), list(range(5))), n_boot=0)
    curves = pruning_curves(random_vit, [(rand_x, targets)], heads, ["prob_drop", "taylor", "random"], steps=[0, 1, 6])
    assert curves["metric"].tolist() == ["prob_drop"] * 3 + ["taylor"] * 3 + ["random"] * 3
    first = heads.sort_values("prob_drop", ascending=False).iloc[0]
    row = curves[(curves.metric == "prob_drop") & (curves.k == 1)].iloc[0]
    assert row.mean_prob == pytest.approx(sweep["pruned_prob"][:, int(first["layer"]), int(first["head"])].mean(), rel=1e-6)
    # Removing the head with the largest mean probability drop lowers the mean probability most.
    assert row.mean_prob == pytest.approx(sweep["pruned_prob"].mean(axis=0).min(), rel=1e-6)
    all_pruned = curves[curves.k == 6]
    assert all_pruned["mean_prob"].nunique() == 1  # every order ends with the same model
    with pytest.raises(ValueError, match="outside 0..6"):
        pruning_curves(random_vit, [rand_x], heads, ["taylor"], steps=[7])


# --------------------------------------------------------------------------- embedding objective
def _library_embedding(vit, x: torch.Tensor, prune: tuple[int, int] | None = None) -> torch.Tensor:
    """The library's own pooled embedding (timm's pre-logits head; HF's CLS after the final layer
    norm), with head ``prune`` removed by zeroing its context slice before the output projection."""
    hooks = _zero_head_hook(vit, prune)
    m = vit.module
    try:
        with torch.no_grad():
            if vit.library == "timm":
                return m.forward_head(m.forward_features(x), pre_logits=True)
            body = getattr(m, "vit", None) or getattr(m, "deit", None) or m
            return body(pixel_values=x).last_hidden_state[:, 0]
    finally:
        for hook in hooks:
            hook.remove()


def _backbone(kind: str):
    import transformers as tr
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(5)
    if kind == "timm-backbone":
        return _randomised(VisionTransformer(img_size=32, patch_size=8, num_classes=0, embed_dim=32, depth=3, num_heads=2), 0.02)
    c = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8)
    return _randomised(tr.ViTModel(tr.ViTConfig(**c), add_pooling_layer=False), 0.3)


@pytest.mark.parametrize("kind", ["timm-backbone", "hf-backbone", "timm-distilled", "timm-avg", "hf-deit-distilled"])
def test_embedding_objective_matches_the_library_embedding(kind, rand_x):
    """``objective="embedding"``: 1 - cos between the pruned and unpruned pooled embedding, for
    backbones without a classifier too, against the library's own forward with the head's context
    slice zeroed; the naive loop gives the same; the label objective refuses a backbone."""
    import vitscope

    if kind.endswith("backbone"):
        model = _backbone(kind)
    else:
        model = _hf_model(kind) if kind.startswith("hf") else _timm_model(kind)
    vit = vitscope.load_model(model, device="cpu")
    x = rand_x[:3]
    sweep = head_sweep(vit, x, objective="embedding", chunk=4)
    assert set(sweep) == {"base_embedding_norm", "embedding_change", "layer_change", "layer_rel_l2"}
    base = _library_embedding(vit, x).double()
    np.testing.assert_allclose(sweep["base_embedding_norm"], base.norm(dim=-1).numpy(), rtol=1e-5)
    for l in range(vit.num_layers):
        for h in range(vit.num_heads):
            pruned = _library_embedding(vit, x, (l, h)).double()
            want = (1 - F.cosine_similarity(pruned, base, dim=1)).numpy()
            np.testing.assert_allclose(sweep["embedding_change"][:, l, h], want, rtol=1e-3, atol=1e-9)
    assert sweep["embedding_change"].max() > 1e-4  # pruning moves the embedding: the check is not vacuous
    naive = head_sweep_naive(vit, x, objective="embedding")
    np.testing.assert_allclose(sweep["embedding_change"], naive["embedding_change"], rtol=1e-4, atol=1e-9)
    if kind.endswith("backbone"):
        with pytest.raises(ValueError, match="no classification head.*objective='embedding'"):
            head_sweep(vit, x)
    with pytest.raises(ValueError, match="unknown objective 'probs'"):
        head_sweep(vit, x, objective="probs")


def test_embedding_curve_matches_masked_embeddings():
    """The embedding objective's pruning curve: at each k, the mean 1 - cos between the embedding
    with the first k heads pruned together (cosine_similarity of the masked forward) and the unpruned one."""
    import vitscope

    vit = vitscope.load_model(_backbone("timm-backbone"), device="cpu")
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    order = [(2, 1), (0, 0), (1, 1), (0, 1)]
    df = pruning_curve(vit, [x[:3], x[3:]], order, steps=[0, 1, 3, 4], objective="embedding")
    base = vit.embeddings(x).double()
    for row in df.itertuples():
        pruned = vit.embeddings(x, masks={head: "all" for head in order[: row.k]}).double()
        want = float((1 - F.cosine_similarity(pruned, base, dim=1)).mean())
        assert abs(row.mean_embedding_change - want) <= 1e-6 * max(1.0, want), row
        assert np.isnan(row.accuracy)
    assert df["mean_embedding_change"].iloc[-1] > 1e-4
    with pytest.raises(ValueError, match="objective='embedding'"):
        pruning_curve(vit, [x], order)

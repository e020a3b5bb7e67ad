"""Attention explanations, checked against independent references written here on plain timm.

The reference runs a deep copy of the timm model with timm's own unfused attention; recorder
modules in place of ``attn_drop`` keep every post-softmax map and its gradient (the gradient of the
sum over images of each image's target logit). Rollout, gradient rollout and relevance are then
computed with plain per-image loops over full ``T x T`` matrices, in the papers' order (first layer
to last), which is a different computation from the module's (row vectors, last layer first).
Maps are compared per image relative to the reference map's largest value (all maps are below 1,
so this is stricter than an absolute 1e-5). The ``interaction`` map is checked the same way against
an explicit loop over layers, heads and queries of the cross-entropy's gradient x attention, and,
independently of any gradient, against central finite differences of knocking each key patch's
attention column down in every layer of an unfused float64 timm model.
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from torch import nn

import vitscope
from vitscope.analysis.explain import CLS_METHODS, HEAD_FUSIONS, METHODS, explain, explain_all

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-5


class _Recorder(nn.Module):
    """Stands in for timm's ``attn_drop``: sees the post-softmax matrix and keeps its gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.maps: list[torch.Tensor] = []

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        if a.requires_grad:
            a.retain_grad()
        self.maps.append(a)
        return a


def reference_capture(vit, x, target=None, *, loss=False):
    """Per-layer attention ``(B, H, T, T)`` and d(sum_i logit_i[target_i]) / d attention (``loss``:
    of the summed cross-entropies of the targets instead), from timm's unfused path on a deep copy;
    also the targets used."""
    ref = copy.deepcopy(vit.module)
    recs = []
    for blk in ref.blocks:
        attn = blk.attn
        attn.forward = type(attn).forward.__get__(attn)  # timm's original method, not vitscope's patch
        attn.fused_attn = False
        rec = _Recorder()
        attn.attn_drop = rec
        recs.append(rec)
    ref.eval()
    x = x.clone().requires_grad_(True)  # the loaded model's parameters do not require grad
    logits = ref(x)
    t = logits.argmax(-1) if target is None else torch.as_tensor(target).expand(x.shape[0])
    if loss:
        nn.functional.cross_entropy(logits, t, reduction="sum").backward()
    else:
        logits[torch.arange(x.shape[0]), t].sum().backward()
    maps = [r.maps[0].detach() for r in recs]
    grads = [r.maps[0].grad.detach() for r in recs]
    return maps, grads, t


def _drop_smallest(f: torch.Tensor, ratio: float) -> torch.Tensor:
    flat = f.flatten().clone()
    drop = torch.argsort(flat)[: int(flat.numel() * ratio)]
    flat[drop[drop != 0]] = 0
    return flat.view_as(f)


def _product(mats, T):
    result = torch.eye(T)
    for a in mats:
        a = (a + torch.eye(T)) / 2
        a = a / a.sum(dim=-1, keepdim=True)
        result = a @ result
    return result


def _read(M, layout):
    """The readout's row of ``M`` over the patches: the CLS row, or for a mean-pooling model
    (``layout.mean_from`` set by the test) the mean of the rows of the pooled tokens."""
    first = getattr(layout, "mean_from", None)
    row = M[layout.cls_index] if first is None else M[first:].mean(0)
    return row[layout.patch_slice].reshape(layout.grid)


def ref_rollout(maps, b, fusion, ratio, layout):
    fuse = {"mean": lambda A: A.mean(0), "max": lambda A: A.max(0)[0], "min": lambda A: A.min(0)[0]}[fusion]
    mats = [_drop_smallest(fuse(A[b]), ratio) for A in maps]
    return _read(_product(mats, layout.num_tokens), layout)


def ref_grad_rollout(maps, grads, b, ratio, layout):
    mats = []
    for A, G in zip(maps, grads):
        f = (A[b] * G[b]).mean(0)
        f[f < 0] = 0
        mats.append(_drop_smallest(f, ratio))
    return _read(_product(mats, layout.num_tokens), layout)


def ref_relevance(maps, grads, b, layout):
    T = layout.num_tokens
    R = torch.eye(T)
    for A, G in zip(maps, grads):
        cam = (G[b] * A[b]).clamp(min=0).mean(0)
        R = R + cam @ R
    return _read(R, layout)


def ref_interaction(maps, grads, b, layout):
    """Ma et al.'s aggregated first-order impact of each key patch: an explicit loop over layers,
    heads and every query token (prefix and patches) of ``-dloss/dA * A``."""
    P = layout.num_patches
    score = torch.zeros(P, dtype=torch.float64)
    for A, G in zip(maps, grads):
        for h in range(A.shape[1]):
            for q in range(layout.num_tokens):
                score -= (G[b, h, q, layout.patch_slice] * A[b, h, q, layout.patch_slice]).double()
    return score.float().reshape(layout.grid)


def ref_attention(maps, b, layout, head=None):
    A = maps[-1][b]
    A = A.mean(0) if head is None else A[head]
    return _read(A, layout)


def assert_maps_equal(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    assert got.shape == want.shape, what
    for b in range(want.shape[0]):
        scale = want[b].abs().max().item()
        err = (got[b] - want[b]).abs().max().item()
        assert err <= TOL * scale, f"{what}, image {b}: max error {err:.3g} vs map scale {scale:.3g}"


def check_against_reference(vit, x, target=None):
    maps, grads, t = reference_capture(vit, x, target)
    layout = vit.layout
    if vit.module.global_pool == "avg":  # timm's mean pooling: the tokens after its prefix
        import types

        layout = types.SimpleNamespace(**{k: getattr(layout, k) for k in ("cls_index", "patch_slice", "grid", "num_tokens", "num_patches")},
                                       mean_from=vit.module.num_prefix_tokens)
    B = x.shape[0]
    for fusion in HEAD_FUSIONS:
        for ratio in (0.0, 0.9):
            got = explain(vit, x, "rollout", head_fusion=fusion, discard_ratio=ratio)
            want = torch.stack([ref_rollout(maps, b, fusion, ratio, layout) for b in range(B)])
            assert_maps_equal(got, want, f"rollout {fusion} discard {ratio}")
    for ratio in (0.0, 0.9):
        got = explain_all(vit, x, ["grad_rollout", "relevance", "attention"], target=target, discard_ratio=ratio)
        want = torch.stack([ref_grad_rollout(maps, grads, b, ratio, layout) for b in range(B)])
        assert_maps_equal(got["grad_rollout"], want, f"grad_rollout discard {ratio}")
    want = torch.stack([ref_relevance(maps, grads, b, layout) for b in range(B)])
    assert_maps_equal(got["relevance"], want, "relevance")
    assert_maps_equal(got["attention"], torch.stack([ref_attention(maps, b, layout) for b in range(B)]), "attention")
    head = vit.num_heads - 1
    assert_maps_equal(
        explain(vit, x, "attention", head=head), torch.stack([ref_attention(maps, b, layout, head) for b in range(B)]), "attention head"
    )
    # the checks compared real maps, not constants
    assert want.flatten(1).std(1).min().item() > 1e-3 * want.abs().max().item()
    maps, grads, _ = reference_capture(vit, x, target, loss=True)
    want = torch.stack([ref_interaction(maps, grads, b, layout) for b in range(B)])
    assert_maps_equal(explain(vit, x, "interaction", target=target), want, "interaction")
    assert want.flatten(1).std(1).min().item() > 1e-3 * want.abs().max().item()
    return t


# --------------------------------------------------------------------------- models
@pytest.fixture(scope="module")
def deit_x(deit_tiny, imagenet_images):
    paths, _ = imagenet_images
    return deit_tiny.preprocess(paths[:2])


def _random_timm(name: str, **kw):
    torch.manual_seed(0)
    m = timm.create_model(name, pretrained=False, img_size=64, depth=3, num_classes=10, **kw)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith("qkv.weight"):
                p.mul_(8.0)  # peaked attention: near-uniform maps would make the comparison weak
            elif n.endswith(("cls_token", "dist_token", "reg_token")):
                p.normal_(0.0, 1.0)
    return vitscope.load_model(m, device="cpu")


@pytest.fixture(scope="module")
def registers_vit():
    return _random_timm("vit_tiny_patch16_224", reg_tokens=4)


@pytest.fixture(scope="module")
def distilled_vit():
    return _random_timm("deit_tiny_distilled_patch16_224")


# --------------------------------------------------------------------------- references
def test_deit_tiny_equals_reference(deit_tiny, deit_x):
    t = check_against_reference(deit_tiny, deit_x)
    assert t.shape == (2,)
    assert all(p.grad is None for p in deit_tiny.module.parameters()), "explanations must not leave parameter gradients"


def test_deit_tiny_other_target_equals_reference(deit_tiny, deit_x):
    logits = deit_tiny.logits(deit_x)
    second = logits.topk(2, dim=-1).indices[:, 1]
    maps, grads, _ = reference_capture(deit_tiny, deit_x, second)
    got = explain(deit_tiny, deit_x, "relevance", target=second)
    want = torch.stack([ref_relevance(maps, grads, b, deit_tiny.layout) for b in range(2)])
    assert_maps_equal(got, want, "relevance of the runner-up class")
    assert (got - explain(deit_tiny, deit_x, "relevance")).abs().max().item() > 1e-4  # the target matters


def test_registers_equal_reference(registers_vit):
    layout = registers_vit.layout
    assert layout.num_prefix == 5 and len(layout.register_indices) == 4 and layout.grid == (4, 4)
    torch.manual_seed(3)
    check_against_reference(registers_vit, torch.randn(3, 3, 64, 64))
    check_against_reference(registers_vit, torch.randn(2, 3, 64, 64), target=7)


def test_distilled_equals_reference(distilled_vit):
    layout = distilled_vit.layout
    assert layout.num_prefix == 2 and layout.dist_index == 1
    torch.manual_seed(4)
    check_against_reference(distilled_vit, torch.randn(3, 3, 64, 64))


# --------------------------------------------------------------------------- batch independence
@pytest.mark.parametrize("model", ["deit_tiny", "registers_vit"])
def test_batch_equals_each_image_alone(model, request):
    vit = request.getfixturevalue(model)
    if model == "deit_tiny":
        x = vit.preprocess(request.getfixturevalue("imagenet_images")[0][2:5])
    else:
        torch.manual_seed(5)
        x = torch.randn(3, 3, 64, 64)
    for opts in ({}, {"discard_ratio": 0.5}):
        methods = METHODS if not opts else ["rollout", "grad_rollout"]
        together = explain_all(vit, x, methods, **opts)
        for b in range(x.shape[0]):
            alone = explain_all(vit, x[b : b + 1], methods, **opts)
            for m in methods:
                assert_maps_equal(together[m][b : b + 1], alone[m], f"{model} {m} {opts} image {b}")
    r = explain(vit, x, "random")
    assert torch.equal(explain(vit, x, "random", seed=0), r)
    assert not torch.equal(explain(vit, x, "random", seed=1), r)
    assert not torch.equal(r[0], r[1]) and 0.0 <= r.min().item() and r.max().item() < 1.0


def test_images_as_paths(deit_tiny, deit_x, imagenet_images):
    got = explain(deit_tiny, imagenet_images[0][:2], "rollout")
    assert_maps_equal(got, explain(deit_tiny, deit_x, "rollout"), "paths vs tensor")


# --------------------------------------------------------------------------- errors
def test_unknown_method_lists_the_valid_ones(random_vit):
    x = torch.randn(1, 3, 32, 32)
    for bad in ("gradcam", "patch_interaction"):
        with pytest.raises(ValueError, match="valid methods: attention, rollout, grad_rollout, relevance, interaction, random"):
            explain(random_vit, x, bad)


# --------------------------------------------------------------------------- interaction
class _ColumnScale(nn.Module):
    """Stands in for timm's ``attn_drop``: multiplies one key column of every head's post-softmax
    attention by ``factor`` (no renormalisation), the knock-out of Ma et al. when ``factor = 0``."""

    def __init__(self) -> None:
        super().__init__()
        self.column: int | None = None
        self.factor = 1.0

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        if self.column is None:
            return a
        a = a.clone()
        a[..., self.column] = a[..., self.column] * self.factor
        return a


def test_interaction_equals_finite_difference_of_the_key_knockout():
    """d loss / d eps of scaling key patch j's attention column by (1 - eps) in every layer, head and
    query is, by the chain rule, exactly the first-order impact summed over them: checked by central
    differences on an unfused float64 timm model, patch by patch."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(11)
    m = VisionTransformer(img_size=32, patch_size=8, num_classes=5, embed_dim=32, depth=3, num_heads=2, mlp_ratio=2.0)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith("qkv.weight"):
                p.mul_(4.0)
    m = m.double().eval()
    ref = copy.deepcopy(m)
    scales = []
    for blk in ref.blocks:
        blk.attn.fused_attn = False
        blk.attn.attn_drop = _ColumnScale()
        scales.append(blk.attn.attn_drop)
    vit = vitscope.load_model(m, device="cpu")
    layout = vit.layout
    torch.manual_seed(12)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    target = torch.tensor([1, 3])
    got = explain(vit, x, "interaction", target=target).double().reshape(2, -1)

    def loss(column: int, eps: float) -> torch.Tensor:
        for s in scales:
            s.column, s.factor = column, 1.0 - eps
        with torch.no_grad():
            return nn.functional.cross_entropy(ref(x), target, reduction="none")

    step = 1e-5
    want = torch.stack(
        [(loss(layout.num_prefix + j, step) - loss(layout.num_prefix + j, -step)) / (2 * step) for j in range(layout.num_patches)],
        dim=1,
    )
    scale = want.abs().max().item()
    assert scale > 1e-4
    # float32 maps (explain's output) against float64 differences
    assert (got - want).abs().max().item() <= 1e-5 * scale + 1e-7
    # and the sign convention: a patch whose knock-out raises the loss scores above 0
    assert torch.equal(got > 0, want > 0)


def test_interaction_is_the_runs_key_importance(random_vit):
    from vitscope.analysis.interaction import first_order_impact, key_importance

    torch.manual_seed(13)
    x = torch.randn(3, 3, 32, 32)
    r = first_order_impact(random_vit, x, [0, 2, 4])
    want = torch.from_numpy(key_importance(r["impact"], r["prefix_impact"])).float().reshape(3, *random_vit.layout.grid)
    torch.testing.assert_close(explain(random_vit, x, "interaction", target=[0, 2, 4]), want, rtol=0, atol=0)
    together = explain_all(random_vit, x, ["relevance", "interaction"])
    assert set(together) == {"relevance", "interaction"}
    assert not torch.equal(explain(random_vit, x, "interaction", target=1), explain(random_vit, x, "interaction", target=2))
    with pytest.raises(ValueError, match="not class indices"):
        explain(random_vit, x, "interaction", target=-1)


@pytest.mark.parametrize("class_token", [False, True])
def test_mean_pooling_models_read_the_mean_of_the_pooled_rows(class_token):
    """timm ``global_pool="avg"`` (with and without a CLS token, which it then leaves out): every
    row-based method reads the mean of the pooled tokens' rows, equal to the reference."""
    vit = _random_timm("vit_tiny_patch16_224", global_pool="avg", class_token=class_token)
    assert (vit.layout.cls_index is None) != class_token
    row = vit.readout_row()
    assert row[int(class_token):].eq(1 / 16).all() and row[: int(class_token)].eq(0).all()
    check_against_reference(vit, torch.randn(2, 3, 64, 64))


def test_attention_pooling_is_refused_by_name():
    torch.manual_seed(0)
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=1, num_classes=3, global_pool="map", class_token=False)
    vit = vitscope.load_model(m, device="cpu")
    assert vit.layout.cls_index is None and vit.readout_row() is None
    x = torch.randn(2, 3, 32, 32)
    for method in CLS_METHODS:
        with pytest.raises(ValueError, match=rf"{vit.name} pools its tokens by attention.*{method}.*none of them applies"):
            explain(vit, x, method)
    with pytest.raises(ValueError, match="pools its tokens by attention"):
        explain_all(vit, x)
    assert explain(vit, x, "random").shape == (2, 2, 2)
    assert explain(vit, x, "interaction").shape == (2, 2, 2)  # key impacts need no readout row


def test_bad_options(random_vit):
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(TypeError, match="unknown option"):
        explain(random_vit, x, "rollout", fusion="max")
    with pytest.raises(ValueError, match="read by rollout, grad_rollout only"):
        explain(random_vit, x, "attention", discard_ratio=0.5)
    with pytest.raises(ValueError, match="head_fusion must be one of mean, max, min"):
        explain(random_vit, x, "rollout", head_fusion="sum")
    with pytest.raises(ValueError, match="discard_ratio"):
        explain(random_vit, x, "rollout", discard_ratio=1.0)
    with pytest.raises(ValueError, match="heads 0..1"):
        explain(random_vit, x, "attention", head=2)
    with pytest.raises(ValueError, match="one per image"):
        explain(random_vit, x, "relevance", target=torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="not class indices"):
        explain(random_vit, x, "relevance", target=5)
    # options for a method that is among several are fine
    assert set(explain_all(random_vit, x, ["attention", "rollout"], discard_ratio=0.5)) == {"attention", "rollout"}

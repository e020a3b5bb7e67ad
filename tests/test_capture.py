"""Exact capture and pruning, checked against timm's unfused path and Hugging Face eager attention."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import vitscope
from vitscope.capture.masks import REGIONS, region_matrix
from vitscope.models.vit import CaptureError


class _Recorder(nn.Module):
    """Stands in for timm's ``attn_drop``: in the unfused path it sees the post-softmax matrix.

    It records the matrix, optionally multiplies it by a keep-mask (an independent implementation of
    pruning) and keeps its gradient.
    """

    def __init__(self, keep: torch.Tensor | None = None) -> None:
        super().__init__()
        self.keep = keep
        self.maps: list[torch.Tensor] = []

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        if self.keep is not None:
            a = a * self.keep
        if a.requires_grad:
            a.retain_grad()
        self.maps.append(a)
        return a


def unfused_reference(vit, keeps: dict[int, torch.Tensor] | None = None) -> tuple[nn.Module, list[_Recorder]]:
    """A deep copy of the timm model running timm's own unfused attention, with recorders."""
    ref = copy.deepcopy(vit.module)
    recorders = []
    for i, blk in enumerate(ref.blocks):
        attn = blk.attn
        attn.forward = type(attn).forward.__get__(attn)  # timm's original method, not vitscope's patch
        attn.fused_attn = False
        rec = _Recorder((keeps or {}).get(i))
        attn.attn_drop = rec
        recorders.append(rec)
    return ref.eval(), recorders


@pytest.fixture(scope="module")
def deit_batch(deit_tiny, imagenet_images):
    paths, labels = imagenet_images
    return deit_tiny.preprocess(paths[:4]), torch.tensor(labels[:4])


def test_deit_capture_equals_timm_unfused(deit_tiny, deit_batch):
    x, _ = deit_batch
    assert all(b.attn.fused_attn for b in deit_tiny.module.blocks), "the model's own forward must stay fused"
    ref, recs = unfused_reference(deit_tiny)
    with torch.no_grad():
        ref_logits = ref(x)
    A = deit_tiny.attention(x)
    assert A.shape == (4, 12, 3, 197, 197)
    R = torch.stack([r.maps[0] for r in recs], dim=1)
    assert (A - R).abs().max().item() <= 5e-5
    assert torch.allclose(A.sum(-1), torch.ones(()), atol=1e-5)
    # logits without masks equal the plain (fused) model's logits
    with torch.no_grad():
        plain = deit_tiny.module(x)
    assert torch.equal(deit_tiny.logits(x), plain)
    assert (plain - ref_logits).abs().max().item() < 1e-4


def test_deit_real_predictions_are_sensible(deit_tiny, deit_batch):
    x, labels = deit_batch
    pred = deit_tiny.logits(x).argmax(-1)
    assert (pred == labels).sum().item() >= 3  # DeiT-Tiny gets ~78% top-1 on the sample


def test_hf_capture_equals_eager_output_attentions(deit_tiny, deit_batch, tmp_path):
    import transformers
    from vitscope.models.convert import save_timm_as_hf

    x, _ = deit_batch
    folder = save_timm_as_hf(deit_tiny.module, tmp_path / "deit-hf", preprocessing=deit_tiny.preprocessing.to_dict())
    hf = vitscope.load_model(f"hf:{folder}", device="cpu")
    assert (hf.num_layers, hf.num_heads, hf.num_tokens) == (12, 3, 197)
    assert hf.module.config._attn_implementation == "vitscope"
    eager = transformers.ViTForImageClassification.from_pretrained(folder, attn_implementation="eager").eval()
    with torch.no_grad():
        out = eager(pixel_values=x, output_attentions=True)
    R = torch.stack(out.attentions, dim=1)
    A = hf.attention(x)
    assert (A - R).abs().max().item() <= 5e-5
    assert (hf.logits(x) - out.logits).abs().max().item() < 1e-4
    # the same pruning gives the same answer through either library
    masks = {(2, 1): "patch", (7, None): "cls_cross"}
    assert (hf.logits(x, masks=masks) - deit_tiny.logits(x, masks=masks)).abs().max().item() < 1e-4


def _check_random(vit, x, keeps=None, masks=None):
    ref, recs = unfused_reference(vit, keeps)
    with torch.no_grad():
        want = ref(x)
    got = vit.logits(x, masks=masks)
    return (got - want).abs().max().item(), recs


def test_whole_head_mask_equals_zeroing_context_slice(random_vit):
    torch.manual_seed(1)
    x = torch.randn(3, 3, 32, 32)
    layer, head = 1, 1
    ref = copy.deepcopy(random_vit.module)
    hd = ref.blocks[layer].attn.head_dim

    def zero_slice(_m, args):
        (ctx,) = args
        ctx = ctx.clone()
        ctx[..., head * hd : (head + 1) * hd] = 0
        return (ctx,)

    for blk in ref.blocks:
        blk.attn.forward = type(blk.attn).forward.__get__(blk.attn)
    ref.blocks[layer].attn.proj.register_forward_pre_hook(zero_slice)
    with torch.no_grad():
        want = ref(x)
    got_gate = random_vit.logits(x, masks={(layer, head): "all"})
    full = torch.ones(random_vit.num_tokens, random_vit.num_tokens, dtype=torch.bool)
    got_matrix = random_vit.logits(x, masks={(layer, head): full})
    assert (got_gate - want).abs().max().item() < 1e-5
    assert (got_matrix - want).abs().max().item() < 1e-5
    assert (got_gate - random_vit.logits(x)).abs().max().item() > 1e-4  # pruning did something


@pytest.mark.parametrize("region", REGIONS)
def test_each_region_changes_exactly_its_cells(random_vit, region):
    torch.manual_seed(2)
    x = torch.randn(2, 3, 32, 32)
    layer, head = 2, 0
    T = random_vit.num_tokens
    m = region_matrix(region, random_vit.layout)
    expected = {
        "all": T * T,
        "cls": 2 * T - 1,
        "patch": (T - 1) ** 2,
        "cls_cross": 2 * T - 2,
        "cls_self": 1,
    }[region]
    assert int(m.sum()) == expected
    base = random_vit.attention(x)[:, layer]
    seen = {}
    random_vit.stream(x, lambda l, a: seen.__setitem__(l, a), layers=[layer], masks={(layer, head): region})
    eff = seen[layer]
    assert torch.all(eff[:, head][:, m] == 0)
    # base comes from an all-explicit pass, eff from fused earlier layers: equal up to float rounding
    assert (eff[:, head][:, ~m] - base[:, head][:, ~m]).abs().max().item() < 1e-6 if (~m).any() else True
    others = [h for h in range(random_vit.num_heads) if h != head]
    assert (eff[:, others] - base[:, others]).abs().max().item() < 1e-6
    # the pruned logits equal an independent implementation (mask applied inside timm's unfused path)
    keep = torch.ones(1, random_vit.num_heads, T, T)
    keep[:, head][:, m] = 0
    diff, _ = _check_random(random_vit, x, keeps={layer: keep}, masks={(layer, head): region})
    assert diff < 1e-5


def test_masking_nothing_changes_nothing(random_vit):
    x = torch.randn(2, 3, 32, 32)
    T = random_vit.num_tokens
    base = random_vit.logits(x)
    assert torch.equal(random_vit.logits(x, masks={}), base)
    none = torch.zeros(T, T, dtype=torch.bool)
    assert (random_vit.logits(x, masks={(0, None): none, (2, 1): none}) - base).abs().max().item() < 1e-5


def test_batched_masks_equal_individual_runs(random_vit):
    torch.manual_seed(3)
    x = torch.randn(1, 3, 32, 32)
    regions = [region_matrix(r, random_vit.layout) for r in REGIONS]
    batched = random_vit.logits(x.expand(len(regions), -1, -1, -1), masks={(1, 0): torch.stack(regions)})
    for i, r in enumerate(REGIONS):
        single = random_vit.logits(x, masks={(1, 0): r})
        assert (batched[i] - single[0]).abs().max().item() < 1e-5
    with pytest.raises(ValueError, match=r"\(T, T\)|expected shape"):
        random_vit.logits(x, masks={(1, 0): torch.zeros(3, 3, dtype=torch.bool)})


def test_stream_gradients_equal_autograd_reference(random_vit):
    torch.manual_seed(4)
    x = torch.randn(3, 3, 32, 32)
    targets = torch.tensor([0, 3, 1])
    grads, maps = {}, {}
    random_vit.stream(
        x,
        on_attention=lambda l, a: maps.__setitem__(l, a),
        on_gradient=lambda l, a, g: grads.__setitem__(l, g),
        targets=targets,
    )
    assert sorted(grads) == list(range(random_vit.num_layers))
    ref, recs = unfused_reference(random_vit)
    ref.requires_grad_(False)
    xin = x.clone().requires_grad_(True)
    loss = nn.functional.cross_entropy(ref(xin), targets, reduction="sum")
    loss.backward()
    for l, rec in enumerate(recs):
        assert (maps[l] - rec.maps[0].detach()).abs().max().item() < 1e-6
        assert (grads[l] - rec.maps[0].grad).abs().max().item() < 1e-5


def test_iter_attention_and_cache_match_attention(random_vit):
    x = torch.randn(2, 3, 32, 32)
    A = random_vit.attention(x)
    for l, a in random_vit.iter_attention(x):
        assert torch.equal(a, A[:, l])
    logits, cache = random_vit.run_with_cache(x)
    assert (logits - random_vit.logits(x)).abs().max().item() < 1e-5
    assert torch.equal(cache["blocks.1.attn.pattern"], A[:, 1])
    assert cache["blocks.2.out"].shape == (2, random_vit.num_tokens, 32)
    with pytest.raises(KeyError, match="unknown hook point"):
        random_vit.run_with_cache(x, names=["blocks.9.attn.pattern"])


def test_capture_that_misses_a_layer_raises(random_vit):
    x = torch.randn(1, 3, 32, 32)
    attn = random_vit.module.blocks[1].attn
    patched = attn.forward
    attn.forward = attn._vitscope_original_forward  # a block that bypasses the kernel
    try:
        with pytest.raises(CaptureError, match="captured 2 of 3"):
            random_vit.attention(x)
    finally:
        attn.forward = patched


def test_token_layouts_of_distilled_and_register_models():
    import timm
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    dist = vitscope.load_model(timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, depth=2), device="cpu")
    assert (dist.layout.num_prefix, dist.layout.cls_index, dist.layout.dist_index) == (2, 0, 1)
    assert dist.num_tokens == 198
    regs = vitscope.load_model(VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, reg_tokens=4, num_classes=3), device="cpu")
    assert regs.layout.register_indices == (1, 2, 3, 4) and regs.num_tokens == 21
    x = torch.randn(2, 3, 32, 32)
    ref, recs = unfused_reference(regs)
    with torch.no_grad():
        ref(x)
    assert (regs.attention(x) - torch.stack([r.maps[0] for r in recs], 1)).abs().max().item() < 5e-5


def test_unsupported_and_unknown_models_fail_clearly(tmp_path):
    import timm

    swin = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False)
    with pytest.raises(vitscope.UnsupportedModelError, match="[Ww]indowed"):
        vitscope.load_model(swin)
    with pytest.raises(vitscope.ModelLoadError, match="unknown model"):
        vitscope.load_model("deit_tinny_patch16")
    bad = tmp_path / "bad.safetensors"
    from safetensors.torch import save_file

    save_file({"foo": torch.zeros(2)}, str(bad))
    with pytest.raises(vitscope.ModelLoadError, match="do not fit"):
        vitscope.load_model("deit_tiny_patch16_224", weights=bad)
    with pytest.raises(vitscope.ModelLoadError, match="does not exist"):
        vitscope.load_model("deit_tiny_patch16_224", weights=tmp_path / "missing.pth")


def test_mask_spec_errors_name_the_problem(random_vit):
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(ValueError, match="layer must be an int in 0..2"):
        random_vit.logits(x, masks={(5, 0): "all"})
    with pytest.raises(ValueError, match="unknown mask region 'rows'"):
        random_vit.logits(x, masks={(0, 0): "rows"})
    with pytest.raises(ValueError, match="head must be None or an int"):
        random_vit.logits(x, masks={(0, 7): "all"})


def test_preprocess_matches_timm_transform(deit_tiny, imagenet_images):
    from PIL import Image
    from timm.data import create_transform, resolve_data_config

    path = imagenet_images[0][0]
    tf = create_transform(**resolve_data_config({}, model=deit_tiny.module))
    want = tf(Image.open(path).convert("RGB"))
    got = deit_tiny.preprocess([path])[0]
    assert torch.equal(got, want)
    # the PIL implementation (used for Hugging Face configs) agrees with timm's transform
    plain = copy.copy(deit_tiny.preprocessing)
    plain.transform = None
    assert (plain(path) - want).abs().max().item() < 1e-5
    arr = deit_tiny.preprocess([Image.open(path)])
    assert torch.equal(arr[0], want)


def test_allowed_keys_equal_timm_attention_mask(random_vit):
    """Pre-softmax key removal (windowed attention) equals timm's own boolean attn_mask path."""
    from vitscope.capture.runtime import LayerPlan

    torch.manual_seed(5)
    x = torch.randn(2, 3, 32, 32)
    T = random_vit.num_tokens
    allowed = torch.rand(T, T) > 0.5
    allowed[:, 0] = True  # every query keeps CLS, so no row is empty
    m = random_vit.module
    with torch.no_grad():
        h = random_vit.embed(x)
        ref = h
        for i, blk in enumerate(m.blocks):
            ref = blk(ref, attn_mask=allowed) if i == 1 else blk(ref)
        want = random_vit.readout(ref)
        got_fused = random_vit.readout(random_vit.run_blocks(h, plans={1: LayerPlan(allowed=allowed)}))
        seen = {}
        got_explicit = random_vit.readout(
            random_vit.run_blocks(h, plans={1: LayerPlan(allowed=allowed, on_attention=lambda l, a: seen.setdefault(l, a.clone()))})
        )
    assert (got_fused - want).abs().max().item() < 1e-5
    assert (got_explicit - want).abs().max().item() < 1e-5
    assert torch.all(seen[1][:, :, ~allowed] == 0)
    assert torch.allclose(seen[1].sum(-1), torch.ones(()), atol=1e-5)


@pytest.mark.parametrize("family", ["vit", "deit_teacher", "dinov2", "dinov2_registers"])
def test_hf_families_capture_and_readout(family, tmp_path):
    """Random small HF models of each supported family: capture equals eager, readout equals the model."""
    import transformers
    torch.manual_seed(0)
    common = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8, num_labels=4)
    if family == "vit":
        model = transformers.ViTForImageClassification(transformers.ViTConfig(**common))
        prefix = 1
    elif family == "deit_teacher":
        model = transformers.DeiTForImageClassificationWithTeacher(transformers.DeiTConfig(**common))
        prefix = 2
    elif family == "dinov2":
        model = transformers.Dinov2ForImageClassification(transformers.Dinov2Config(**common))
        prefix = 1
    else:
        cfg_cls = getattr(transformers, "Dinov2WithRegistersConfig", None)
        if cfg_cls is None:
            pytest.skip("this transformers release has no Dinov2WithRegisters")
        model = transformers.Dinov2WithRegistersForImageClassification(cfg_cls(num_register_tokens=3, **common))
        prefix = 4
    model.save_pretrained(tmp_path / family)
    vit = vitscope.load_model(f"hf:{tmp_path / family}", device="cpu")
    assert vit.layout.num_prefix == prefix and vit.num_tokens == prefix + 16
    eager = type(model).from_pretrained(tmp_path / family, attn_implementation="eager").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = eager(pixel_values=x, output_attentions=True)
    assert (vit.attention(x) - torch.stack(out.attentions, 1)).abs().max().item() <= 5e-5
    assert (vit.logits(x) - out.logits).abs().max().item() < 1e-5
    h = vit.embed(x)
    with torch.no_grad():
        via_pieces = vit.readout(vit.run_blocks(h))
    assert (via_pieces - out.logits).abs().max().item() < 1e-5
    # the same model passed in memory goes to the Hugging Face backend too
    in_memory = vitscope.load_model(type(model).from_pretrained(tmp_path / family), device="cpu")
    assert in_memory.library == vit.library and (in_memory.attention(x) - torch.stack(out.attentions, 1)).abs().max().item() <= 5e-5


def test_model_with_its_own_boolean_mask_is_captured_exactly(random_vit):
    """A block that passes a boolean attn_mask (as WinfT does) keeps it under capture and pruning."""
    import types as _types

    torch.manual_seed(6)
    T = random_vit.num_tokens
    allowed = torch.rand(T, T) > 0.4
    allowed[:, 0] = True
    model = copy.deepcopy(random_vit.module)
    for blk in model.blocks:
        blk.forward = _types.MethodType(lambda self, x, _f=type(blk).forward: _f(self, x, attn_mask=allowed), blk)
    masked = vitscope.load_model(model, device="cpu")
    x = torch.randn(2, 3, 32, 32)
    A = masked.attention(x)
    assert torch.all(A[:, :, :, ~allowed] == 0)
    assert torch.allclose(A.sum(-1), torch.ones(()), atol=1e-5)
    assert (masked.logits(x, masks={(1, None): "cls_self"}) - masked.logits(x)).abs().max() > 0
    # unmasked capture and plain forward agree
    ref = masked.readout(masked.run_blocks(masked.embed(x), plans={}))
    logits, _ = masked.run_with_cache(x)
    assert (logits - ref).abs().max().item() < 1e-5


def test_attention_into_a_reused_buffer(random_vit):
    x = torch.randn(2, 3, 32, 32)
    first = random_vit.attention(x)
    again = random_vit.attention(torch.randn(2, 3, 32, 32), out=first)
    assert again.data_ptr() == first.data_ptr()
    assert torch.equal(random_vit.attention(x, out=again), random_vit.attention(x))
    with pytest.raises(ValueError, match="out must be"):
        random_vit.attention(torch.randn(3, 3, 32, 32), out=first)


def test_one_module_wrapped_twice_keeps_both_wrappers_working():
    """Two ViT objects over one timm module: the first still captures after the second is made."""
    from timm.models.vision_transformer import VisionTransformer

    import vitscope

    torch.manual_seed(1)
    m = VisionTransformer(img_size=32, patch_size=8, num_classes=5, embed_dim=32, depth=3, num_heads=2, mlp_ratio=2.0)
    first = vitscope.load_model(m, device="cpu")
    second = vitscope.load_model(m, device="cpu")
    x = torch.randn(2, 3, 32, 32)
    ref, recs = unfused_reference(first)
    with torch.no_grad():
        ref(x)
    want = torch.stack([r.maps[0] for r in recs], dim=1)
    torch.testing.assert_close(first.attention(x), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(second.attention(x), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(first.logits(x, masks={(0, 1): "all"}), second.logits(x, masks={(0, 1): "all"}), rtol=0, atol=0)


def test_model_sources_are_a_registry_in_order(tmp_path):
    """load_model tries each registered source in order; a new source can be added before another."""
    from vitscope.models import loader

    assert [s.name for s in loader.MODEL_SOURCES] == ["module", "hf", "builtin", "file", "timm"]
    seen = []

    def load_mine(spec, weights, device):
        seen.append(spec)
        return vitscope.load_model("fmnist_vit_tiny", device=device)

    mine = loader.ModelSource("mine", lambda s: isinstance(s, str) and s.startswith("mine:"), load_mine, "'mine:<name>'")
    loader.register_model_source(mine, before="builtin")
    try:
        assert [s.name for s in loader.MODEL_SOURCES][2] == "mine"
        vit = vitscope.load_model("mine:anything")
        assert seen == ["mine:anything"] and vit.num_layers == 6
        with pytest.raises(ValueError, match="already registered"):
            loader.register_model_source(mine)
    finally:
        loader.MODEL_SOURCES.remove(mine)
    with pytest.raises(vitscope.ModelLoadError, match="unknown model 'no_such_model_xyz'"):
        vitscope.load_model("no_such_model_xyz")



def test_every_backend_implements_the_backend_protocol(random_vit, tmp_path):
    import transformers

    from vitscope.models.backends.base import Backend

    assert isinstance(random_vit.backend, Backend)
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8, num_labels=4)
    hf = vitscope.load_model(transformers.ViTForImageClassification(cfg), device="cpu")
    assert isinstance(hf.backend, Backend) and hf.library == "transformers"
    assert random_vit.backend.layout((3, 32, 32)) == random_vit.layout

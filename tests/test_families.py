"""More ViT families, each checked against its own library: exact capture with the model's own
forward left fused, whole-head pruning against zeroing the head's context slice, and the layout.

Every model is a tiny random-weight instance built from the library's own classes and configs.
"""

from __future__ import annotations

import copy

import pytest
import torch

import vitscope
from vitscope.capture.runtime import AttentionRuntime, LayerPlan

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 5e-5


# --------------------------------------------------------------------------- runtime
def test_runtime_additive_bias_on_every_path():
    """A float bias joins the scores before the softmax: tracking, in-place and fused idle paths."""
    torch.manual_seed(0)
    B, H, T, D = 2, 3, 7, 4
    q, k, v = torch.randn(3, B, H, T, D).unbind(0)
    bias = torch.randn(1, H, T, T)
    allowed = torch.rand(T, T) > 0.3
    allowed[:, 0] = True
    rt = AttentionRuntime(1)
    scores = (q * 0.5) @ k.transpose(-2, -1) + bias
    want = scores.softmax(-1)
    seen = {}
    out = rt.attend(LayerPlan(on_attention=lambda l, a: seen.__setitem__("inplace", a)), 0, q, k, v, 0.5, bias=bias)
    assert (seen["inplace"] - want).abs().max() < 1e-6 and (out - want @ v).abs().max() < 1e-6
    qg = q.clone().requires_grad_(True)
    rt.attend(LayerPlan(on_attention=lambda l, a: seen.__setitem__("tracking", a)), 0, qg, k, v, 0.5, bias=bias)
    assert (seen["tracking"] - want).abs().max() < 1e-6
    gated = want @ v
    gated[:, 1] = 0
    assert (rt.attend(LayerPlan(head_gate=torch.tensor([[1.0, 0.0, 1.0]])), 0, q, k, v, 0.5, bias=bias) - gated).abs().max() < 1e-6
    masked = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    assert (rt.attend(LayerPlan(allowed=allowed), 0, q, k, v, 0.5, bias=bias) - masked @ v).abs().max() < 1e-6
    rt.attend(LayerPlan(allowed=allowed, on_attention=lambda l, a: seen.__setitem__("both", a)), 0, q, k, v, 0.5, bias=bias)
    assert (seen["both"] - masked).abs().max() < 1e-6
    # no bias: the in-place path is bit-identical to before (one GEMM, one softmax)
    rt.attend(LayerPlan(on_attention=lambda l, a: seen.__setitem__("plain", a)), 0, q, k, v, 0.5)
    assert torch.equal(seen["plain"], torch.softmax(torch.baddbmm(torch.empty(B * H, T, T), q.reshape(-1, T, D), k.reshape(-1, T, D).transpose(1, 2), beta=0.0, alpha=0.5), -1).view(B, H, T, T))


# --------------------------------------------------------------------------- helpers
class _Recorder(torch.nn.Module):
    """Stands in for a timm attention's ``attn_drop``: in timm's unfused path it sees the matrix
    that multiplies ``v`` (optionally multiplying it by a keep-mask: pruning done independently)."""

    def __init__(self, keep: torch.Tensor | None = None) -> None:
        super().__init__()
        self.keep = keep
        self.maps: list[torch.Tensor] = []

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        if self.keep is not None:
            a = a * self.keep
        self.maps.append(a)
        return a


def _timm_reference(vit, keeps: dict[int, torch.Tensor] | None = None):
    """A deep copy running timm's own unfused attention (original forward, ``fused_attn`` off)."""
    ref = copy.deepcopy(vit.module)
    recorders = []
    for i, blk in enumerate(ref.blocks):
        attn = blk.attn
        attn.forward = type(attn).forward.__get__(attn)
        if hasattr(attn, "fused_attn"):
            attn.fused_attn = False
        attn.attn_drop = rec = _Recorder((keeps or {}).get(i))
        recorders.append(rec)
    return ref.eval(), recorders


def _timm_output(model, x, embedding: bool):
    with torch.no_grad():
        return model.forward_head(model.forward_features(x), pre_logits=True) if embedding else model(x)


def _vit_output(vit, x, masks=None, embedding: bool = False):
    with torch.no_grad():
        h = vit.run_blocks(vit.embed(x), plans=vit.plans_for_masks(masks))
        return vit.backend.embedding(h) if embedding else vit.readout(h)


def _head_zeroed(model, layer: int, head: int):
    """A copy of ``model`` (original forwards) with head ``head``'s context slice zeroed where the
    heads are concatenated: before the sub-LN ``norm`` when the attention has one, else before ``proj``."""
    ref = copy.deepcopy(model)
    for blk in ref.blocks:
        blk.attn.forward = type(blk.attn).forward.__get__(blk.attn)
    attn = ref.blocks[layer].attn
    hd = attn.head_dim if hasattr(attn, "head_dim") else attn.proj.in_features // attn.num_heads

    def zero_slice(_m, args):
        ctx = args[0].clone()
        ctx[..., head * hd : (head + 1) * hd] = 0
        return (ctx, *args[1:])

    (attn.norm if hasattr(attn, "norm") else attn.proj).register_forward_pre_hook(zero_slice)
    return ref.eval()


def _randomise(model, scale: float = 0.05):
    """Random weights everywhere (timm zero-initialises biases, relative position tables, ...)."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    return model


def _check_timm(vit, x, *, fused: bool = True, rows_sum_to_one: bool = True):
    m = vit.module
    embedding = not vit.num_classes
    if fused:
        assert all(blk.attn.fused_attn for blk in m.blocks), "the model's own forward must stay fused"
    ref, recs = _timm_reference(vit)
    want = _timm_output(ref, x, embedding)
    A = vit.attention(x)
    R = torch.stack([r.maps[0] for r in recs], dim=1)
    assert A.shape == (x.shape[0], vit.num_layers, vit.num_heads, vit.num_tokens, vit.num_tokens)
    assert (A - R).abs().max().item() <= TOL
    if rows_sum_to_one:
        assert torch.allclose(A.sum(-1), torch.ones(()), atol=1e-5)
    plain = _timm_output(m, x, embedding)
    # idle, the wrapped model computes exactly what the unmodified model does
    pristine = copy.deepcopy(m)
    for blk in pristine.blocks:
        blk.attn.forward = type(blk.attn).forward.__get__(blk.attn)
    assert torch.equal(_timm_output(pristine, x, embedding), plain)
    if not embedding:
        assert torch.equal(vit.logits(x), plain)
    assert (_vit_output(vit, x, embedding=embedding) - plain).abs().max().item() < 1e-5
    assert (plain - want).abs().max().item() < 1e-4
    # whole-head pruning (fused gate) equals zeroing that head's context slice in the model itself
    layer, head = vit.num_layers - 1, 1
    got = _vit_output(vit, x, {(layer, head): "all"}, embedding)
    assert (got - _timm_output(_head_zeroed(m, layer, head), x, embedding)).abs().max().item() < 1e-5
    assert (got - plain).abs().max().item() > 1e-4  # pruning did something
    # a region mask (explicit matrix) equals the same mask multiplied in by timm's own unfused path
    from vitscope.capture.masks import region_matrix

    T = vit.num_tokens
    keep = torch.ones(1, vit.num_heads, T, T)
    keep[:, 0][:, region_matrix("patch", vit.layout)] = 0
    ref, _ = _timm_reference(vit, {0: keep})
    assert (_vit_output(vit, x, {(0, 0): "patch"}, embedding) - _timm_output(ref, x, embedding)).abs().max().item() < 1e-5


def _timm(name: str, **kw):
    import timm

    torch.manual_seed(0)
    return vitscope.load_model(_randomise(timm.create_model(name, pretrained=False, **kw)), device="cpu")


SMALL = dict(img_size=64, depth=2, embed_dim=64, num_heads=4)


# --------------------------------------------------------------------------- timm Eva
@pytest.mark.parametrize(
    "name, kw, prefix, regs",
    [
        ("eva02_tiny_patch14_224", dict(img_size=56, depth=2, num_classes=5), 1, ()),
        ("eva02_tiny_patch14_224", dict(img_size=56, depth=2, num_classes=5, qk_norm=True, scale_attn_inner=True), 1, ()),
        ("vit_small_patch16_rope_224", dict(SMALL, num_classes=5), 1, ()),
        ("vit_small_patch16_rope_mixed_224", dict(SMALL, num_classes=5), 1, ()),
        ("vit_small_patch16_rope_224", dict(SMALL, num_classes=5, qkv_fused=False, num_kv_heads=2), 1, ()),
        ("vit_base_patch16_rope_reg1_gap_256", dict(SMALL, num_classes=5), 1, (0,)),
        ("vit_tiny_patch16_dinov3_qkvb", dict(SMALL, num_classes=0), 5, (1, 2, 3, 4)),
        ("vit_pe_core_tiny_patch16_384", dict(SMALL, num_classes=5), 1, ()),
    ],
    ids=["eva02", "eva02-qknorm-subln", "rope-axial", "rope-mixed", "rope-gqa", "rope-reg-gap", "dinov3", "pe-attnpool"],
)
def test_timm_eva_family(name, kw, prefix, regs):
    vit = _timm(name, **kw)
    side = kw["img_size"]
    grid = side // vit.module.patch_embed.patch_size[0]
    assert vit.layout.num_prefix == prefix and vit.layout.register_indices == regs
    assert vit.layout.cls_index == (0 if vit.module.cls_token is not None else None)
    assert vit.num_tokens == prefix + grid * grid
    _check_timm(vit, torch.randn(2, 3, side, side))


@pytest.mark.parametrize("name", ["vit_small_patch16_rope_224", "beitv2_base_patch16_224"])
def test_position_dependent_models_need_the_full_sequence(name):
    vit = _timm(name, **SMALL, num_classes=5)
    h = vit.embed(torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match="full sequence"):
        vit.run_blocks(h[:, :-3])


def test_eva_stream_gradients_equal_autograd():
    """The tracking path (q requires grad) under rotary embeddings: maps and gradients exact."""
    vit = _timm("vit_small_patch16_rope_224", **SMALL, num_classes=5)
    x = torch.randn(2, 3, 64, 64)
    targets = torch.tensor([1, 3])
    maps, grads = {}, {}
    vit.stream(x, lambda l, a: maps.__setitem__(l, a), on_gradient=lambda l, a, g: grads.__setitem__(l, g), targets=targets)
    ref, recs = _timm_reference(vit)
    for r in recs:
        r.forward = lambda a, _r=r: (a.retain_grad(), _r.maps.append(a), a)[2]
    xin = x.clone().requires_grad_(True)
    torch.nn.functional.cross_entropy(ref(xin), targets, reduction="sum").backward()
    for l, rec in enumerate(recs):
        assert (maps[l] - rec.maps[0].detach()).abs().max().item() < 1e-6
        assert (grads[l] - rec.maps[0].grad).abs().max().item() < 1e-5


def test_timm_vit_with_its_own_float_mask():
    """A VisionTransformer whose blocks pass an additive float attn_mask keeps it under capture."""
    import types

    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=3)
    bias = torch.randn(1, 2, 17, 17)
    for blk in model.blocks:
        blk.forward = types.MethodType(lambda self, x, _f=type(blk).forward: _f(self, x, attn_mask=bias), blk)
    vit = vitscope.load_model(model, device="cpu")
    x = torch.randn(2, 3, 32, 32)
    ref, recs = _timm_reference(vit)
    with torch.no_grad():
        want = ref(x)
    assert (vit.attention(x) - torch.stack([r.maps[0] for r in recs], 1)).abs().max().item() <= TOL
    assert (vit.logits(x) - want).abs().max().item() < 1e-5
    assert (_vit_output(vit, x, {(1, 0): "cls"}) - vit.logits(x)).abs().max().item() > 1e-5


# --------------------------------------------------------------------------- timm BEiT
@pytest.mark.parametrize(
    "name, kw",
    [
        ("beitv2_base_patch16_224", dict(SMALL, num_classes=5)),
        ("beit_base_patch16_224", dict(SMALL, num_classes=5, use_rel_pos_bias=False, use_shared_rel_pos_bias=True)),
        ("beit_base_patch16_224", dict(SMALL, num_classes=5, use_shared_rel_pos_bias=True)),
    ],
    ids=["per-layer-bias", "shared-bias", "both-biases"],
)
def test_timm_beit_relative_position_bias(name, kw):
    vit = _timm(name, **kw)
    m = vit.module
    biased = [blk.attn.relative_position_bias_table is not None for blk in m.blocks]
    assert any(biased) or m.rel_pos_bias is not None
    assert (vit.layout.num_prefix, vit.layout.cls_index, vit.num_tokens) == (1, 0, 17)
    _check_timm(vit, torch.randn(2, 3, 64, 64))


# --------------------------------------------------------------------------- timm CaiT
def test_timm_cait_talking_heads():
    """The analysed layers are the talking-heads blocks (patch tokens only); the map of head h is the
    one after ``proj_w`` (it multiplies head h's values), so its rows need not sum to 1."""
    vit = _timm("cait_xxs24_224", **SMALL, num_classes=5, init_values=0.5)  # LayerScale large enough to see a head
    assert vit.num_layers == len(vit.module.blocks) == 2 and len(vit.module.blocks_token_only) == 2
    assert (vit.layout.num_prefix, vit.layout.cls_index, vit.num_tokens) == (0, None, 16)
    x = torch.randn(2, 3, 64, 64)
    _check_timm(vit, x, fused=False, rows_sum_to_one=False)


def test_timm_cait_both_maps_of_a_talking_head():
    """``maps="softmax"`` gives each head's own softmax, before ``proj_w`` mixes the heads: the
    input of timm's ``proj_w``, read by a hook on an unpatched copy; ``"effective"`` gives the map
    after it (the input of ``attn_drop``)."""
    import copy

    import timm

    torch.manual_seed(0)
    model = _randomise(timm.create_model("cait_xxs24_224", pretrained=False, **SMALL, num_classes=5, init_values=0.5))
    ref = copy.deepcopy(model)
    vit = vitscope.load_model(model, device="cpu")
    softmax, mixed = {}, {}
    for l, blk in enumerate(ref.blocks):
        blk.attn.proj_w.register_forward_hook(lambda _m, args, _o, l=l: softmax.__setitem__(l, args[0].permute(0, 3, 1, 2)))
        blk.attn.attn_drop.register_forward_hook(lambda _m, args, _o, l=l: mixed.__setitem__(l, args[0]))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref(x)
        got_soft, got_mixed = {}, {}
        vit.stream(x, lambda l, a: got_soft.__setitem__(l, a), maps="softmax")
        vit.stream(x, lambda l, a: got_mixed.__setitem__(l, a))
    for l in range(vit.num_layers):
        assert (got_soft[l] - softmax[l]).abs().max() < 5e-6
        assert (got_mixed[l] - mixed[l]).abs().max() < 5e-6
        torch.testing.assert_close(got_soft[l].sum(-1), torch.ones_like(got_soft[l].sum(-1)))
        assert (got_mixed[l] - got_soft[l]).abs().max() > 1e-3  # the two maps really differ
    # Other families: the two are the same matrix.
    plain = _timm("vit_small_patch16_224", **SMALL, num_classes=5)
    a, b = {}, {}
    with torch.no_grad():
        plain.stream(x, lambda l, m: a.__setitem__(l, m), maps="softmax")
        plain.stream(x, lambda l, m: b.__setitem__(l, m))
    assert all(torch.equal(a[l], b[l]) for l in a)
    with pytest.raises(ValueError, match="maps='softmax'.*masks"):
        vit.stream(x, lambda l, m: None, maps="softmax", masks={(0, 0): "patch"})


# --------------------------------------------------------------------------- Hugging Face
HF_COMMON = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8)


def _hf_model(family: str):
    import transformers as tr

    c = HF_COMMON
    builders = {
        "clip": lambda: tr.CLIPVisionModel(tr.CLIPVisionConfig(**c)),
        "clip-classifier": lambda: tr.CLIPForImageClassification(tr.CLIPConfig(vision_config=c, num_labels=4)),
        "siglip": lambda: tr.SiglipVisionModel(tr.SiglipVisionConfig(**c)),
        "siglip-no-head": lambda: tr.SiglipVisionModel(tr.SiglipVisionConfig(**c, vision_use_head=False)),
        "siglip-classifier": lambda: tr.SiglipForImageClassification(tr.SiglipConfig(vision_config=c, num_labels=4)),
        "vit-mae": lambda: tr.ViTMAEModel(tr.ViTMAEConfig(**c, mask_ratio=0.0)),
        "beit": lambda: tr.BeitModel(tr.BeitConfig(**c, use_relative_position_bias=True)),
        "beit-shared-classifier": lambda: tr.BeitForImageClassification(tr.BeitConfig(**c, use_shared_relative_position_bias=True, num_labels=4)),
        "beit-meanpool-classifier": lambda: tr.BeitForImageClassification(tr.BeitConfig(**c, use_relative_position_bias=True, use_mean_pooling=True, num_labels=4)),
        "data2vec": lambda: tr.Data2VecVisionModel(tr.Data2VecVisionConfig(**c, use_relative_position_bias=True)),
        "data2vec-shared-classifier": lambda: tr.Data2VecVisionForImageClassification(tr.Data2VecVisionConfig(**c, use_shared_relative_position_bias=True, num_labels=4)),
        "dinov2-registers": lambda: tr.Dinov2WithRegistersModel(tr.Dinov2WithRegistersConfig(**c, num_register_tokens=3)),
        "dinov3": lambda: tr.DINOv3ViTModel(tr.DINOv3ViTConfig(**c, num_register_tokens=2)),  # rotary on the patches
        "vit": lambda: tr.ViTModel(tr.ViTConfig(**c)),
    }
    torch.manual_seed(0)
    return _randomise(builders[family]()).eval()


#: family -> (num_prefix, cls_index, register_indices)
HF_LAYOUTS = {
    "clip": (1, 0, ()),
    "clip-classifier": (1, 0, ()),
    "siglip": (0, None, ()),
    "siglip-no-head": (0, None, ()),
    "siglip-classifier": (0, None, ()),
    "vit-mae": (1, 0, ()),
    "beit": (1, 0, ()),
    "beit-shared-classifier": (1, 0, ()),
    "beit-meanpool-classifier": (1, 0, ()),
    "data2vec": (1, 0, ()),
    "data2vec-shared-classifier": (1, 0, ()),
    "dinov2-registers": (4, 0, (1, 2, 3)),
    "dinov3": (3, 0, (1, 2)),
    "vit": (1, 0, ()),
}


#: backbone family -> its pooled embedding, from the library's own outputs
HF_POOLED = {
    "clip": lambda out: out.pooler_output,  # post-layernorm CLS
    "siglip": lambda out: out.pooler_output,  # attention-pooling head
    "siglip-no-head": lambda out: out.last_hidden_state.mean(1),
    "beit": lambda out: out.pooler_output,  # CLS after the final layernorm
    "data2vec": lambda out: out.last_hidden_state[:, 1:].mean(1),  # mean pooling, no pooler module
    "vit-mae": lambda out: out.last_hidden_state[:, 0],
    "dinov2-registers": lambda out: out.last_hidden_state[:, 0],
    "dinov3": lambda out: out.pooler_output,  # CLS after the final norm
    "vit": lambda out: out.last_hidden_state[:, 0],  # CLS after layernorm (not the tanh pooler)
}


def _hf_run(model, x, family: str):
    """The library's own output: logits, or the pooled embedding its outputs carry."""
    kw = {"noise": torch.arange(16.0).expand(x.shape[0], 16)} if family == "vit-mae" else {}
    with torch.no_grad():
        out = model(pixel_values=x, **kw)
        return out.logits if hasattr(out, "logits") else HF_POOLED[family](out)


def _out_proj(layer: torch.nn.Module) -> torch.nn.Module:
    for name, sub in layer.named_modules():
        if name.endswith(("o_proj", "out_proj", "attention.output.dense")):
            return sub
    raise AssertionError(f"no attention output projection in {type(layer).__name__}")


@pytest.mark.parametrize("family", list(HF_LAYOUTS))
def test_hf_family(family, tmp_path):
    model = _hf_model(family)
    model.save_pretrained(tmp_path)
    cls = type(model)
    vit = vitscope.load_model(f"hf:{tmp_path}", device="cpu")
    assert type(vit.module) is cls
    # the model's own attention stays fused: SDPA behind the "vitscope" interface function, or
    # (Data2Vec, which predates the interface) its SDPA attention class
    if family.startswith("data2vec"):
        assert all(type(l.attention.attention).__name__.endswith("SdpaSelfAttention") for l in vit.backend.blocks)
    else:
        assert vit.module.config._attn_implementation == "vitscope"
    prefix, cls_index, regs = HF_LAYOUTS[family]
    L = vit.layout
    assert (L.num_prefix, L.cls_index, L.register_indices, L.grid, vit.num_tokens) == (prefix, cls_index, regs, (4, 4), prefix + 16)
    x = torch.randn(2, 3, 32, 32)
    eager = cls.from_pretrained(tmp_path, attn_implementation="eager").eval()
    kw = {"noise": torch.arange(16.0).expand(2, 16)} if family == "vit-mae" else {}
    with torch.no_grad():
        R = torch.stack(eager(pixel_values=x, output_attentions=True, **kw).attentions, dim=1)
    A = vit.attention(x)
    assert A.shape == R.shape and (A - R).abs().max().item() <= TOL
    assert torch.allclose(A.sum(-1), torch.ones(()), atol=1e-5)
    # plain forward equals the unmodified model's; the pieces equal it too
    # (gradients off, as load_model leaves them: torch's MultiheadAttention, SigLIP's pooling head,
    # takes its fast path only then)
    pristine = cls.from_pretrained(tmp_path, attn_implementation="sdpa").eval().requires_grad_(False)
    plain = _hf_run(pristine, x, family)
    with torch.no_grad():
        assert torch.equal(vit.backend.forward(x), plain)
    embedding = not vit.num_classes
    if not embedding:
        assert torch.equal(vit.logits(x), plain)
    assert (_vit_output(vit, x, embedding=embedding) - plain).abs().max().item() < 1e-5
    assert (_hf_run(eager, x, family) - plain).abs().max().item() < 1e-4
    # whole-head pruning equals zeroing that head's context slice before the output projection
    layer, head, hd = 1, 1, HF_COMMON["hidden_size"] // HF_COMMON["num_attention_heads"]

    def zero_slice(_m, args):
        ctx = args[0].clone()
        ctx[..., head * hd : (head + 1) * hd] = 0
        return (ctx, *args[1:])

    zeroed = cls.from_pretrained(tmp_path, attn_implementation="sdpa").eval().requires_grad_(False)
    base = zeroed.vision_model if hasattr(zeroed, "vision_model") else getattr(zeroed, zeroed.base_model_prefix, zeroed)
    layers = [m for m in base.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == HF_COMMON["num_hidden_layers"]][0]
    _out_proj(layers[layer]).register_forward_pre_hook(zero_slice)
    got = _vit_output(vit, x, {(layer, head): "all"}, embedding)
    assert (got - _hf_run(zeroed, x, family)).abs().max().item() < 1e-5
    assert (got - plain).abs().max().item() > 1e-4


def test_hf_backbones_embedding_and_refusals(tmp_path):
    import transformers as tr

    from vitscope.models.backends.base import Backend

    vit = vitscope.load_model(_hf_model("clip"), device="cpu")
    assert isinstance(vit.backend, Backend) and vit.num_classes is None
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(ValueError, match="no classification head"):
        vit.logits(x)
    emb = vit.backend.embedding(vit.run_blocks(vit.embed(x)))
    assert emb.shape == (2, 32) and (emb - vit.backend.forward(x)).abs().max().item() < 1e-5
    # a whole CLIP checkpoint loads as its vision tower; a ViT-MAE pre-training checkpoint as its
    # encoder with masking off
    text = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    tr.CLIPModel(tr.CLIPConfig(vision_config=HF_COMMON, text_config=text)).save_pretrained(tmp_path / "clip")
    whole = vitscope.load_model(f"hf:{tmp_path / 'clip'}", device="cpu")
    assert type(whole.module).__name__ == "CLIPVisionModelWithProjection"  # the embedding is CLIP's image_embeds
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        image_embeds = tr.CLIPModel.from_pretrained(tmp_path / "clip").eval().get_image_features(pixel_values=x).pooler_output
    torch.testing.assert_close(whole.embeddings(x), image_embeds, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(whole.backend.forward(x), image_embeds, atol=1e-5, rtol=1e-5)
    tr.ViTMAEForPreTraining(tr.ViTMAEConfig(**HF_COMMON)).save_pretrained(tmp_path / "mae")
    mae = vitscope.load_model(f"hf:{tmp_path / 'mae'}", device="cpu")
    assert type(mae.module).__name__ == "ViTMAEModel" and mae.module.config.mask_ratio == 0.0 and mae.num_tokens == 17
    with pytest.raises(vitscope.UnsupportedModelError, match="mask_ratio"):
        vitscope.load_model(tr.ViTMAEModel(tr.ViTMAEConfig(**HF_COMMON)), device="cpu")
    swin = tr.SwinModel(tr.SwinConfig(image_size=32, embed_dim=16, depths=[1], num_heads=[2]))
    with pytest.raises(vitscope.UnsupportedModelError, match="Windowed attention"):
        vitscope.load_model(swin, device="cpu")


def test_timm_backbone_embedding_and_swin_refusal():
    import timm

    vit = _timm("vit_tiny_patch16_dinov3_qkvb", **SMALL, num_classes=0)
    x = torch.randn(2, 3, 64, 64)
    emb = vit.backend.embedding(vit.run_blocks(vit.embed(x)))
    assert emb.shape == (2, 64) and (emb - vit.module(x)).abs().max().item() < 1e-5
    classifier = _timm("vit_small_patch16_rope_224", **SMALL, num_classes=5)
    h = classifier.run_blocks(classifier.embed(x))
    assert classifier.backend.embedding(h).shape == (2, 64) and classifier.readout(h).shape == (2, 5)
    swin = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, depths=(1, 1, 1, 1), embed_dim=16, num_heads=(1, 1, 1, 1))
    with pytest.raises(vitscope.UnsupportedModelError, match="Windowed attention"):
        vitscope.load_model(swin, device="cpu")

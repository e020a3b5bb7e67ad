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
    ],
    ids=["eva02", "eva02-qknorm-subln", "rope-axial", "rope-mixed", "rope-gqa", "rope-reg-gap", "dinov3"],
)
def test_timm_eva_family(name, kw, prefix, regs):
    vit = _timm(name, **kw)
    side = kw["img_size"]
    grid = side // vit.module.patch_embed.patch_size[0]
    assert vit.layout.num_prefix == prefix and vit.layout.register_indices == regs
    assert vit.layout.cls_index == (0 if vit.module.cls_token is not None else None)
    assert vit.num_tokens == prefix + grid * grid
    _check_timm(vit, torch.randn(2, 3, side, side))


def test_eva_rope_needs_the_full_sequence():
    vit = _timm("vit_small_patch16_rope_224", **SMALL, num_classes=5)
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

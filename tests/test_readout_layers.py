"""Attention inside the readout (CaiT's class-attention blocks, timm's attention-pooling head) as
readout layers of their own: the captured maps equal timm's unfused path, the model's own forward is
untouched, and pruning a readout head equals zeroing its context slice before the projection."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from torch import nn

import vitscope
from vitscope.analysis.importance import readout_head_sweep


def _randomise(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("gamma_1", "gamma_2")):
                p.fill_(1.0)  # (CaiT's layer scale starts at 1e-4: the readout would barely depend on its heads)
            elif name.endswith(("q.weight", "k.weight", "kv.weight")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)  # peaked maps
            elif name.endswith(("cls_token", "latent")):
                p.copy_(torch.randn(p.shape, generator=g))
    return model.eval()


def _cait():
    torch.manual_seed(0)
    m = timm.create_model("cait_xxs24_224", pretrained=False, img_size=32, patch_size=8, depth=2, depth_token_only=2, num_classes=5)
    return _randomise(m)


def _attention_pool():
    torch.manual_seed(0)
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2, num_classes=5,
                          global_pool="map", class_token=False)
    return _randomise(m)


MODELS = {"cait": _cait, "attention_pool": _attention_pool}


class _Recorder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.maps: list[torch.Tensor] = []

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        self.maps.append(a.detach())
        return a


def _reference(module: nn.Module, x: torch.Tensor):
    """timm's own unfused readout attention (its ``attn_drop`` input), on a deep copy, and the copy."""
    ref = copy.deepcopy(module)
    mods = [blk.attn for blk in ref.blocks_token_only] if hasattr(ref, "blocks_token_only") else [ref.attn_pool]
    recs = []
    for m in mods:
        m.fused_attn = False
        rec = _Recorder()
        if hasattr(m, "attn_drop"):
            m.attn_drop = rec
        else:  # AttentionPoolLatent has no attn_drop: record the softmax output through a wrapped forward
            original = m.forward

            def recorded(x, attn_mask=None, _m=m, _rec=rec):
                q = _m.q(_m.latent.expand(x.shape[0], -1, -1)).reshape(x.shape[0], _m.latent_len, _m.num_heads, _m.head_dim).transpose(1, 2)
                xp = x + _m.pos_embed.unsqueeze(0) if _m.pos_embed is not None else x
                k = _m.kv(xp).reshape(x.shape[0], x.shape[1], 2, _m.num_heads, _m.head_dim).permute(2, 0, 3, 1, 4)[0]
                q, k = _m.q_norm(q), _m.k_norm(k)
                _rec(((q * _m.scale) @ k.transpose(-2, -1)).softmax(-1))
                return original(x, attn_mask)

            m.forward = recorded
        recs.append(rec)
    with torch.no_grad():
        logits = ref(x)
    return [r.maps[0] for r in recs], logits, ref, mods


@pytest.mark.parametrize("family", list(MODELS))
def test_readout_maps_equal_timm_unfused_and_the_forward_is_untouched(family):
    module = MODELS[family]()
    vit = vitscope.load_model(module, device="cpu")
    x = torch.randn(3, 3, 32, 32)
    plain = vit.logits(x)
    maps = vit.readout_attention(x)
    want, ref_logits, _, _ = _reference(module, x)
    assert len(maps) == len(want) == (2 if family == "cait" else 1)
    P = vit.layout.num_patches
    for i, (got, w) in enumerate(zip(maps, want)):
        Q = 1  # CaiT's CLS query; timm's pooling head has one latent by default
        K = P + 1 if family == "cait" else vit.num_tokens
        assert got.shape == (3, vit.num_heads, Q, K), got.shape
        torch.testing.assert_close(got, w, atol=5e-5, rtol=0)
        torch.testing.assert_close(got.sum(-1), torch.ones(3, vit.num_heads, Q), atol=1e-5, rtol=0)
        assert got.std() > 1e-3  # (not uniform: the comparison means something)
        lay = vit.readout_layout(i)
        assert lay.num_tokens == K and lay.cls_index == (0 if family == "cait" else None)
    torch.testing.assert_close(ref_logits, plain, atol=1e-5, rtol=1e-5)
    assert torch.equal(vit.logits(x), plain)  # the readout's own (fused) forward is back
    assert all("forward" not in m.__dict__ for m in vit.readout_layers)


@pytest.mark.parametrize("family", list(MODELS))
def test_pruning_a_readout_head_equals_zeroing_its_context(family):
    module = MODELS[family]()
    vit = vitscope.load_model(module, device="cpu")
    x = torch.randn(4, 3, 32, 32)
    target = torch.tensor([0, 1, 2, 3])
    got = readout_head_sweep(vit, x, target)
    R, H = len(vit.readout_layers), vit.num_heads
    assert got["pruned_prob"].shape == (4, R, H)
    _, _, ref, mods = _reference(module, x)
    d = mods[0].proj.in_features // H
    with torch.no_grad():
        base = ref(x).double().softmax(-1)[torch.arange(4), target]
    torch.testing.assert_close(torch.from_numpy(got["base_prob"]), base, atol=1e-5, rtol=0)
    moved = 0.0
    for i, m in enumerate(mods):
        for h in range(H):
            def zero(_m, args, h=h):
                ctx = args[0].clone()
                ctx[..., h * d : (h + 1) * d] = 0
                return (ctx,)

            hook = m.proj.register_forward_pre_hook(zero)
            with torch.no_grad():
                want = ref(x).double().softmax(-1)[torch.arange(4), target]
            hook.remove()
            torch.testing.assert_close(torch.from_numpy(got["pruned_prob"][:, i, h]), want, atol=1e-5, rtol=0)
            moved = max(moved, float((want - base).abs().max()))
    assert moved > 1e-3  # some readout head matters


def test_models_without_readout_attention_say_so(random_vit):
    assert random_vit.readout_layers == []
    with pytest.raises(ValueError, match="no attention in its readout"):
        readout_head_sweep(random_vit, torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="0 readout attention layer.*CLS token or a mean"):
        random_vit.readout_attention(torch.randn(1, 3, 32, 32))

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


def _siglip_head(model: nn.Module) -> nn.Module:
    return getattr(model, "vision_model", model).head  # (older transformers nest the tower)


def _siglip():
    import transformers as tr

    torch.manual_seed(0)
    c = tr.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                              patch_size=8, vision_use_head=True)
    m = tr.SiglipVisionModel(c).eval()
    with torch.no_grad():
        _siglip_head(m).attention.in_proj_weight.mul_(6.0)  # peaked maps
    return m


MODELS = {"cait": _cait, "attention_pool": _attention_pool, "siglip": _siglip}


def _load(family: str):
    """The model, and its ViT (a SigLIP tower gets a fixed random linear readout: logits to prune by)."""
    from vitscope.models.readouts import LinearReadout

    module = MODELS[family]()
    vit = vitscope.load_model(module, device="cpu")
    if family == "siglip":
        g = torch.Generator().manual_seed(1)
        vit = vit.with_readout(LinearReadout(torch.randn(5, 32, generator=g), torch.zeros(5), [str(i) for i in range(5)]))
    return module, vit


def _readout_modules(module: nn.Module) -> list[nn.Module]:
    if hasattr(module, "blocks_token_only"):
        return [blk.attn for blk in module.blocks_token_only]
    if hasattr(module, "attn_pool"):
        return [module.attn_pool]
    return [_siglip_head(module)]


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


def _siglip_reference(module: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The pooling head's per-head weights from ``nn.MultiheadAttention`` itself."""
    ref = copy.deepcopy(module)
    seen = []
    head = _siglip_head(ref)
    original = head.attention.forward

    def with_weights(q, k, v, **kw):
        out, w = original(q, k, v, need_weights=True, average_attn_weights=False)
        seen.append(w.detach())
        return out, w

    head.attention.forward = with_weights
    with torch.no_grad():
        ref(pixel_values=x)
    return seen


@pytest.mark.parametrize("family", list(MODELS))
def test_readout_maps_equal_the_librarys_and_the_forward_is_untouched(family):
    module, vit = _load(family)
    x = torch.randn(3, 3, 32, 32)
    plain = vit.logits(x)
    maps = vit.readout_attention(x)
    if family == "siglip":
        want, ref_logits = _siglip_reference(module, x), plain
    else:
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
    """Against a copy of the model whose output projection has head h's input columns zeroed (the
    same as zeroing that head's slice of the context)."""
    module, vit = _load(family)
    x = torch.randn(4, 3, 32, 32)
    target = torch.tensor([0, 1, 2, 3])
    got = readout_head_sweep(vit, x, target)
    R, H = len(vit.readout_layers), vit.num_heads
    assert got["pruned_prob"].shape == (4, R, H)
    base = vit.logits(x).double().softmax(-1)[torch.arange(4), target]
    torch.testing.assert_close(torch.from_numpy(got["base_prob"]), base, atol=1e-5, rtol=0)
    moved = 0.0
    for i in range(R):
        for h in range(H):
            ref = copy.deepcopy(module)
            m = _readout_modules(ref)[i]
            proj = m.attention.out_proj if family == "siglip" else m.proj
            d = proj.in_features // H
            with torch.no_grad():
                proj.weight[:, h * d : (h + 1) * d] = 0
            ref_vit = vitscope.load_model(ref, device="cpu")
            if vit.readout_head is not None:
                ref_vit = ref_vit.with_readout(vit.readout_head)
            want = ref_vit.logits(x).double().softmax(-1)[torch.arange(4), target]
            torch.testing.assert_close(torch.from_numpy(got["pruned_prob"][:, i, h]), want, atol=1e-5, rtol=0)
            moved = max(moved, float((want - base).abs().max()))
    assert moved > 1e-3  # some readout head matters


def test_models_without_readout_attention_say_so(random_vit):
    assert random_vit.readout_layers == []
    with pytest.raises(ValueError, match="no attention in its readout"):
        readout_head_sweep(random_vit, torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="0 readout attention layer.*CLS token or a mean"):
        random_vit.readout_attention(torch.randn(1, 3, 32, 32))


def test_analyze_stores_the_readout_layers(tmp_path):
    """A CaiT run: every image's class-attention maps and each readout head's pruned probability
    (``readout_image_heads``, summarised in ``readout_heads``), equal to the direct computation."""
    import numpy as np
    from PIL import Image

    from vitscope.analysis.settings import AnalyzeSettings
    from vitscope.data import iter_batches, load_images

    rng = np.random.default_rng(0)
    for i in range(6):
        (tmp_path / "images" / str(i % 3)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(tmp_path / "images" / str(i % 3) / f"{i}.png")
    vit = vitscope.load_model(_cait(), device="cpu")
    settings = AnalyzeSettings(batch_size=4, n_boot=20, ae_epochs=1, ae_min_steps=4, n_clusters=2, curve_images=2, curve_points=3, projection="pca")
    run = vitscope.analyze(vit, tmp_path / "images", tmp_path / "run", settings=settings, progress=False)
    batch = next(iter_batches(load_images(tmp_path / "images"), vit.preprocessing, batch_size=6))
    direct = readout_head_sweep(vit, batch.x, torch.as_tensor(run.images.set_index("image_id").loc[batch.image_ids, "target"].to_numpy()))
    rih = run.table("readout_image_heads").set_index(["image_id", "readout_layer", "head"]).sort_index()
    R, H = 2, vit.num_heads
    got = rih["pruned_prob"].to_numpy().reshape(6, R, H)
    order = np.argsort(batch.image_ids)
    np.testing.assert_allclose(got, direct["pruned_prob"][order], atol=1e-6)
    rh = run.table("readout_heads")
    assert len(rh) == R * H and {"readout_layer", "head", "prob_drop", "prob_drop_lo", "prob_drop_hi"} <= set(rh.columns)
    maps = run.array("readout_attention")[...]
    assert maps.shape == (6, R, H, 1, vit.layout.num_patches + 1)
    row = {int(i): r for r, i in enumerate(run.images["image_id"])}
    want = torch.stack(vit.readout_attention(batch.x), 1).numpy()
    np.testing.assert_allclose(maps[[row[int(i)] for i in batch.image_ids]].astype(np.float32), want, atol=2e-3)


@pytest.mark.parametrize("family", ["cait", "siglip"])
def test_readout_keep_masks_gradients_and_taylor(family):
    """A keep mask that zeroes a head's whole map equals pruning the head; the gradient handed to
    ``on_gradient`` equals autograd's gradient of the logit through the captured map; a gate that
    requires grad gives the readout head's Taylor importance, equal to finite differences."""
    from vitscope.capture.readout_layers import ReadoutPlan, readout_plans

    module, vit = _load(family)
    x = torch.randn(2, 3, 32, 32)
    layers = vit.readout_layers
    H = vit.num_heads
    last = vit.run_blocks(vit.embed(x))
    keep = torch.ones(1, H, 1, 1)
    keep[0, 1] = 0
    gate = torch.ones(H)
    gate[1] = 0
    with readout_plans(layers, {0: ReadoutPlan(keep=keep)}):
        by_keep = vit.readout(last)
    with readout_plans(layers, {0: ReadoutPlan(head_gate=gate)}):
        by_gate = vit.readout(last)
    torch.testing.assert_close(by_keep, by_gate, atol=1e-6, rtol=1e-6)
    # gradients: what on_gradient sees equals autograd's gradient w.r.t. the map itself
    seen, grads = {}, {}
    with torch.enable_grad(), readout_plans(layers, {0: ReadoutPlan(on_attention=lambda i, a: (a.retain_grad(), seen.__setitem__(i, a)),
                                                                    on_gradient=lambda i, a, g: grads.__setitem__(i, g))}):
        h = last.detach().requires_grad_(True)
        vit.readout(h)[:, 2].sum().backward()
    torch.testing.assert_close(grads[0], seen[0].grad, atol=0, rtol=0)
    assert grads[0].abs().max() > 0
    # Taylor importance of readout head (0, h): |d logit / d gate| equals a central difference
    with torch.enable_grad():
        g = torch.ones(H, dtype=torch.float64, requires_grad=True)
        with readout_plans(layers, {0: ReadoutPlan(head_gate=g)}):
            y = vit.readout(last)[:, 2].sum()
        (dg,) = torch.autograd.grad(y, g)
    eps = 1e-3
    for head in range(H):
        up, down = torch.ones(H), torch.ones(H)
        up[head], down[head] = 1 + eps, 1 - eps
        with readout_plans(layers, {0: ReadoutPlan(head_gate=up)}):
            a = vit.readout(last)[:, 2].sum()
        with readout_plans(layers, {0: ReadoutPlan(head_gate=down)}):
            b = vit.readout(last)[:, 2].sum()
        assert abs(float(dg[head]) - float(a - b) / (2 * eps)) <= 1e-3 * max(1.0, abs(float(dg[head])))

"""Capture overhead per model family: time(forward + every attention map) / time(plain fused forward),
beside the family's own explicit path (timm with fused attention off; transformers' eager attention
with ``output_attentions=True``) as the peer, on random weights of the real model sizes.

Each model is built from its library's own config (no download), loaded with
:func:`vitscope.load_model`, and timed on one batch; repetitions are interleaved so that machine
load affects every method alike, and the median is reported. A correctness guard checks that the
captured maps equal the peer's (5e-5) before timing.

    .venv/bin/python benchmarks/bench_families.py [--batch 8] [--reps 5] [--only eva02,clip]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from typing import Any, Callable

import torch

import vitscope


def _timm(name: str, **kw: Any) -> Callable[[], torch.nn.Module]:
    def build() -> torch.nn.Module:
        import timm

        return timm.create_model(name, pretrained=False, **kw).eval()

    return build


def _hf(make: Callable[[Any], torch.nn.Module]) -> Callable[[], torch.nn.Module]:
    def build() -> torch.nn.Module:
        import transformers as tr

        return make(tr).eval()

    return build


#: family -> (description, builder, input size). Real sizes: the base (or the family's smallest
#: published) configuration at its native resolution.
FAMILIES: dict[str, tuple[str, Callable[[], torch.nn.Module], int]] = {
    "eva02": ("timm eva02_base_patch14_224 (rotary, SwiGLU, sub-LN; T=257)", _timm("eva02_base_patch14_224.mim_in22k"), 224),
    "rope-vit": ("timm vit_base_patch16_rope_mixed_224 (RoPE-Mixed; T=197)", _timm("vit_base_patch16_rope_mixed_224"), 224),
    "beit": ("timm beit_base_patch16_224 (relative position bias; T=197)", _timm("beit_base_patch16_224"), 224),
    "cait": ("timm cait_xxs24_224 (talking heads, class attention; T=196)", _timm("cait_xxs24_224"), 224),
    "dinov2-reg": ("timm vit_small_patch14_reg4_dinov2 at 224 (4 registers; T=261)", _timm("vit_small_patch14_reg4_dinov2", img_size=224), 224),
    "clip": ("HF CLIPVisionModel, ViT-B/16 (T=197)", _hf(lambda tr: tr.CLIPVisionModel(tr.CLIPVisionConfig(patch_size=16))), 224),
    "siglip": ("HF SiglipVisionModel, base patch16 224 (attention-pool head; T=196)", _hf(lambda tr: tr.SiglipVisionModel(tr.SiglipVisionConfig())), 224),
    "vit-mae": ("HF ViTMAEModel base, mask_ratio 0 (T=197)", _hf(lambda tr: tr.ViTMAEModel(tr.ViTMAEConfig(mask_ratio=0.0))), 224),
    "hf-dinov3": ("HF DINOv3ViTModel ViT-S/16 (rotary, 4 registers; T=201)", _hf(lambda tr: tr.DINOv3ViTModel(tr.DINOv3ViTConfig(num_register_tokens=4))), 224),
}


#: The transformers families (run with ``pixel_values=``, checked against eager attention).
HF_FAMILIES = ("clip", "siglip", "vit-mae", "hf-dinov3")


def _peer(model: torch.nn.Module, family: str) -> Callable[[torch.Tensor], Any]:
    """The family's own explicit-attention forward on an untouched copy of the weights."""
    if family in HF_FAMILIES:
        twin = copy.deepcopy(model)
        twin.config._attn_implementation = "eager"
        for m in twin.modules():
            if hasattr(m, "config") and hasattr(m.config, "_attn_implementation"):
                m.config._attn_implementation = "eager"
        if family == "vit-mae":
            # MAE shuffles patches by argsort(noise) even with nothing masked: increasing noise keeps the order.
            return lambda x: twin(pixel_values=x, output_attentions=True, noise=_identity_noise(x, twin))
        return lambda x: twin(pixel_values=x, output_attentions=True)
    twin = copy.deepcopy(model)
    for m in twin.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = False
    return lambda x: twin(x)


def _identity_noise(x: torch.Tensor, model: torch.nn.Module) -> torch.Tensor:
    n = (x.shape[-1] // model.config.patch_size) ** 2
    return torch.arange(float(n)).expand(x.shape[0], n)


def bench(family: str, batch: int, reps: int) -> dict[str, Any]:
    desc, build, size = FAMILIES[family]
    torch.manual_seed(0)
    model = build()
    peer = _peer(model, family)  # copied before vitscope patches the attention modules
    vit = vitscope.load_model(model, device="cpu")
    x = torch.randn(batch, 3, size, size)
    if family in HF_FAMILIES:
        with torch.no_grad():
            want = torch.stack(peer(x[:2]).attentions, 1)
            have = vit.attention(x[:2])
        err = float((have - want).abs().max())
        assert err < 5e-5, f"{family}: captured maps differ from eager attention by {err:.2e}"
    methods = {
        "plain": lambda: vit.module(pixel_values=x, **({"noise": _identity_noise(x, model)} if family == "vit-mae" else {}))
        if family in HF_FAMILIES else vit.module(x),
        "capture": lambda: vit.attention(x),
        "stream": lambda: vit.stream(x, lambda _l, _a: None),
        "peer": lambda: peer(x),
    }
    times: dict[str, list[float]] = {k: [] for k in methods}
    with torch.no_grad():
        for fn in methods.values():
            fn()  # warm-up
        for _ in range(reps):
            for name, fn in methods.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"family": family, "description": desc, "layers": vit.num_layers, "heads": vit.num_heads, "tokens": vit.num_tokens, **med}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--only", default="", help="comma-separated families (default: all): " + ", ".join(FAMILIES))
    args = ap.parse_args()
    wanted = [f for f in args.only.split(",") if f] or list(FAMILIES)
    rows = [bench(f, args.batch, args.reps) for f in wanted]
    print(f"batch {args.batch}, CPU, torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.reps}\n")
    print("| family | L x H, tokens | plain fused forward (s) | vitscope.attention (all maps) | vitscope.stream | family's own explicit path |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        p = r["plain"]
        print(f"| {r['description']} | {r['layers']} x {r['heads']}, {r['tokens']} | {p:.3f} | {r['capture'] / p:.2f}x | "
              f"{r['stream'] / p:.2f}x | {r['peer'] / p:.2f}x |")  # fmt: skip


if __name__ == "__main__":
    main()

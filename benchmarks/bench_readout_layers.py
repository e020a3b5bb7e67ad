#!/usr/bin/env python
"""Capture overhead of the readout layers (CaiT's class attention, attention pooling):
time(forward + every readout layer's map, ``vit.readout_attention``) / time(plain fused forward),
beside the library's own explicit path as the peer (timm with ``fused_attn = False`` on the readout
modules; for transformers' SigLIP head, ``nn.MultiheadAttention`` asked for its per-head weights).

Random weights of the real sizes, batch 8, CPU; repetitions interleaved, medians reported.

    .venv/bin/python benchmarks/bench_readout_layers.py [--batch 8] [--reps 5]
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


def _siglip() -> torch.nn.Module:
    import transformers as tr

    return tr.SiglipVisionModel(tr.SiglipVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                                      num_attention_heads=12, image_size=224, patch_size=16)).eval()


MODELS = {
    "timm cait_s24_224 (2 class-attention blocks)": (_timm("cait_s24_224"), "timm"),
    "timm vit_base_patch16_siglip_224 (attention-pool head)": (_timm("vit_base_patch16_siglip_224"), "timm"),
    "HF SiglipVisionModel base (attention-pool head)": (_siglip, "hf"),
}


def _peer(module: torch.nn.Module, library: str) -> Callable[[torch.Tensor], Any]:
    ref = copy.deepcopy(module)
    if library == "timm":
        mods = [blk.attn for blk in ref.blocks_token_only] if hasattr(ref, "blocks_token_only") else [ref.attn_pool]
        for m in mods:
            m.fused_attn = False
        return lambda x: ref(x)
    head = getattr(ref, "vision_model", ref).head
    original = head.attention.forward
    head.attention.forward = lambda q, k, v, **kw: original(q, k, v, need_weights=True, average_attn_weights=False)
    return lambda x: ref(pixel_values=x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    print("| model | readout layers x heads, keys | plain fused forward (s) | vit.readout_attention | library's own explicit path |")
    print("|---|---|---|---|---|")
    for label, (build, library) in MODELS.items():
        torch.manual_seed(0)
        module = build()
        vit = vitscope.load_model(module, device="cpu")
        x = torch.randn(args.batch, 3, 224, 224)
        peer = _peer(module, library)
        methods = {"plain": lambda: vit.backend.forward(x), "capture": lambda: vit.readout_attention(x), "peer": lambda: peer(x)}
        times: dict[str, list[float]] = {k: [] for k in methods}
        with torch.no_grad():
            for fn in methods.values():
                fn()  # warm-up
            for _ in range(args.reps):
                for k, fn in methods.items():
                    t = time.perf_counter()
                    fn()
                    times[k].append(time.perf_counter() - t)
        med = {k: statistics.median(v) for k, v in times.items()}
        maps = vit.readout_attention(x[:1])
        shape = f"{len(maps)} x {maps[0].shape[1]}, {maps[0].shape[-1]}"
        print(f"| {label} | {shape} | {med['plain']:.3f} | {med['capture'] / med['plain']:.2f}x | {med['peer'] / med['plain']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()

"""Capture overhead: time(forward + capture of every attention map) / time(plain fused forward).

Peers measured in the same run, on the same weights and inputs:
- timm ``AttentionExtract`` on a copy of the model with fused attention turned off (its requirement);
- transformers' eager attention with ``output_attentions=True`` (weights converted to the HF layout).

Repetitions are interleaved so that machine load affects every method alike; the median is reported.

    .venv/bin/python benchmarks/bench_capture.py [--batch 32] [--reps 7] [--device cpu]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import vitscope

SHARED = Path(__file__).resolve().parents[2] / "shared"
WEIGHTS = SHARED / "models" / "deit_tiny_patch16_224.safetensors"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--weights", default=str(WEIGHTS))
    args = ap.parse_args()
    if not Path(args.weights).exists():
        sys.exit(f"DeiT-Tiny weights not found at {args.weights}; pass --weights")
    dev = torch.device(args.device)
    vit = vitscope.load_model("deit_tiny_patch16_224", weights=args.weights, device=dev)
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, 224, 224, device=dev)

    from timm.utils import AttentionExtract

    unfused = copy.deepcopy(vit.module)
    for blk in unfused.blocks:
        blk.attn.forward = type(blk.attn).forward.__get__(blk.attn)
        blk.attn.fused_attn = False
    extractor = AttentionExtract(unfused, method="fx")

    from transformers import ViTForImageClassification

    from vitscope.models.convert import save_timm_as_hf

    with tempfile.TemporaryDirectory() as d:
        save_timm_as_hf(vit.module, d)
        eager = ViTForImageClassification.from_pretrained(d, attn_implementation="eager").eval().to(dev)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    methods = {
        "plain fused forward (timm)": lambda: vit.module(x),
        "vitscope.attention (forward + all maps)": lambda: vit.attention(x),
        "vitscope.attention(x, out=buf) (buffer reused across batches)": lambda: vit.attention(x, out=buf),
        "vitscope.stream (maps streamed, not kept)": lambda: vit.stream(x, lambda l, a: None),
        "timm AttentionExtract (unfused model)": lambda: extractor(x),
        "transformers eager output_attentions": lambda: eager(pixel_values=x, output_attentions=True),
    }
    # correctness guard: all three capture the same maps
    with torch.no_grad():
        A = vit.attention(x[:2])
        B = torch.stack(list(extractor(x[:2]).values()), 1)
        C = torch.stack(eager(pixel_values=x[:2], output_attentions=True).attentions, 1)
    assert (A - B).abs().max() < 5e-5 and (A - C).abs().max() < 5e-5

    buf = vit.attention(x)
    times: dict[str, list[float]] = {k: [] for k in methods}
    with torch.no_grad():
        for fn in methods.values():  # warm-up
            fn()
        for _ in range(args.reps):
            for name, fn in methods.items():
                sync()
                t0 = time.perf_counter()
                fn()
                sync()
                times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["plain fused forward (timm)"])
    print(f"DeiT-Tiny, batch {args.batch}, {dev.type}, torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.reps}\n")
    print("| method | time (s) | / plain fused forward |")
    print("|---|---|---|")
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"| {name} | {m:.3f} | {m / base:.2f}x |")


if __name__ == "__main__":
    main()

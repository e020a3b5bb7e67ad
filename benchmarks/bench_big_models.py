#!/usr/bin/env python
"""Peak memory and time of ``analyze``'s per-batch stages on big models (random weights of the real
sizes, CPU, float32): ViT-L/14 at 224 px (T = 257) and a DINOv2-L at 518 px (T = 1370).

Each stage runs in a fresh process of its own (so no stage reuses memory another freed); its figure
is the process's peak resident memory during the stage above what it held with the model and the
input loaded (``/proc/self/clear_refs`` resets the peak before the stage). Stages:
the plain fused forward; the attention stream with every per-map measure of ``analyze`` (strength,
pattern inputs); Taylor importance (keeping every layer's maps, and recomputing blocks in the
backward as ``analyze`` does for long sequences); the head sweep of one layer (its first, the most
expensive: every later block runs for each head), from which the whole sweep's time is extrapolated
(layer ``l`` costs ``L - l`` blocks per head). Beside them: the estimate of
:mod:`vitscope.pipeline.memory` and the ``L x H x T x T`` maps of one image that the analyses never
hold at once.

    .venv/bin/python benchmarks/bench_big_models.py [--batch 1] [--threads 2] [--only vit_l14_224|dinov2_l_518]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

MODELS = {
    "vit_l14_224": ("vit_large_patch14_clip_224", {"img_size": 224, "num_classes": 1000}),
    "dinov2_l_518": ("vit_large_patch14_dinov2", {"img_size": 518, "num_classes": 1000}),
}


def _status_bytes(field: str) -> int:
    """A memory figure of this process from ``/proc/self/status`` (``VmHWM``: peak, ``VmRSS``: now)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def stage(name: str, fn, out: dict) -> None:
    import gc

    gc.collect()
    base = _status_bytes("VmRSS")
    _reset_peak()
    t = time.perf_counter()
    fn()
    out[name] = {"seconds": round(time.perf_counter() - t, 2), "peak_above_model_gib": round((_status_bytes("VmHWM") - base) / 2**30, 3)}
    print(name, out[name], file=sys.stderr, flush=True)


STAGES = ("forward", "stream", "taylor_keep_maps", "taylor_recompute", "sweep_layer0")


def child(key: str, stage_name: str, batch: int, threads: int) -> dict:
    import timm
    import torch

    import vitscope
    from vitscope.analysis import importance as imp
    from vitscope.analysis import patterns, strength
    from vitscope.pipeline.memory import estimate_memory

    torch.set_num_threads(threads)
    name, kw = MODELS[key]
    torch.manual_seed(0)
    vit = vitscope.load_model(timm.create_model(name, pretrained=False, **kw).eval(), device="cpu")
    S = kw["img_size"]
    x = torch.randn(batch, 3, S, S)
    L, H, T = vit.num_layers, vit.num_heads, vit.num_tokens
    est = estimate_memory(vit)
    res: dict = {"model": name, "img_size": S, "batch": batch, "threads": threads, "L": L, "H": H, "T": T,
                 "all_maps_one_image_gib": round(L * H * T * T * 4 / 2**30, 3), "weights_gib": round(est.weights / 2**30, 3),
                 "estimate_per_image_gib": round(est.per_image / 2**30, 3), "taylor_recomputes": not imp.taylor_keeps_maps(vit, batch)}

    def stream() -> None:
        def on_attention(layer: int, attn: torch.Tensor) -> None:
            strength.attention_strength(attn, vit.layout)
            patterns.pattern_inputs(attn, vit.layout, size=16)

        with torch.no_grad():
            vit.stream(x, on_attention=on_attention, maps="softmax")

    run = {
        "forward": lambda: torch.no_grad()(vit.module)(x),
        "stream": stream,
        "taylor_keep_maps": lambda: imp.taylor_importance(vit, x, recompute=False),
        "taylor_recompute": lambda: imp.taylor_importance(vit, x, recompute=True),
        "sweep_layer0": lambda: imp.head_sweep(vit, x, layers=[0]),
    }[stage_name]
    stage(stage_name, run, res)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", choices=list(MODELS))
    ap.add_argument("--child", choices=list(MODELS), help=argparse.SUPPRESS)
    ap.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.stage, args.batch, args.threads)))
        return
    for key in [args.only] if args.only else list(MODELS):
        row: dict = {}
        for st in STAGES:
            done = subprocess.run([sys.executable, __file__, "--child", key, "--stage", st, "--batch", str(args.batch),
                                   "--threads", str(args.threads)], check=True, capture_output=True, text=True)
            part = json.loads(done.stdout.strip().splitlines()[-1])
            row.update({k: v for k, v in part.items() if k not in STAGES}, **{st: part[st]})
        L = row["L"]
        # Layer l's sweep runs L - l blocks per head (the pruned one and every later one).
        row["sweep_all_layers_extrapolated_s"] = round(row["sweep_layer0"]["seconds"] * sum(L - l for l in range(L)) / L, 1)
        used = ["stream", "sweep_layer0", "taylor_recompute" if row["taylor_recomputes"] else "taylor_keep_maps"]
        row["analyze_peak_above_model_gib"] = max(row[st]["peak_above_model_gib"] for st in used)
        print(json.dumps(row, indent=1), flush=True)


if __name__ == "__main__":
    main()

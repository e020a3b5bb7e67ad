#!/usr/bin/env python
"""Peak memory and time of ``analyze``'s per-batch stages on big models (random weights of the real
sizes, CPU, float32): ViT-L/14 at 224 px (T = 257) and a DINOv2-L at 518 px (T = 1370).

Each model runs in its own process; before each stage the process's peak resident memory is reset
(``/proc/self/clear_refs``), so each stage's figure is its own peak above the loaded model. Stages:
the plain fused forward; the attention stream with every per-map measure of ``analyze`` (strength,
pattern inputs); Taylor importance (keeping every layer's maps, and recomputing blocks in the
backward as ``analyze`` does for long sequences); the head sweep of one layer (its first, the most
expensive: every later block runs for each head), from which the whole sweep's time is extrapolated
(layer ``l`` costs ``L - l`` blocks per head). Beside them: the estimate of
:mod:`vitscope.pipeline.memory` and the ``L x H x T x T`` maps of one image that the analyses never
hold at once.

    .venv/bin/python benchmarks/bench_big_models.py [--batch 2] [--threads 2] [--only vit_l14_224|dinov2_l_518]
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


def _rss_peak() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _rss_now() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def stage(name: str, fn, out: dict) -> None:
    import gc

    gc.collect()
    base = _rss_now()
    _reset_peak()
    t = time.perf_counter()
    fn()
    out[name] = {"seconds": round(time.perf_counter() - t, 2), "peak_above_model_gib": round((_rss_peak() - base) / 2**30, 3)}
    print(name, out[name], file=sys.stderr, flush=True)


def child(key: str, batch: int, threads: int) -> dict:
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
    res: dict = {"model": name, "img_size": S, "batch": batch, "threads": threads, "L": L, "H": H, "T": T}
    res["all_maps_one_image_gib"] = round(L * H * T * T * 4 / 2**30, 3)
    est = estimate_memory(vit)
    res["estimate_gib"] = {"weights": round(est.weights / 2**30, 3), "per_image": round(est.per_image / 2**30, 3),
                           "batch": round(est.batch(batch) / 2**30, 3)}
    res["taylor_recomputes"] = not imp.taylor_keeps_maps(vit, batch)
    with torch.no_grad():
        stage("forward", lambda: vit.module(x), res)

        def stream() -> None:
            def on_attention(layer: int, attn: torch.Tensor) -> None:
                strength.attention_strength(attn, vit.layout)
                patterns.pattern_inputs(attn, vit.layout, size=16)

            vit.stream(x, on_attention=on_attention, maps="softmax")

        stage("stream", stream, res)
    stage("taylor_recompute", lambda: imp.taylor_importance(vit, x, recompute=True), res)
    if not res["taylor_recomputes"]:
        stage("taylor_keep_maps", lambda: imp.taylor_importance(vit, x, recompute=False), res)
    stage("sweep_layer0", lambda: imp.head_sweep(vit, x, layers=[0]), res)
    # Layer l's sweep runs L - l blocks per head (the pruned one and every later one).
    res["sweep_all_layers_extrapolated_s"] = round(res["sweep_layer0"]["seconds"] * sum(L - l for l in range(L)) / L, 1)
    res["peak_measured_gib"] = round(max(v["peak_above_model_gib"] for v in res.values() if isinstance(v, dict) and "peak_above_model_gib" in v), 3)
    res["weights_gib"] = round(est.weights / 2**30, 3)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", choices=list(MODELS))
    ap.add_argument("--child", choices=list(MODELS), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.batch, args.threads)))
        return
    rows = []
    for key in [args.only] if args.only else list(MODELS):
        done = subprocess.run([sys.executable, __file__, "--child", key, "--batch", str(args.batch), "--threads", str(args.threads)],
                              check=True, capture_output=True, text=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1], indent=1))


if __name__ == "__main__":
    main()

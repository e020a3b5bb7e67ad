#!/usr/bin/env python
"""The web app's speed in a real browser (headless Debian Chromium driven by Playwright).

Measured on each run given:
- first load: navigation start until every view has drawn (``window.vitscope.ready``), over
  ``--loads`` fresh pages, the first of them right after the server started (its start-up work
  still running), and when each view had drawn;
- head selection: a random (layer, head) is selected (``--selections`` times after ``--warmup``);
  the time until the last view's synchronous redraw ("redrawn") and until the next animation frame
  ("frame") — the static views, not the live answers that follow;
- live partial pruning (runs with a model): selecting a head until the six partial-pruning bars and
  the top-5 classes are drawn from the model's answer.

The two runs of issue 7's goals:

    .venv/bin/python benchmarks/bench_web.py --deit-run /tmp/runs/deit200 --synthetic-run /tmp/runs/synthetic-paper

A missing DeiT run is analysed first (DeiT-Tiny, the first 200 ImageNet-sample photos, with
interactions); a missing synthetic run is written by ``scripts/make_synthetic_run.py`` (700 images,
12 x 12 heads). ``--json FILE`` keeps the figures.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"]

SELECT_JS = """async ([layer, head]) => {
    const v = window.vitscope;
    const t0 = performance.now();
    v.select({layer, head});
    await new Promise(r => requestAnimationFrame(r));
    const frame = performance.now() - t0;
    const redrawn = Math.max(0, ...Object.values(v.drawn.last).filter(t => t >= t0).map(t => t - t0));
    return {redrawn, frame, pending: v.drawn.pending.size};
}"""

LIVE_JS = """async ([layer, head, view]) => {
    const v = window.vitscope;
    const t0 = performance.now();
    v.select({layer, head});
    while (true) {
        await new Promise(r => setTimeout(r, 1));
        if (!v.drawn.pending.has(view) && (v.drawn.last[view] ?? -1) >= t0) break;
        if (performance.now() - t0 > 30000) return -1;
    }
    return v.drawn.last[view] - t0;
}"""


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q))


def ensure_deit_run(path: Path) -> None:
    if (path / "manifest.json").exists():
        return
    weights = SHARED / "models" / "deit_tiny_patch16_224.safetensors"
    images = SHARED / "data" / "imagenet-sample"
    print(f"analysing DeiT-Tiny on 200 ImageNet-sample photos into {path} ...", flush=True)
    subprocess.run([str(Path(sys.executable).parent / "vitscope"), "analyze", "-m", "deit_tiny_patch16_224", "-w", str(weights), "-i", str(images), "-n", "200", "-o", str(path), "--interactions"], check=True)


def ensure_synthetic_run(path: Path) -> None:
    if (path / "manifest.json").exists():
        return
    print(f"writing the paper-scale synthetic run into {path} ...", flush=True)
    subprocess.run([sys.executable, str(REPO / "scripts" / "make_synthetic_run.py"), str(path)], check=True)


def measure(run_path: Path, *, with_model: bool, loads: int, warmup: int, selections: int, live: int, seed: int) -> dict:
    from playwright.sync_api import sync_playwright

    import vitscope
    from vitscope.server.app import create_app
    from vitscope.server.live import load_live_model
    from vitscope.server.runner import BackgroundServer

    run = vitscope.open_run(run_path)
    vit = None
    if with_model:
        weights = None if run.manifest["model"].get("weights") else str(SHARED / "models" / "deit_tiny_patch16_224.safetensors")
        vit, reason, _warning = load_live_model(run.manifest, weights=weights)
        if vit is None:
            raise SystemExit(f"{run_path}: the run's model could not be loaded: {reason}")
    srv = BackgroundServer(create_app(run, vit), "127.0.0.1", 0).start()
    L, H = run.manifest["model"]["num_layers"], run.manifest["model"]["num_heads"]
    rng = random.Random(seed)
    out: dict = {"run": str(run_path), "images": len(run.table("images")), "layers": L, "heads": H}
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
            load_ms, views = [], []
            for _ in range(loads):
                ctx = browser.new_context(viewport={"width": 1920, "height": 1080})
                page = ctx.new_page()
                page.goto(srv.url)
                page.wait_for_function("() => window.vitscope && window.vitscope.ready === true", timeout=60_000)
                # performance.now() counts from navigation start.
                drawn = page.evaluate("() => ({...window.vitscope.drawn.last})")
                load_ms.append(max(drawn.values()))
                views.append(drawn)
                ctx.close()
            out["first_load_ms"] = {
                "median": statistics.median(load_ms), "max": max(load_ms), "loads": load_ms,
                # when each view had drawn (its latest draw when the page became ready), median over the loads
                "views_median": {v: statistics.median(d[v] for d in views) for v in views[0]},
            }

            ctx = browser.new_context(viewport={"width": 1920, "height": 1080})
            page = ctx.new_page()
            page.goto(srv.url)
            page.wait_for_function("() => window.vitscope && window.vitscope.ready === true", timeout=60_000)
            redrawn, frame = [], []
            for i in range(warmup + selections):
                layer, head = rng.randrange(L), rng.randrange(H)
                r = page.evaluate(SELECT_JS, [layer, head])
                if i >= warmup:
                    redrawn.append(r["redrawn"])
                    frame.append(r["frame"])
                # let live answers of this selection finish so they do not overlap the next one
                page.wait_for_function("() => window.vitscope.drawn.pending.size === 0", timeout=60_000)
            out["head_selection_ms"] = {
                "n": selections,
                "redrawn_p50": pct(redrawn, 50), "redrawn_p95": pct(redrawn, 95),
                "frame_p50": pct(frame, 50), "frame_p95": pct(frame, 95),
            }
            if with_model and live:
                times = []
                prev = (-1, -1)
                for i in range(3 + live):
                    # a new head each time: re-selecting the current one asks the model nothing
                    layer, head = prev
                    while (layer, head) == prev:
                        layer, head = rng.randrange(L), rng.randrange(H)
                    prev = (layer, head)
                    t = page.evaluate(LIVE_JS, [layer, head, "head-importance"])
                    if t < 0:
                        raise SystemExit("live partial pruning did not draw within 30 s")
                    if i >= 3:
                        times.append(t)
                    page.wait_for_function("() => window.vitscope.drawn.pending.size === 0", timeout=60_000)
                out["live_partial_pruning_ms"] = {"n": live, "p50": pct(times, 50), "p95": pct(times, 95)}
            ctx.close()
            browser.close()
    finally:
        srv.stop()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--deit-run", type=Path, help="a DeiT-Tiny run of 200 ImageNet-sample photos (analysed if missing)")
    ap.add_argument("--synthetic-run", type=Path, help="the paper-scale synthetic run (written if missing)")
    ap.add_argument("--loads", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--selections", type=int, default=100)
    ap.add_argument("--live", type=int, default=30, help="live partial-pruning queries to time")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    if not a.deit_run and not a.synthetic_run:
        ap.error("give --deit-run and/or --synthetic-run")
    import torch

    torch.set_num_threads(1)
    results = []
    if a.deit_run:
        ensure_deit_run(a.deit_run)
        results.append({"name": "DeiT-Tiny, 200 images", **measure(a.deit_run, with_model=True, loads=a.loads, warmup=a.warmup, selections=a.selections, live=a.live, seed=a.seed)})
    if a.synthetic_run:
        ensure_synthetic_run(a.synthetic_run)
        results.append({"name": "synthetic, paper scale", **measure(a.synthetic_run, with_model=False, loads=a.loads, warmup=a.warmup, selections=a.selections, live=0, seed=a.seed)})
    for r in results:
        print(f"\n{r['name']} ({r['images']} images, {r['layers']} x {r['heads']} heads)")
        fl = r["first_load_ms"]
        print(f"  first load until every view drawn: median {fl['median']:.0f} ms, max {fl['max']:.0f} ms ({', '.join(f'{t:.0f}' for t in fl['loads'])})")
        print("    each view drawn by (median): " + ", ".join(f"{v} {t:.0f}" for v, t in sorted(fl["views_median"].items(), key=lambda kv: kv[1])))
        h = r["head_selection_ms"]
        print(f"  head selection -> static views redrawn: p50 {h['redrawn_p50']:.1f} ms, p95 {h['redrawn_p95']:.1f} ms; next frame p95 {h['frame_p95']:.1f} ms (n={h['n']})")
        if "live_partial_pruning_ms" in r:
            lp = r["live_partial_pruning_ms"]
            print(f"  live partial pruning (six bars + top-5 drawn): p50 {lp['p50']:.0f} ms, p95 {lp['p95']:.0f} ms (n={lp['n']})")
    if a.json:
        a.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""The README's first command: `vitscope demo` from start until every view of the app has drawn.

Starts `vitscope demo --out <fresh folder> --port 0` as a user would (a new process, so imports,
model loading and every numba/torch warm-up count), waits for the URL it prints, opens it in
headless Debian Chromium (Playwright) and stops the clock when the app reports every view drawn
(``window.vitscope.ready``). Also reports each pattern autoencoder's reconstruction error on all
of the run's maps, relative to the error of predicting every map by the per-pixel mean (1.0 = no
better than the mean; lower is better), which is the quality the speed must not cost.

    .venv/bin/python benchmarks/bench_demo.py [--repeats 2] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"]
URL = re.compile(r"http://127\.0\.0\.1:\d+/")


def one_demo(out: Path) -> dict:
    from playwright.sync_api import sync_playwright

    exe = str(Path(sys.executable).with_name("vitscope"))
    env = {**os.environ, "COLUMNS": "200"}
    t0 = time.perf_counter()
    proc = subprocess.Popen([exe, "demo", "--out", str(out), "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        url = None
        assert proc.stdout is not None
        for line in proc.stdout:
            m = URL.search(line)
            if m:
                url = m.group(0)
                break
        if url is None:
            raise RuntimeError("vitscope demo exited without printing its URL")
        t_url = time.perf_counter() - t0
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
            page = browser.new_context(viewport={"width": 1920, "height": 1080}).new_page()
            page.goto(url)
            page.wait_for_function("() => window.vitscope && window.vitscope.ready === true", timeout=120_000)
            t_drawn = time.perf_counter() - t0
            browser.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return {"url_s": t_url, "drawn_s": t_drawn}


def reconstruction(out: Path) -> dict:
    import vitscope
    from vitscope.analysis.patterns import AutoencoderResult
    from vitscope.pipeline.steps.patterns import load_state as _load_state

    run = vitscope.open_run(out)
    res = {}
    for kind, meta in run.manifest["patterns"].items():
        maps = np.asarray(run.array(f"pattern_inputs/{meta['input']}")[...], dtype=np.float32)
        maps = maps.reshape(-1, *maps.shape[3:])
        ae = AutoencoderResult.from_state_dict(_load_state(out / "work" / f"autoencoder_{kind}.pt"), maps)
        baseline = float(((maps - maps.mean(0)) ** 2).mean())
        res[kind] = {"mse": float(ae.reconstruction_error.mean()), "relative": float(ae.reconstruction_error.mean()) / baseline}
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    times, quality = [], {}
    for i in range(a.repeats):
        out = Path(tempfile.mkdtemp(prefix="vitscope-demo-")) / "demo"
        try:
            times.append(one_demo(out))
            quality = reconstruction(out)
        finally:
            shutil.rmtree(out.parent, ignore_errors=True)
        print(f"run {i + 1}: URL printed after {times[-1]['url_s']:.1f} s, every view drawn after {times[-1]['drawn_s']:.1f} s", flush=True)
    print(f"vitscope demo until every view drawn: median {statistics.median(t['drawn_s'] for t in times):.1f} s over {len(times)} runs")
    for kind, q in quality.items():
        print(f"  {kind} autoencoder: reconstruction MSE {q['mse']:.4g}, relative to the per-pixel mean {q['relative']:.3f}")
    if a.json:
        a.json.write_text(json.dumps({"runs": times, "autoencoders": quality}, indent=2))


if __name__ == "__main__":
    main()

"""``vitscope demo``: the whole pipeline on the embedded model and sample, no download needed."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from vitscope.cli import app


@app.command()
def demo(
    out: Path = typer.Option(Path("runs/demo"), "--out", "-o", help="run folder to write (resumed if it exists)"),
    limit: int = typer.Option(0, "--limit", "-n", help="analyse only the first N sample images (0 = all 300)"),
    report: bool = typer.Option(False, "--report/--no-report", help="also write the static figures and index.html (the web app shows the same and more)"),
    serve: bool = typer.Option(True, "--serve/--no-serve", help="after the summary, serve the web app over the run (Ctrl-C to stop)"),
    host: str = typer.Option("127.0.0.1", "--host", help="interface the app listens on (127.0.0.1 = this machine only)"),
    port: int = typer.Option(8765, "--port", "-p", min=0, max=65535, help="port of the web app (0 = any free port)"),
    open_browser: bool = typer.Option(False, "--open/--no-open", help="open the web app in a browser"),
) -> None:
    """Analyse the embedded Fashion-MNIST sample with the embedded ViT, print what it found, and
    open the web app on it.

    Runs `vitscope analyze --model fmnist_vit_tiny --images sample --out OUT`, summarises head
    importance, attention strength and patterns, then serves the web app over OUT at
    http://HOST:PORT/ (as `vitscope serve OUT` does) until Ctrl-C. `--no-serve` stops after the
    summary; `--report` also writes the static figures (later: `vitscope report OUT`).
    """
    from vitscope.pipeline import analyze
    from vitscope.models import DEFAULT_MODEL, load_model

    console = Console()
    vit = load_model(DEFAULT_MODEL, device="cpu")
    run = analyze(vit, "sample", out, limit=limit or None, device="cpu", console=console, command=f"vitscope demo --out {out}")
    print_summary(run, console)
    if report:
        from vitscope.report import write_report

        index = write_report(run)
        console.print(f"\nFigures: [bold]{index}[/bold]")
    if serve:
        from vitscope.cli.serve import serve_run

        console.print()
        serve_run(run, console, host=host, port=port, vit=vit, open_browser=open_browser)


def print_summary(run: Any, console: Console) -> None:
    """A readable summary of a finished run: accuracy, important heads, strength by layer, patterns."""
    images, heads, m = run.images, run.heads, run.manifest
    model = m.get("model", {})
    console.rule(f"[bold]vitscope[/bold] · {model.get('spec', '?')}")
    labelled = images[images["label"].notna()]
    acc = float((labelled["prediction"] == labelled["label"]).mean()) if len(labelled) else float("nan")
    failed = m.get("failures", [])
    console.print(
        f"{len(images)} images analysed ({len(failed)} skipped), accuracy {acc:.1%}; "
        f"{heads['layer'].nunique()} layers x {heads['head'].nunique()} heads"
    )

    t = Table(title="Most important heads (pruning one head alone)", title_justify="left")
    for col in ("layer", "head", "prob drop", "95% CI", "acc drop", "taylor", "entropy", "pattern"):
        t.add_column(col, justify="right" if col not in ("pattern",) else "left", no_wrap=True)
    top = heads.sort_values("prob_drop", ascending=False).head(5)
    for _, r in top.iterrows():
        t.add_row(
            str(int(r["layer"])),
            str(int(r["head"])),
            f"{r['prob_drop']:+.3f}",
            _ci(r, "prob_drop"),
            f"{r.get('acc_drop', float('nan')):+.3f}",
            f"{r.get('taylor', float('nan')):.3g}",
            f"{r.get('entropy_mean', float('nan')):.2f}",
            str(r.get("pattern_name", r.get("pattern_cluster", ""))),
        )
    console.print(t)

    g_side = max(len(p) for p in heads["hop_profile_mean"]) if "hop_profile_mean" in heads else 0
    s = Table(title=f"Attention strength by layer (hop-profile entropy; uniform = ln {g_side} = {math.log(max(g_side, 1)):.2f})", title_justify="left")
    for col in ("layer", "entropy min", "entropy mean", "mean distance (px)", "CLS->patch mass"):
        s.add_column(col, justify="right")
    by_layer = heads.groupby("layer")
    for layer, g in by_layer:
        s.add_row(
            str(int(layer)),
            f"{g['entropy_mean'].min():.2f}",
            f"{g['entropy_mean'].mean():.2f}",
            f"{g['mean_distance_mean'].mean():.1f}" if "mean_distance_mean" in g else "-",
            f"{g['cls_to_patch_mean'].mean():.2f}" if "cls_to_patch_mean" in g else "-",
        )
    console.print(s)
    console.print(f"Run folder: [bold]{run.path}[/bold]  (open it in Python with vitscope.open_run)")


def _ci(row: Any, name: str) -> str:
    lo, hi = row.get(f"{name}_lo"), row.get(f"{name}_hi")
    return "-" if lo is None or hi is None else f"{lo:+.3f}..{hi:+.3f}"

"""``vitscope info``: what a model looks like to vitscope."""

from __future__ import annotations

from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from vitscope.cli import app


@app.command()
def info(
    model: str = typer.Option("fmnist_vit_tiny", "--model", "-m", help="timm name, hf:<id or folder>, built-in name, or a vitscope .safetensors file"),
    weights: Optional[str] = typer.Option(None, "--weights", "-w", help="weights file (.safetensors or .pth) for a timm name"),
) -> None:
    """Load MODEL and print its layers, heads, token layout and preprocessing."""
    from vitscope.models import load_model

    vit = load_model(model, weights=weights, device="cpu")
    t = Table(title=vit.name, show_header=False)
    t.add_row("library", vit.library)
    t.add_row("layers x heads", f"{vit.num_layers} x {vit.num_heads}")
    t.add_row("tokens", vit.layout.describe())
    t.add_row("classes", str(vit.num_classes))
    p = vit.preprocessing
    t.add_row("input", "x".join(map(str, p.input_size)))
    t.add_row("preprocessing", f"resize {p.resize}, crop {p.crop}, {p.interpolation}, mean {p.mean}, std {p.std}")
    if vit.weights_sha256:
        t.add_row("weights sha256", vit.weights_sha256)
    Console().print(t)

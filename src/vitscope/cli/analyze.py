"""``vitscope analyze`` (all Paper 1 analyses into a run folder) and ``vitscope report`` (its figures)."""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from vitscope.analysis.settings import AnalyzeSettings
from vitscope.cli import app

#: The defaults of every setting come from the settings class itself (one place).
DEFAULTS = AnalyzeSettings()


def _fail(console: Console, message: str) -> None:
    console.print(f"[red]error:[/red] {message}")
    raise typer.Exit(code=2)


def _explain_methods(text: Optional[str]) -> tuple[str, ...]:
    from vitscope.analysis.settings import EXPLAIN_METHODS

    if not text:
        return ()
    if text.strip() == "all":
        return tuple(m for m in EXPLAIN_METHODS if m != "random") + ("random",)
    return tuple(m.strip() for m in text.split(",") if m.strip())


@app.command()
def analyze(
    model: str = typer.Option(..., "--model", "-m", help="timm name, hf:<id or folder>, built-in name (fmnist_vit_tiny), or a vitscope .safetensors file"),
    images: str = typer.Option(..., "--images", "-i", help="image folder (class sub-folders or labels.csv are picked up), WebDataset shards ('shards/*.tar'), a Hugging Face dataset saved on disk (folder, .arrow or .parquet), or 'sample' for the embedded sample"),
    out: Path = typer.Option(..., "--out", "-o", help="run folder to write (or resume)"),
    weights: Optional[str] = typer.Option(None, "--weights", "-w", help="weights file (.safetensors or .pth) for a timm name"),
    labels: Optional[Path] = typer.Option(None, "--labels", "-l", help="CSV with a 'path' column and a 'label' or 'class_index' column"),
    limit: Optional[int] = typer.Option(None, "--limit", "-n", min=1, help="analyse only the first N images (sorted by path)"),
    batch_size: int = typer.Option(DEFAULTS.batch_size, "--batch-size", "-b", min=1, help="images per chunk; a killed run resumes at the next unfinished chunk"),
    seed: int = typer.Option(DEFAULTS.seed, "--seed", min=0, help="seed for bootstrap, curve subset, autoencoders, projection and clustering"),
    n_boot: int = typer.Option(DEFAULTS.n_boot, "--boot", min=0, help="bootstrap resamples for the 95% intervals"),
    latent_dim: int = typer.Option(DEFAULTS.latent_dim, "--latent-dim", min=1, help="latent size of the pattern autoencoders"),
    ae_epochs: int = typer.Option(DEFAULTS.ae_epochs, "--ae-epochs", min=1, help="training epochs of each pattern autoencoder"),
    ae_min_steps: int = typer.Option(DEFAULTS.ae_min_steps, "--ae-min-steps", min=0, help="at least this many autoencoder training steps (small image sets get more epochs)"),
    n_clusters: int = typer.Option(DEFAULTS.n_clusters, "--clusters", min=1, help="pattern clusters per catalogue (patch-to-patch, CLS)"),
    projection: str = typer.Option(DEFAULTS.projection, "--projection", help="2-D projection of the pattern codes: umap, tsne or pca"),
    curve_images: int = typer.Option(DEFAULTS.curve_images, "--curve-images", min=0, help="images (seeded subset, at most half) the cumulative pruning curves are measured on; heads are ranked on the others; 0 = half"),
    interactions: bool = typer.Option(
        DEFAULTS.interactions,
        "--interactions/--no-interactions",
        help="also compute paper 2's patch interactions, responsive fields, window design and patch removal "
        "(about 3 extra forward-equivalents per image, plus curves)",
    ),
    explain_methods: Optional[str] = typer.Option(
        None,
        "--explain",
        help="also store every image's explanation maps: a comma-separated list of attention, rollout, grad_rollout, "
        "relevance, interaction, random (see docs/explanations.md); 'all' for every one",
    ),
    explain_faithfulness: bool = typer.Option(
        DEFAULTS.explain_faithfulness,
        "--explain-faithfulness/--no-explain-faithfulness",
        help="also score each stored map's faithfulness (perturbation by tokens and pixels, insertion/deletion AUCs) "
        "into the explain_faithfulness table; needs --explain; about 45 forwards per image and method",
    ),
    objective: str = typer.Option(
        DEFAULTS.objective,
        "--objective",
        help="what a pruned head is measured by: 'label' (the classifier's probability, loss and accuracy), "
        "'embedding' (1 - cos of the pooled image embedding; for every model, backbones without a classifier included), "
        "'zero-shot' (a whole CLIP / SigLIP's own zero-shot classifier over the images' class names) or "
        "'probe' (a linear probe cross-fitted on the images' unpruned embeddings; labelled images, 2+ per class)",
    ),
    zero_shot_prompt: str = typer.Option(DEFAULTS.zero_shot_prompt, "--zero-shot-prompt",
                                         help="the zero-shot objective's prompt; {} is the class name"),
    probe_folds: int = typer.Option(DEFAULTS.probe_folds, "--probe-folds", min=2,
                                    help="folds of the probe objective's cross-fitting (each image scored by a probe "
                                    "fitted on the other folds)"),
    stream_dtype: str = typer.Option(
        DEFAULTS.stream_dtype,
        "--dtype",
        help="precision of the attention stream (strength, patterns, mean attention): float32, bfloat16 or float16 "
        "(autocast; see docs/precision.md); pruning, Taylor, curves, interactions and explanations stay float32",
    ),
    max_memory: Optional[str] = typer.Option(
        None, "--max-memory",
        help="memory budget, e.g. 16G: batches are made smaller than --batch-size where the estimated peak would not fit "
        "(the run records the size used); a model whose single image does not fit is refused with what to change",
    ),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)"),
    workers: int = typer.Option(0, "--workers", min=0, help="image-decoding worker processes"),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="CPU threads for torch (default: torch's choice)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace whatever run --out holds instead of resuming it"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bars"),
) -> None:
    """Compute head importance, attention strength and attention patterns over an image set.

    Writes the run folder OUT (manifest.json, Parquet tables, arrays.zarr); read it with
    vitscope.open_run(OUT) or draw it with `vitscope report OUT`. Run the same command again
    after an interruption to resume; finished work is not redone. Under torchrun
    (`torchrun --nproc-per-node N -m vitscope analyze ...`) the processes share the chunks and
    the result is the same run as with one process.
    """
    from vitscope.pipeline import analyze as run_analyze
    from vitscope.store import RunError

    console = Console(stderr=True)
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    try:
        settings = AnalyzeSettings(
            batch_size=batch_size,
            seed=seed,
            n_boot=n_boot,
            latent_dim=latent_dim,
            ae_epochs=ae_epochs,
            ae_min_steps=ae_min_steps,
            n_clusters=n_clusters,
            projection=projection,
            curve_images=curve_images,
            interactions=interactions,
            explain=_explain_methods(explain_methods),
            explain_faithfulness=explain_faithfulness,
            objective=objective,
            stream_dtype=stream_dtype,
            zero_shot_prompt=zero_shot_prompt,
            probe_folds=probe_folds,
        )
        settings.validate()
    except ValueError as e:
        _fail(console, str(e))
    command = shlex.join(["vitscope", *sys.argv[1:]]) if sys.argv and Path(sys.argv[0]).name.startswith("vitscope") else None
    try:
        run = run_analyze(
            model,
            images,
            out,
            weights=weights,
            labels=labels,
            limit=limit,
            settings=settings,
            overwrite=overwrite,
            device=device,
            num_workers=workers,
            progress=not quiet,
            console=console,
            command=command,
            max_memory=max_memory,
        )
    except (RunError, FileNotFoundError) as e:
        _fail(console, str(e))
    except ValueError as e:
        # Model, data and label errors are ValueErrors whose message names the item and the fix.
        _fail(console, str(e))
    if os.environ.get("RANK", "0") != "0":
        return  # under torchrun the first process speaks for the job
    counts = run.manifest["counts"]
    console.print(
        f"wrote {run.path}: {counts['analysed']} images analysed, {counts['failed']} skipped. "
        f"Next: `vitscope report {run.path}` or vitscope.open_run({str(run.path)!r})"
    )


@app.command()
def report(
    run: Path = typer.Argument(..., help="run folder written by `vitscope analyze`"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="output folder (default: RUN/report)"),
    svg: bool = typer.Option(False, "--svg/--no-svg", help="also write every figure as SVG (vector, for papers; doubles the drawing time)"),
) -> None:
    """Draw a figure per analysis (PNG, and SVG on request) and an index.html that shows them all."""
    from vitscope.report import write_report
    from vitscope.store import RunError, open_run

    console = Console(stderr=True)
    try:
        r = open_run(run)
    except RunError as e:
        _fail(console, str(e))
    index = write_report(r, out, svg=svg)
    console.print(f"wrote {index} (open it in a browser; it needs no internet)")

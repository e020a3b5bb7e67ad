"""``vitscope train``: train an image classifier (seeded, resumable, data-parallel under torchrun)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import typer

from vitscope.cli import app


def parse_model_args(pairs: list[str]) -> dict[str, Any]:
    """``["depth=4", "drop_rate=0.1", "act_layer=gelu"]`` -> kwargs; values are JSON, else plain strings."""
    kwargs: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise typer.BadParameter(f"{pair!r} is not KEY=VALUE (e.g. depth=4, mlp_ratio=2.0, qkv_bias=false)", param_hint="--model-arg")
        try:
            kwargs[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            kwargs[key.strip()] = raw
    return kwargs


def model_kwargs(model_arg: list[str]) -> dict[str, Any]:
    """All keyword arguments for the model factory given on the command line.

    Options that configure the architecture (for example a future attention-mask option) add
    their entries here, so they reach the factory and are stored in the weights metadata.
    """
    return parse_model_args(model_arg)


@app.command()
def train(
    arch: str = typer.Option("fmnist_vit_tiny", "--arch", "-m", help="timm-registered architecture name, e.g. fmnist_vit_tiny or vit_tiny_patch16_224"),
    dataset: str = typer.Option("fashion-mnist", "--dataset", "-d",
                                help="'fashion-mnist', or a folder with one sub-folder of images per class "
                                     "(optionally split into train/ and val/ or test/)"),  # fmt: skip
    out: Path = typer.Option(..., "--out", "-o", help="output folder: checkpoint.pt, metrics.json and <arch>.safetensors"),
    epochs: int = typer.Option(10, "--epochs", "-e", help="number of epochs (sets the length of the cosine schedule)"),
    seed: int = typer.Option(0, "--seed", "-s", help="seed for initialisation, shuffling and augmentation"),
    batch_size: int = typer.Option(128, "--batch-size", "-b", help="global batch size (split over torchrun processes)"),
    lr: float = typer.Option(1e-3, "--lr", help="peak AdamW learning rate"),
    weight_decay: float = typer.Option(0.05, "--weight-decay", help="AdamW weight decay (not applied to biases, norms, tokens, position embeddings)"),
    warmup_epochs: float = typer.Option(1.0, "--warmup-epochs", help="linear warmup length in epochs, then cosine decay"),
    min_lr_ratio: float = typer.Option(0.01, "--min-lr-ratio", help="final learning rate as a fraction of --lr"),
    label_smoothing: float = typer.Option(0.1, "--label-smoothing", help="cross-entropy label smoothing"),
    augment: bool = typer.Option(True, "--augment/--no-augment", help="random crop after zero padding, plus horizontal flip"),
    crop_padding: int = typer.Option(2, "--crop-padding", help="pixels of zero padding before the random crop"),
    hflip: bool = typer.Option(True, "--hflip/--no-hflip", help="random horizontal flips (with --augment)"),
    grad_clip: float = typer.Option(1.0, "--grad-clip", help="clip the gradient norm to this value (0 = off)"),
    holdout: float = typer.Option(0.1, "--holdout", help="for a folder without val/ or test/: share of images held out for testing"),
    num_workers: int = typer.Option(0, "--num-workers", help="data loader worker processes"),
    amp: bool = typer.Option(False, "--amp/--no-amp", help="bfloat16 autocast on CUDA"),
    init: str = typer.Option("default", "--init", help="'default' (the architecture's own) or 'mimetic' (attention starts positional; Trockman & Kolter 2023)"),
    mimetic_alpha: float = typer.Option(0.7, "--mimetic-alpha", help="with --init mimetic: weight of the random part of each head's W_q^T W_k"),
    mimetic_beta: float = typer.Option(0.7, "--mimetic-beta", help="with --init mimetic: weight of its identity part (larger: heads start more positional)"),
    pos_scale: float = typer.Option(1.0, "--pos-scale", help="with --init mimetic: scale of the sine-cosine position codes"),
    freeze_pos_embed: bool = typer.Option(False, "--freeze-pos-embed/--train-pos-embed", help="keep the position embeddings at their initial values (fixed codes)"),
    model_arg: list[str] = typer.Option([], "--model-arg", "-a", help="KEY=VALUE keyword argument for the model factory (JSON value), repeatable"),
    data_root: Optional[Path] = typer.Option(None, "--data-root", help="folder with the Fashion-MNIST IDX files (default: /usr/share/datasets/fashion-mnist)"),
    device: Optional[str] = typer.Option(None, "--device", help="cpu or cuda (default: cuda when available)"),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads for torch (fewer than cores is faster on a busy machine)"),
    resume: bool = typer.Option(True, "--resume/--no-resume", help="continue from OUT/checkpoint.pt when it exists; --no-resume starts over"),
    stop_after: Optional[int] = typer.Option(None, "--stop-after", help="stop after this many epochs in total without finishing the schedule; run again to continue"),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="show progress bars and per-epoch lines"),
) -> None:
    """Train ARCH on a data set with AdamW, warmup and cosine decay; checkpoint every epoch.

    Running the same command again resumes from OUT/checkpoint.pt and ends with the same weights as an uninterrupted run.

    Data-parallel: torchrun --nproc_per_node N $(which vitscope) train ...

    The final OUT/<arch>.safetensors loads with vitscope.load_model(path).
    """
    import torch

    from vitscope.training import Recipe, TrainError
    from vitscope.training import train as run_training

    if threads is not None:
        torch.set_num_threads(threads)
    recipe = Recipe(
        epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay, warmup_epochs=warmup_epochs,
        min_lr_ratio=min_lr_ratio, label_smoothing=label_smoothing, augment=augment, crop_padding=crop_padding,
        hflip=hflip, grad_clip=grad_clip if grad_clip > 0 else None, seed=seed, num_workers=num_workers,
        holdout_fraction=holdout, amp=amp, init=init, mimetic_alpha=mimetic_alpha, mimetic_beta=mimetic_beta,
        pos_scale=pos_scale, freeze_pos_embed=freeze_pos_embed,
    )  # fmt: skip
    try:
        run_training(arch, dataset, out, recipe, model_args=model_kwargs(model_arg), data_root=data_root,
                     device=device, resume=resume, stop_after=stop_after, progress=progress)  # fmt: skip
    except TrainError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from e

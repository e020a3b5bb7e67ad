"""Seeded, resumable training of image classifiers, in one process or data-parallel under ``torchrun``.

vitscope trains its own small models (the built-in Fashion-MNIST ViT, and later models whose attention
is restricted by a mask) with this loop, so that a result in a paper can be re-run bit for bit:

- everything random is derived from ``Recipe.seed``: model initialisation, the shuffling order
  (``DistributedSampler`` seeded per epoch), the augmentation (drawn per epoch for every *dataset index*,
  so it does not depend on the batch size split or the number of processes) and the global torch RNG
  (re-seeded from ``(seed, epoch, rank)`` at the start of every epoch, e.g. for dropout);
- a checkpoint (model, optimizer, scheduler, RNG states, epoch, metrics) is written to the output folder
  after every epoch, and running the same command again resumes from it and ends with the same weights
  as an uninterrupted run;
- under ``torchrun`` (environment ``RANK``/``WORLD_SIZE``) it trains with DistributedDataParallel
  (gloo on CPU, nccl on GPU); ``Recipe.batch_size`` is the *global* batch, split over the processes,
  so a 2-process run sees the same batches as a 1-process run; only rank 0 writes files and prints.

The result is ``<arch>.safetensors`` with metadata that lets :func:`vitscope.load_model` rebuild the
model from the file alone, plus ``metrics.json`` (per-epoch train loss, test accuracy, wall time).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from vitscope.core.progress import Progress, progress_for
from vitscope.training.augment import EpochAugmentation, derive_seed, normalize
from vitscope.training.checkpoints import (
    TrainResult,
    atomic_json,
    atomic_save,
    check_resumable,
    DistContext,
    dist_context,
    rng_states,
    set_rng_states,
    save_weights,
)
from vitscope.training.datasets import (
    DatasetSplits,
    IndexedDataset,
    count_classes,
    data_config_for,
    load_dataset,
)
from vitscope.training.evaluation import evaluate
from vitscope.training.init import freeze_position_embeddings, mimetic_init
from vitscope.training.recipe import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_NAME,
    METRICS_NAME,
    ModelSpec,
    Recipe,
    TrainError,
)
from vitscope.training.schedule import warmup_cosine


def train(
    model: Union[ModelSpec, str],
    dataset: Union[str, Path, DatasetSplits],
    out: Union[str, Path],
    recipe: Optional[Recipe] = None,
    *,
    model_args: Optional[dict[str, Any]] = None,
    data_root: Union[str, Path, None] = None,
    device: Union[str, torch.device, None] = None,
    resume: bool = True,
    stop_after: Optional[int] = None,
    progress: Union[bool, Progress] = True,
) -> TrainResult:
    """Train an image classifier and write checkpoints, ``metrics.json`` and ``<arch>.safetensors`` to ``out``.

    ``model`` is a timm-registered architecture name (``model_args`` go to its factory) or a
    :class:`ModelSpec`. ``num_classes`` is set from the data set unless given. ``dataset`` is
    ``"fashion-mnist"`` (IDX files from ``data_root`` or the system package), an image folder with
    one sub-folder per class, or :class:`DatasetSplits`. With ``resume`` (the default) an existing
    checkpoint in ``out`` is continued; it must come from the same model, data set and recipe.
    ``stop_after`` ends the run after that many epochs in total without finishing the schedule, as
    a time-limited job would; running again continues it. Runs data-parallel when started by
    ``torchrun``. ``device`` defaults to CUDA when available. ``progress``: ``True`` shows a bar
    per epoch and a line per finished epoch (on the first process only), ``False`` nothing, or a
    :class:`vitscope.core.progress.Progress` to report to.
    """
    recipe = recipe or Recipe()
    recipe.validate()
    spec = model if isinstance(model, ModelSpec) else ModelSpec(model, dict(model_args or {}))
    if isinstance(model, ModelSpec) and model_args:
        spec = ModelSpec(spec.arch, {**spec.kwargs, **model_args}, spec.factory)
    if stop_after is not None and stop_after < 1:
        raise TrainError(f"stop_after={stop_after} must be at least 1")
    out = Path(out)
    ctx = dist_context(device)
    try:
        with progress_for(progress if ctx.main else False) as prog:
            return _train(spec, dataset, out, recipe, ctx, data_root, resume, stop_after, prog)
    finally:
        if ctx.owns_group:
            dist.destroy_process_group()


def _train(spec: ModelSpec, dataset: Union[str, Path, DatasetSplits], out: Path, recipe: Recipe, ctx: DistContext,
           data_root: Union[str, Path, None], resume: bool, stop_after: Optional[int], prog: Progress) -> TrainResult:  # fmt: skip
    t_start = time.perf_counter()

    # Class count first: the model's head size depends on it.
    classes = dataset.classes if isinstance(dataset, DatasetSplits) else count_classes(str(dataset), data_root)
    if "num_classes" in spec.kwargs and spec.kwargs["num_classes"] != len(classes):
        raise TrainError(f"num_classes={spec.kwargs['num_classes']} but the data set has {len(classes)} classes ({classes[:5]}...)")
    spec = ModelSpec(spec.arch, {**spec.kwargs, "num_classes": len(classes)}, spec.factory)
    spec.check_serialisable()
    torch.manual_seed(recipe.seed)
    net = spec.build()
    if recipe.init == "mimetic":
        mimetic_init(net, alpha=recipe.mimetic_alpha, beta=recipe.mimetic_beta, pos_scale=recipe.pos_scale)
    if recipe.freeze_pos_embed:
        freeze_position_embeddings(net)
    net = net.to(ctx.device)
    cfg = data_config_for(net)
    net.pretrained_cfg = dict(cfg)
    net.default_cfg = net.pretrained_cfg
    splits = dataset if isinstance(dataset, DatasetSplits) else load_dataset(
        dataset, cfg, holdout_fraction=recipe.holdout_fraction, seed=recipe.seed, data_root=data_root)  # fmt: skip
    dataset_name = splits.name

    if recipe.batch_size % ctx.world:
        raise TrainError(f"batch_size {recipe.batch_size} is the global batch and must divide evenly over {ctx.world} processes")
    per_rank = recipe.batch_size // ctx.world
    indexed = IndexedDataset(splits.train)
    # A DistributedSampler also for one process: the same seeded order per epoch either way.
    sampler = DistributedSampler(indexed, num_replicas=ctx.world, rank=ctx.rank, shuffle=True, seed=recipe.seed)
    loader = DataLoader(indexed, batch_size=per_rank, sampler=sampler, num_workers=recipe.num_workers,
                        persistent_workers=recipe.num_workers > 0)  # fmt: skip
    steps_per_epoch = len(loader)
    total_steps = steps_per_epoch * recipe.epochs
    warmup_steps = int(round(recipe.warmup_epochs * steps_per_epoch))

    decay, no_decay = [], []
    for name, p in net.named_parameters():
        if p.requires_grad:
            # Biases, norms, tokens and position embeddings are not weight-decayed (as in DeiT/timm).
            (no_decay if p.ndim <= 1 or name.endswith(("cls_token", "pos_embed", "reg_token", "dist_token")) else decay).append(p)
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": recipe.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=recipe.lr)  # fmt: skip
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_cosine(s, warmup_steps, total_steps, recipe.min_lr_ratio))

    out_ckpt, out_metrics = out / CHECKPOINT_NAME, out / METRICS_NAME
    weights_path = out / f"{spec.arch}.safetensors"
    epochs_done, history, wall_before = 0, [], 0.0
    if resume and out_ckpt.exists():
        ckpt = torch.load(out_ckpt, map_location="cpu", weights_only=True)
        check_resumable(ckpt, out_ckpt, spec, recipe, dataset_name)
        net.load_state_dict(ckpt["state_dict"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        set_rng_states(ckpt["rng"])
        epochs_done, history, wall_before = ckpt["epoch"], ckpt["metrics"], ckpt["wall_time_s"]
        prog.log(f"[bold]resuming[/] {out_ckpt} after epoch {epochs_done}/{recipe.epochs}")
    elif ctx.main:
        out.mkdir(parents=True, exist_ok=True)
        for stale in (out_ckpt, out_metrics, weights_path):
            stale.unlink(missing_ok=True)
    ctx.barrier()

    ddp: nn.Module = net
    if ctx.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        ddp = DistributedDataParallel(net, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    criterion = nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)
    use_amp = recipe.amp and ctx.device.type == "cuda"
    eval_idx = list(range(ctx.rank, len(splits.test), ctx.world)) if splits.test is not None else None
    n_params = sum(p.numel() for p in net.parameters())
    prog.log(
        f"[bold]train[/] {spec.arch} ({n_params:,} parameters, input {'x'.join(map(str, cfg['input_size']))}) on "
        f"{dataset_name}: {len(splits.train)} train / {len(splits.test) if splits.test is not None else 0} test images, "
        f"{len(classes)} classes, {ctx.world} process(es) on {ctx.device}, {steps_per_epoch} steps/epoch"
    )

    last = recipe.epochs if stop_after is None else min(recipe.epochs, stop_after)
    for epoch in range(epochs_done, last):
        t0 = time.perf_counter()
        sampler.set_epoch(epoch)
        torch.manual_seed(derive_seed(recipe.seed, epoch, ctx.rank))
        aug = EpochAugmentation.draw(len(splits.train), recipe.crop_padding, recipe.hflip, derive_seed(recipe.seed, epoch, 1 << 20)) \
            if recipe.augment else None  # fmt: skip
        ddp.train()
        loss_sum = torch.zeros((), dtype=torch.float64, device=ctx.device)
        seen = 0
        epoch_name = f"epoch {epoch + 1}/{recipe.epochs}"
        task = prog.add_task(epoch_name, total=steps_per_epoch)
        for step, (x, y, idx) in enumerate(loader):
            x, y = x.to(ctx.device, non_blocking=True), y.to(ctx.device, non_blocking=True)
            if aug is not None:
                x = aug.apply(x, idx)
            x = normalize(x, cfg["mean"], cfg["std"])
            with torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=use_amp):
                loss = criterion(ddp(x).float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if recipe.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(net.parameters(), recipe.grad_clip)
            optimizer.step()
            scheduler.step()
            loss_sum += loss.detach().double() * len(y)
            seen += len(y)
            if step % 10 == 0 or step == steps_per_epoch - 1:
                prog.update(task, completed=step + 1, description=f"{epoch_name} loss {float(loss_sum) / seen:.4f}")
        train_loss_sum, train_seen = ctx.all_sum([float(loss_sum), float(seen)])
        row: dict[str, Any] = {"epoch": epoch + 1, "train_loss": train_loss_sum / train_seen, "lr": scheduler.get_last_lr()[0]}
        if splits.test is not None:
            ev = evaluate(net, splits.test, cfg, batch_size=recipe.eval_batch_size, device=ctx.device, indices=eval_idx,
                          num_workers=recipe.num_workers)  # fmt: skip
            correct, lsum, count = ctx.all_sum([ev["correct"], ev["loss_sum"], ev["count"]])
            row.update(test_accuracy=correct / count, test_loss=lsum / count, test_count=int(count))
        else:
            row.update(test_accuracy=None, test_loss=None, test_count=0)
        row["epoch_time_s"] = time.perf_counter() - t0
        row["wall_time_s"] = wall_before + (time.perf_counter() - t_start)
        history.append(row)
        acc = f"{row['test_accuracy']:.4f}" if row["test_accuracy"] is not None else "n/a"
        prog.log(f"epoch {epoch + 1}/{recipe.epochs}: train loss {row['train_loss']:.4f}, test accuracy {acc}, "
                      f"{row['epoch_time_s']:.1f} s")  # fmt: skip
        if ctx.main:
            atomic_save({
                "format": CHECKPOINT_FORMAT, "epoch": epoch + 1, "state_dict": net.state_dict(),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_states(),
                "metrics": history, "recipe": recipe.to_dict(), "model": spec.to_json(), "dataset": dataset_name,
                "world_size": ctx.world, "wall_time_s": row["wall_time_s"],
            }, out_ckpt)  # fmt: skip
            atomic_json(_metrics(spec, recipe, dataset_name, classes, cfg, ctx.world, history, complete=False), out_metrics)
        ctx.barrier()

    complete = len(history) >= recipe.epochs
    net.eval()
    metrics = _metrics(spec, recipe, dataset_name, classes, cfg, ctx.world, history, complete=complete)
    if complete and ctx.main:
        save_weights(net, weights_path, spec, cfg, classes)
        atomic_json(metrics, out_metrics)
        prog.log(f"[bold green]done[/]: {weights_path} (test accuracy "
                      f"{history[-1]['test_accuracy'] if history[-1]['test_accuracy'] is not None else 'n/a'})")  # fmt: skip
    ctx.barrier()
    return TrainResult(out, weights_path if complete else None, metrics, net, complete)


def _metrics(spec: ModelSpec, recipe: Recipe, dataset: str, classes: Sequence[str], cfg: dict[str, Any], world: int,
             history: list[dict[str, Any]], complete: bool) -> dict[str, Any]:  # fmt: skip
    return {
        "model": spec.to_json(),
        "dataset": dataset,
        "classes": list(classes),
        "data_config": cfg,
        "recipe": recipe.to_dict(),
        "world_size": world,
        "torch": torch.__version__,
        "complete": complete,
        "epochs": history,
        "final_test_accuracy": history[-1]["test_accuracy"] if history and complete else None,
        "wall_time_s": history[-1]["wall_time_s"] if history else 0.0,
    }

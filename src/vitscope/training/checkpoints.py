"""The distributed context, resumable checkpoints (model, optimiser, RNG states) and the weights file a run writes."""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from vitscope.core.atomic import atomic_path
from vitscope.training.recipe import (
    CHECKPOINT_FORMAT,
    SPEED_ONLY_FIELDS,
    ModelSpec,
    Recipe,
    TrainError,
)


@dataclass
class DistContext:
    rank: int
    world: int
    device: torch.device
    owns_group: bool

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_sum(self, values: list[float]) -> list[float]:
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def dist_context(device: Union[str, torch.device, None]) -> DistContext:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 and not dist.is_initialized():
        dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return DistContext(0, 1, dev, False)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    want_cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    dev = torch.device("cuda", local) if want_cuda else torch.device("cpu")
    owns = False
    if not dist.is_initialized():
        if want_cuda:
            torch.cuda.set_device(dev)
        dist.init_process_group(backend="nccl" if want_cuda else "gloo")
        owns = True
    return DistContext(dist.get_rank(), dist.get_world_size(), dev, owns)


def rng_states() -> dict[str, Any]:
    np_state = np.random.get_state()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(tuple(v if not isinstance(v, list) else tuple(v) for v in states["python"]))
    kind, keys, *rest = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in states and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])


def atomic_save(obj: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def atomic_json(obj: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")


def save_weights(model: nn.Module, path: Union[str, Path], spec: ModelSpec, cfg: dict[str, Any], classes: Sequence[str],
                 extra: Optional[dict[str, str]] = None) -> Path:  # fmt: skip
    """Write ``model``'s weights as safetensors with the metadata :func:`vitscope.load_model` needs
    (the file format is :mod:`vitscope.models.weights`'s)."""
    from vitscope.models.weights import WeightsMetadata, write_weights

    spec.check_serialisable()
    meta = WeightsMetadata(arch=spec.arch, model_args=dict(spec.kwargs), pretrained_cfg=cfg,
                           class_names=[str(c) for c in classes], extra=dict(extra or {}))  # fmt: skip
    return write_weights(model, path, meta)


@dataclass
class TrainResult:
    """What :func:`train` produced. ``weights_path`` is None while the run is incomplete (``stop_after``)."""

    out_dir: Path
    weights_path: Optional[Path]
    metrics: dict[str, Any]
    model: nn.Module
    complete: bool

    @property
    def final_test_accuracy(self) -> Optional[float]:
        epochs = self.metrics["epochs"]
        return epochs[-1]["test_accuracy"] if epochs else None


def check_resumable(ckpt: dict[str, Any], path: Path, spec: ModelSpec, recipe: Recipe, dataset: str) -> None:
    if ckpt.get("format") != CHECKPOINT_FORMAT:
        raise TrainError(f"{path} was written by an incompatible version (format {ckpt.get('format')}); use a new --out folder")
    diffs = []
    if ckpt["model"]["arch"] != spec.arch or ckpt["model"]["kwargs"] != spec.kwargs:
        diffs.append(f"model {ckpt['model']['arch']} {ckpt['model']['kwargs']} vs {spec.arch} {spec.kwargs}")
    if ckpt["dataset"] != dataset:
        diffs.append(f"dataset {ckpt['dataset']!r} vs {dataset!r}")
    old = ckpt["recipe"]
    for f in fields(Recipe):
        before = old.get(f.name, f.default)  # a field added later has its default in older checkpoints
        if f.name not in SPEED_ONLY_FIELDS and before != getattr(recipe, f.name):
            diffs.append(f"{f.name} {before!r} vs {getattr(recipe, f.name)!r}")
    if diffs:
        raise TrainError(
            f"{path} holds a run with different settings ({'; '.join(diffs)}); resuming would not reproduce either run. "
            "Use a new output folder, or start over in this one with resume=False (--no-resume)."
        )

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

import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field, fields
from functools import partial
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from vitscope.core.atomic import atomic_path

#: Names accepted for the Fashion-MNIST data set.
FASHION_MNIST_NAMES = ("fashion-mnist", "fashion_mnist", "fashionmnist", "fmnist")
CHECKPOINT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.json"
CHECKPOINT_FORMAT = 1
#: Initialisations a recipe can ask for (:attr:`Recipe.init`).
INITS = ("default", "mimetic")
#: Sub-folder names recognised as the evaluation split of an image folder data set.
EVAL_FOLDER_NAMES = ("val", "validation", "test")
#: Recipe fields that change speed only; a resumed run may use other values for them.
SPEED_ONLY_FIELDS = frozenset({"num_workers", "eval_batch_size"})


class TrainError(ValueError):
    """A training run cannot start or resume (the message says what to change)."""


# --------------------------------------------------------------------------------------------------
# Recipe and model specification
# --------------------------------------------------------------------------------------------------


@dataclass
class Recipe:
    """How to train: AdamW with linear warmup then cosine decay (per step), cross-entropy with label smoothing.

    ``batch_size`` is the global batch (all processes together). ``augment`` turns on a random crop
    after zero-padding by ``crop_padding`` pixels and, if ``hflip``, a horizontal flip with probability
    0.5 (the standard Fashion-MNIST / CIFAR recipe). ``min_lr_ratio`` is the final learning rate as a
    fraction of ``lr``. ``holdout_fraction`` is used only for an image folder without a val/test
    sub-folder: that share of its images (seeded) becomes the test split. ``amp`` runs forward and
    backward in bfloat16 autocast on CUDA (ignored on CPU, where it is slower). ``init`` is
    ``"default"`` (the architecture's own initialisation) or ``"mimetic"`` (:func:`mimetic_init`:
    attention starts out attending by position, which small data sets do not teach on their own).
    """

    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    min_lr_ratio: float = 0.01
    label_smoothing: float = 0.1
    augment: bool = True
    crop_padding: int = 2
    hflip: bool = True
    grad_clip: Optional[float] = 1.0
    seed: int = 0
    num_workers: int = 0
    eval_batch_size: int = 500
    holdout_fraction: float = 0.1
    amp: bool = False
    init: str = "default"

    def validate(self) -> None:
        """Raise :class:`TrainError` naming the first field with an impossible value."""
        checks = [
            ("epochs", self.epochs >= 1, "at least 1"),
            ("batch_size", self.batch_size >= 1, "at least 1"),
            ("lr", self.lr > 0, "positive"),
            ("weight_decay", self.weight_decay >= 0, "zero or positive"),
            ("warmup_epochs", 0 <= self.warmup_epochs <= self.epochs, f"between 0 and epochs ({self.epochs})"),
            ("min_lr_ratio", 0 <= self.min_lr_ratio <= 1, "between 0 and 1"),
            ("label_smoothing", 0 <= self.label_smoothing < 1, "in [0, 1)"),
            ("crop_padding", self.crop_padding >= 0, "zero or positive"),
            ("grad_clip", self.grad_clip is None or self.grad_clip > 0, "positive or None"),
            ("num_workers", self.num_workers >= 0, "zero or positive"),
            ("eval_batch_size", self.eval_batch_size >= 1, "at least 1"),
            ("holdout_fraction", 0 <= self.holdout_fraction < 1, "in [0, 1)"),
            ("init", self.init in INITS, f"one of {', '.join(INITS)}"),
        ]
        for name, ok, need in checks:
            if not ok:
                raise TrainError(f"recipe field {name}={getattr(self, name)!r} must be {need}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ModelSpec:
    """What to train: a timm-registered architecture name plus keyword arguments for its factory.

    The model is built with ``factory(**kwargs)`` when a factory is given, else with
    ``timm.create_model(arch, pretrained=False, **kwargs)`` (vitscope's built-ins use their own
    factory). ``kwargs`` must be JSON-serialisable because they are stored in the weights file, from
    which :func:`vitscope.load_model` calls ``timm.create_model(arch, **kwargs)``; architectures with
    extra inputs, e.g. an attention mask, take them as plain values (a file path, a list) or keep
    them as registered buffers so they travel in the state dict.
    """

    arch: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    factory: Optional[Callable[..., nn.Module]] = None

    def check_serialisable(self) -> None:
        for key, value in self.kwargs.items():
            try:
                json.dumps(value)
            except TypeError as e:
                raise TrainError(
                    f"model argument {key!r} of {self.arch} ({type(value).__name__}) cannot be stored in the weights "
                    "metadata as JSON; pass a file path or plain list instead and load it inside the model factory"
                ) from e

    def build(self) -> nn.Module:
        """A freshly initialised model (uses the current torch RNG state)."""
        if self.factory is not None:
            return self.factory(**self.kwargs)
        from vitscope.models.builtin import BUILTIN_MODELS

        if self.arch in BUILTIN_MODELS:
            return BUILTIN_MODELS[self.arch].factory(**self.kwargs)
        import timm

        from vitscope.models import registry  # noqa: F401 - registers vitscope's architectures with timm

        if not timm.is_model(self.arch):
            close = timm.list_models(f"*{self.arch}*")[:8]
            hint = f" Did you mean one of: {', '.join(close)}?" if close else ""
            raise TrainError(f"unknown architecture {self.arch!r}: not a timm-registered model name.{hint}")
        return timm.create_model(self.arch, pretrained=False, **self.kwargs)

    def to_json(self) -> dict[str, Any]:
        return {"arch": self.arch, "kwargs": self.kwargs}


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------


@dataclass
class DatasetSplits:
    """A classification data set whose items are ``(uint8 image (C, H, W) at the model's input size, label)``."""

    name: str
    train: Dataset
    test: Optional[Dataset]
    classes: list[str]


def data_config_for(model: nn.Module) -> dict[str, Any]:
    """The model's input geometry and normalisation as a timm ``pretrained_cfg`` (JSON-ready).

    The input size is read from the model's patch embedding where it has one, because timm keeps the
    registry's ``input_size`` when ``img_size``/``in_chans`` are overridden. A mean/std with the wrong
    number of channels is averaged (to 1 channel) or repeated (from 1 channel).
    """
    from timm.data import resolve_data_config

    cfg = resolve_data_config({}, model=model)
    c, h, w = cfg["input_size"]
    pe = getattr(model, "patch_embed", None)
    if pe is not None and getattr(pe, "img_size", None) is not None:
        h, w = (pe.img_size, pe.img_size) if isinstance(pe.img_size, int) else tuple(pe.img_size)
        proj = getattr(pe, "proj", None)
        c = getattr(proj, "in_channels", c)
    mean, std = list(cfg["mean"]), list(cfg["std"])
    for name, values in (("mean", mean), ("std", std)):
        if len(values) != c:
            if c == 1:
                values[:] = [sum(values) / len(values)]
            elif len(values) == 1:
                values[:] = values * c
            else:
                raise TrainError(f"model normalisation {name} has {len(values)} values but the model takes {c} channels")
    return {
        "input_size": [int(c), int(h), int(w)],
        "interpolation": cfg.get("interpolation", "bicubic"),
        "crop_pct": float(cfg.get("crop_pct", 1.0) or 1.0),
        "crop_mode": cfg.get("crop_mode", "center"),
        "mean": [float(v) for v in mean],
        "std": [float(v) for v in std],
        "num_classes": int(getattr(model, "num_classes", 0) or 0),
    }


def _pil_mode(channels: int) -> str:
    if channels not in (1, 3):
        raise TrainError(f"images can be turned into 1 or 3 channels, the model takes {channels}")
    return "L" if channels == 1 else "RGB"


def load_pil(path: Union[str, Path], mode: str) -> Image.Image:
    """Open an image file in ``mode`` ("L" or "RGB"); transparent pixels become white."""
    with Image.open(path) as img:
        img.load()
        if img.mode in ("RGBA", "LA", "P", "PA") and mode == "RGB":
            rgba = img.convert("RGBA")
            img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
        return img.convert(mode)


def geometry_transform(cfg: dict[str, Any]) -> Callable[[Image.Image], torch.Tensor]:
    """PIL image -> uint8 ``(C, H, W)`` tensor with the model's evaluation resize and centre crop.

    Training and :func:`vitscope.load_model`'s preprocessing then see images the same way.
    """
    from torchvision import transforms as T

    from vitscope.models.preprocessing import Preprocessing

    prep = Preprocessing.from_timm_config({**cfg, "input_size": tuple(cfg["input_size"])})
    try:
        interp = T.InterpolationMode(prep.interpolation)
    except ValueError:
        interp = T.InterpolationMode.BICUBIC
    return T.Compose([T.Resize(prep.resize, interpolation=interp), T.CenterCrop(prep.crop), T.PILToTensor()])


class TensorImageDataset(Dataset):
    """In-memory uint8 images ``(N, H, W)`` or ``(N, C, H, W)`` with labels.

    Images already at the model's input size are returned as they are; others are converted with
    :func:`geometry_transform` (channels repeated or averaged through PIL).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, cfg: dict[str, Any]) -> None:
        if images.dtype != torch.uint8:
            raise TrainError(f"images must be uint8, got {images.dtype}")
        if images.ndim == 3:
            images = images[:, None]
        if images.ndim != 4 or len(images) != len(labels):
            raise TrainError(f"expected images (N, [C,] H, W) and N labels, got {tuple(images.shape)} and {tuple(labels.shape)}")
        self.images = images
        self.labels = labels.long()
        c, h, w = cfg["input_size"]
        self.native = tuple(images.shape[1:]) == (c, h, w)
        self.mode = _pil_mode(c)
        self.geometry = None if self.native else geometry_transform(cfg)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img = self.images[i]
        if not self.native:
            arr = img.numpy()
            pil = Image.fromarray(arr[0] if arr.shape[0] == 1 else arr.transpose(1, 2, 0)).convert(self.mode)
            img = self.geometry(pil)
        return img, int(self.labels[i])


def fashion_mnist_splits(cfg: dict[str, Any], root: Union[str, Path, None] = None) -> DatasetSplits:
    """Fashion-MNIST train (60000) and test (10000) splits at the model's input size."""
    from vitscope.data.fashion_mnist import CLASSES, load_fashion_mnist

    tr = TensorImageDataset(*load_fashion_mnist("train", root), cfg)
    te = TensorImageDataset(*load_fashion_mnist("test", root), cfg)
    return DatasetSplits("fashion-mnist", tr, te, list(CLASSES))


def _image_folder(path: Path, cfg: dict[str, Any]):
    from torchvision.datasets import ImageFolder

    mode = _pil_mode(cfg["input_size"][0])
    try:
        return ImageFolder(str(path), loader=partial(load_pil, mode=mode), transform=geometry_transform(cfg))
    except FileNotFoundError as e:
        raise TrainError(f"{path} is not an image folder data set: {e}. Put the images of each class in a sub-folder named after it.") from e


def folder_splits(path: Union[str, Path], cfg: dict[str, Any], holdout_fraction: float = 0.1, seed: int = 0) -> DatasetSplits:
    """An image folder with one sub-folder per class.

    If ``path`` has a ``train`` sub-folder and a ``val``/``validation``/``test`` sub-folder, those are
    the splits; otherwise a seeded ``holdout_fraction`` of the images is held out as the test split
    (none when it is 0). Images are resized to the model's input size.
    """
    path = Path(path)
    if not path.is_dir():
        raise TrainError(f"data set folder {path} does not exist")
    eval_dir = next((path / n for n in EVAL_FOLDER_NAMES if (path / n).is_dir()), None)
    if (path / "train").is_dir() and eval_dir is not None:
        train, test = _image_folder(path / "train", cfg), _image_folder(eval_dir, cfg)
        if train.classes != test.classes:
            raise TrainError(f"class folders differ between {path / 'train'} ({train.classes}) and {eval_dir} ({test.classes})")
        return DatasetSplits(str(path), train, test, list(train.classes))
    full = _image_folder(path, cfg)
    n_test = int(round(holdout_fraction * len(full)))
    if n_test == 0:
        return DatasetSplits(str(path), full, None, list(full.classes))
    perm = torch.randperm(len(full), generator=torch.Generator().manual_seed(seed)).tolist()
    return DatasetSplits(str(path), Subset(full, sorted(perm[n_test:])), Subset(full, sorted(perm[:n_test])), list(full.classes))


def count_classes(dataset: str, data_root: Union[str, Path, None] = None) -> list[str]:
    """The class names of a data set name or folder, without loading its images."""
    if dataset.lower() in FASHION_MNIST_NAMES:
        from vitscope.data.fashion_mnist import CLASSES

        return list(CLASSES)
    path = Path(dataset)
    if not path.is_dir():
        raise TrainError(f"unknown data set {dataset!r}: use 'fashion-mnist' or a folder with one sub-folder per class")
    base = path / "train" if (path / "train").is_dir() and any((path / n).is_dir() for n in EVAL_FOLDER_NAMES) else path
    from torchvision.datasets.folder import find_classes

    try:
        return find_classes(str(base))[0]
    except FileNotFoundError as e:
        raise TrainError(f"{base} has no class sub-folders: {e}") from e


def load_dataset(dataset: Union[str, Path], cfg: dict[str, Any], *, holdout_fraction: float = 0.1, seed: int = 0,
                 data_root: Union[str, Path, None] = None) -> DatasetSplits:  # fmt: skip
    """``"fashion-mnist"`` (IDX files from ``data_root`` or the system) or an image folder path."""
    if str(dataset).lower() in FASHION_MNIST_NAMES:
        return fashion_mnist_splits(cfg, data_root)
    return folder_splits(dataset, cfg, holdout_fraction, seed)


class _Indexed(Dataset):
    """Adds the dataset index to every item, so augmentation can be looked up per image."""

    def __init__(self, ds: Dataset) -> None:
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)  # type: ignore[arg-type]

    def __getitem__(self, i: int):
        x, y = self.ds[i]
        return x, y, i


# --------------------------------------------------------------------------------------------------
# Augmentation, normalisation, evaluation
# --------------------------------------------------------------------------------------------------


def derive_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (e.g. seed, epoch, rank)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0]) & ((1 << 63) - 1)


@dataclass
class EpochAugmentation:
    """Random crop offsets and flips drawn once per epoch for every dataset index.

    Drawing by index (not by batch) makes the augmentation independent of batch order, batch split
    and number of processes.
    """

    offsets: torch.Tensor  # (N, 2) int64: top, left in the padded image, in [0, 2 * padding]
    flips: torch.Tensor  # (N,) bool
    padding: int

    @classmethod
    def draw(cls, n: int, padding: int, hflip: bool, seed: int) -> "EpochAugmentation":
        g = torch.Generator().manual_seed(seed)
        offsets = torch.randint(0, 2 * padding + 1, (n, 2), generator=g)
        flips = torch.rand(n, generator=g) < 0.5 if hflip else torch.zeros(n, dtype=torch.bool)
        return cls(offsets, flips, padding)

    def apply(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Augment a batch ``x`` (B, C, H, W) whose items are dataset items ``index`` (B,)."""
        index = index.cpu()
        B, C, H, W = x.shape
        p = self.padding
        if p > 0:
            xp = F.pad(x, (p, p, p, p))
            off = self.offsets[index].to(x.device)
            rows = off[:, 0, None] + torch.arange(H, device=x.device)  # (B, H)
            cols = off[:, 1, None] + torch.arange(W, device=x.device)  # (B, W)
            b = torch.arange(B, device=x.device)[:, None, None, None]
            c = torch.arange(C, device=x.device)[None, :, None, None]
            x = xp[b, c, rows[:, None, :, None], cols[:, None, None, :]]
        flip = self.flips[index].to(x.device)[:, None, None, None]
        return torch.where(flip, x.flip(-1), x)


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 ``(B, C, H, W)`` -> float32, scaled to [0, 1] then standardised per channel."""
    m = torch.tensor(mean, dtype=torch.float32, device=x.device)[None, :, None, None]
    s = torch.tensor(std, dtype=torch.float32, device=x.device)[None, :, None, None]
    return (x.float() / 255.0 - m) / s


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: Dataset,
    cfg: dict[str, Any],
    *,
    batch_size: int = 500,
    device: Union[str, torch.device] = "cpu",
    indices: Optional[Sequence[int]] = None,
    num_workers: int = 0,
) -> dict[str, float]:
    """Top-1 accuracy and mean cross-entropy of ``model`` on ``dataset`` (or the items ``indices``).

    Returns sums as well (``correct``, ``loss_sum``, ``count``) so shards can be added up.
    """
    was_training = model.training
    model.eval()
    ds = Subset(dataset, list(indices)) if indices is not None else dataset
    correct, loss_sum, count = 0, 0.0, 0
    for x, y in DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers):
        x, y = normalize(x.to(device), cfg["mean"], cfg["std"]), y.to(device)
        logits = model(x).float()
        correct += int((logits.argmax(-1) == y).sum())
        loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
        count += len(y)
    model.train(was_training)
    return {"correct": correct, "loss_sum": loss_sum, "count": count,
            "accuracy": correct / max(count, 1), "loss": loss_sum / max(count, 1)}  # fmt: skip


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Learning-rate factor: linear warmup to 1 over ``warmup_steps``, then cosine decay to ``min_ratio``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    t = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))


# --------------------------------------------------------------------------------------------------
# Distributed context, checkpoints, outputs
# --------------------------------------------------------------------------------------------------


@dataclass
class _Dist:
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


def _dist_context(device: Union[str, torch.device, None]) -> _Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 and not dist.is_initialized():
        dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return _Dist(0, 1, dev, False)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    want_cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    dev = torch.device("cuda", local) if want_cuda else torch.device("cpu")
    owns = False
    if not dist.is_initialized():
        if want_cuda:
            torch.cuda.set_device(dev)
        dist.init_process_group(backend="nccl" if want_cuda else "gloo")
        owns = True
    return _Dist(dist.get_rank(), dist.get_world_size(), dev, owns)


def _rng_states() -> dict[str, Any]:
    np_state = np.random.get_state()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(tuple(v if not isinstance(v, list) else tuple(v) for v in states["python"]))
    kind, keys, *rest = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in states and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])


def _atomic_save(obj: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def _atomic_json(obj: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")


def save_weights(model: nn.Module, path: Union[str, Path], spec: ModelSpec, cfg: dict[str, Any], classes: Sequence[str],
                 extra: Optional[dict[str, str]] = None) -> Path:  # fmt: skip
    """Write ``model``'s weights as safetensors with the metadata :func:`vitscope.load_model` needs."""
    from safetensors.torch import save_file

    from vitscope.models.loader import META_ARCH, META_ARGS, META_CFG, META_CLASSES

    spec.check_serialisable()
    meta = {
        META_ARCH: spec.arch,
        META_ARGS: json.dumps(spec.kwargs),
        META_CFG: json.dumps(cfg),
        META_CLASSES: json.dumps(list(classes)),
        **(extra or {}),
    }
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=meta)
    return path


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


def _check_resumable(ckpt: dict[str, Any], path: Path, spec: ModelSpec, recipe: Recipe, dataset: str) -> None:
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


def sincos_2d(rows: int, cols: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """Fixed 2-D sine-cosine position codes ``(rows * cols, dim)`` (MAE / MoCo v3 form): a quarter of
    the channels each for sin and cos of the column and of the row, so nearby patches get similar codes."""
    if dim % 4:
        raise TrainError(f"2-D sine-cosine position codes need a width divisible by 4, got {dim}")
    gy, gx = torch.meshgrid(torch.arange(rows, dtype=torch.float32), torch.arange(cols, dtype=torch.float32), indexing="ij")
    omega = 1.0 / temperature ** (torch.arange(dim // 4, dtype=torch.float32) / max(1, dim // 4 - 1))
    y = gy.flatten()[:, None] * omega[None]
    x = gx.flatten()[:, None] * omega[None]
    return torch.cat([x.sin(), x.cos(), y.sin(), y.cos()], dim=1)


@torch.no_grad()
def mimetic_init(model: nn.Module, alpha: float = 0.7, beta: float = 0.7, pos_scale: float = 1.0) -> nn.Module:
    """Mimetic initialisation of a timm ``VisionTransformer``'s attention (Trockman & Kolter 2023).

    Each head's query and key weights are set so that ``W_q^T W_k`` approximates ``alpha Z + beta I``
    (``Z`` random): at the start a token's query is most similar to its own key. With the patch
    position embeddings set to 2-D sine-cosine codes (times ``pos_scale``), in which neighbours are
    similar, heads begin by attending near their own position — the locality a large data set
    teaches a ViT and a small one does not. Training is free to change every weight afterwards.
    Draws from torch's global RNG (the caller seeds it). Returns ``model``.
    """
    from timm.layers import Attention

    blocks = getattr(model, "blocks", None)
    pos = getattr(model, "pos_embed", None)
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    if blocks is None or pos is None or grid is None:
        raise TrainError(f"mimetic initialisation needs a timm VisionTransformer (blocks, pos_embed, patch_embed); got {type(model).__name__}")
    D = int(model.embed_dim)
    prefix = pos.shape[1] - int(grid[0]) * int(grid[1])
    pos[0, prefix:] = pos_scale * sincos_2d(int(grid[0]), int(grid[1]), D)
    pos[0, :prefix] = 0.0
    for i, blk in enumerate(blocks):
        attn = blk.attn
        if not isinstance(attn, Attention):
            raise TrainError(f"mimetic initialisation needs timm's Attention in every block; block {i} has {type(attn).__name__}")
        H = attn.num_heads
        dh = D // H
        w = attn.qkv.weight  # (3D, D): query rows, key rows, value rows
        for h in range(H):
            m = alpha * torch.randn(D, D) / D**0.5 + beta * torch.eye(D)
            u, sv, vh = torch.linalg.svd(m)
            root = sv[:dh].sqrt()
            w[h * dh : (h + 1) * dh] = (u[:, :dh] * root).T
            w[D + h * dh : D + (h + 1) * dh] = vh[:dh] * root[:, None]
    return model


# --------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------


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
    progress: bool = True,
) -> TrainResult:
    """Train an image classifier and write checkpoints, ``metrics.json`` and ``<arch>.safetensors`` to ``out``.

    ``model`` is a timm-registered architecture name (``model_args`` go to its factory) or a
    :class:`ModelSpec`. ``num_classes`` is set from the data set unless given. ``dataset`` is
    ``"fashion-mnist"`` (IDX files from ``data_root`` or the system package), an image folder with
    one sub-folder per class, or :class:`DatasetSplits`. With ``resume`` (the default) an existing
    checkpoint in ``out`` is continued; it must come from the same model, data set and recipe.
    ``stop_after`` ends the run after that many epochs in total without finishing the schedule, as
    a time-limited job would; running again continues it. Runs data-parallel when started by
    ``torchrun``. ``device`` defaults to CUDA when available.
    """
    recipe = recipe or Recipe()
    recipe.validate()
    spec = model if isinstance(model, ModelSpec) else ModelSpec(model, dict(model_args or {}))
    if isinstance(model, ModelSpec) and model_args:
        spec = ModelSpec(spec.arch, {**spec.kwargs, **model_args}, spec.factory)
    if stop_after is not None and stop_after < 1:
        raise TrainError(f"stop_after={stop_after} must be at least 1")
    out = Path(out)
    ctx = _dist_context(device)
    try:
        return _train(spec, dataset, out, recipe, ctx, data_root, resume, stop_after, progress)
    finally:
        if ctx.owns_group:
            dist.destroy_process_group()


def _train(spec: ModelSpec, dataset: Union[str, Path, DatasetSplits], out: Path, recipe: Recipe, ctx: _Dist,
           data_root: Union[str, Path, None], resume: bool, stop_after: Optional[int], progress: bool) -> TrainResult:  # fmt: skip
    from rich.console import Console

    console = Console(quiet=not (ctx.main and progress))
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
        mimetic_init(net)
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
    indexed = _Indexed(splits.train)
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
        _check_resumable(ckpt, out_ckpt, spec, recipe, dataset_name)
        net.load_state_dict(ckpt["state_dict"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        _set_rng_states(ckpt["rng"])
        epochs_done, history, wall_before = ckpt["epoch"], ckpt["metrics"], ckpt["wall_time_s"]
        console.print(f"[bold]resuming[/] {out_ckpt} after epoch {epochs_done}/{recipe.epochs}")
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
    console.print(
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
        with _progress(console, progress and ctx.main) as bar:
            task = bar.add_task(f"epoch {epoch + 1}/{recipe.epochs}", total=steps_per_epoch, loss=float("nan"))
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
                    bar.update(task, completed=step + 1, loss=float(loss_sum) / seen)
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
        console.print(f"epoch {epoch + 1}/{recipe.epochs}: train loss {row['train_loss']:.4f}, test accuracy {acc}, "
                      f"{row['epoch_time_s']:.1f} s")  # fmt: skip
        if ctx.main:
            _atomic_save({
                "format": CHECKPOINT_FORMAT, "epoch": epoch + 1, "state_dict": net.state_dict(),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": _rng_states(),
                "metrics": history, "recipe": recipe.to_dict(), "model": spec.to_json(), "dataset": dataset_name,
                "world_size": ctx.world, "wall_time_s": row["wall_time_s"],
            }, out_ckpt)  # fmt: skip
            _atomic_json(_metrics(spec, recipe, dataset_name, classes, cfg, ctx.world, history, complete=False), out_metrics)
        ctx.barrier()

    complete = len(history) >= recipe.epochs
    net.eval()
    metrics = _metrics(spec, recipe, dataset_name, classes, cfg, ctx.world, history, complete=complete)
    if complete and ctx.main:
        save_weights(net, weights_path, spec, cfg, classes)
        _atomic_json(metrics, out_metrics)
        console.print(f"[bold green]done[/]: {weights_path} (test accuracy "
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


def _progress(console, enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]:.4f}"),
        TimeElapsedColumn(), TimeRemainingColumn(), console=console, disable=not enabled, transient=True,
    )  # fmt: skip


"""Training data: Fashion-MNIST and image folders as train/test splits, in the geometry the model expects."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
from PIL import Image
from torch import nn
from torch.utils.data import Dataset, Subset
from vitscope.training.recipe import EVAL_FOLDER_NAMES, FASHION_MNIST_NAMES, TrainError


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


class IndexedDataset(Dataset):
    """Adds the dataset index to every item, so augmentation can be looked up per image."""

    def __init__(self, ds: Dataset) -> None:
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)  # type: ignore[arg-type]

    def __getitem__(self, i: int):
        x, y = self.ds[i]
        return x, y, i

"""Fashion-MNIST from its standard IDX files (the Debian ``dataset-fashion-mnist`` package or a download).

Fashion-MNIST is the data set of vitscope's built-in model. The loader reads the four original IDX
files directly (gzip-compressed or plain) and checks their headers, so a truncated or swapped file is
reported instead of silently producing wrong images.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import Literal, Optional, Union

import numpy as np
import torch

#: Where the Debian/Ubuntu package ``dataset-fashion-mnist`` installs the IDX files.
SYSTEM_ROOT = Path("/usr/share/datasets/fashion-mnist")
#: Where a torchvision download goes when the system package is not installed.
CACHE_ROOT = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vitscope" / "fashion-mnist"

CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip

#: File stems of the original distribution and the number of items each split must hold.
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", 60000),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", 10000),
}

#: IDX magic numbers: two zero bytes, the type code (0x08 = unsigned byte), the number of dimensions.
IDX_IMAGES_MAGIC = 0x00000803
IDX_LABELS_MAGIC = 0x00000801

Split = Literal["train", "test"]


class DatasetNotFoundError(FileNotFoundError):
    """A data set is neither installed nor downloadable (the message says how to get it)."""


def read_idx(path: Union[str, Path], expected_magic: int) -> np.ndarray:
    """Read one IDX file (``.gz`` or plain) into a uint8 array of the shape its header declares.

    Raises ``ValueError`` naming the file when the magic number is not ``expected_magic`` or the
    payload size does not match the header.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4:
        raise ValueError(f"{path} is too short to be an IDX file ({len(data)} bytes)")
    magic = int.from_bytes(data[:4], "big")
    if magic != expected_magic:
        raise ValueError(
            f"{path}: IDX magic number is 0x{magic:08x}, expected 0x{expected_magic:08x} "
            f"({'images' if expected_magic == IDX_IMAGES_MAGIC else 'labels'} of unsigned bytes). "
            "The file is corrupt or is not the file its name says."
        )
    ndim = expected_magic & 0xFF
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(data)} bytes, need {header})")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(shape, dtype=np.int64))
    payload = len(data) - header
    if payload != expected:
        raise ValueError(
            f"{path}: header declares shape {shape} ({expected} bytes) but the file holds {payload} bytes "
            "of data; the file is truncated or corrupt, re-install or re-download it"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape).copy()


def _find(root: Path, stem: str) -> Optional[Path]:
    for name in (stem + ".gz", stem):
        if (root / name).is_file():
            return root / name
    return None


def read_fashion_mnist_idx(split: Split, root: Union[str, Path]) -> tuple[torch.Tensor, torch.Tensor]:
    """Read one split from the IDX files in ``root`` and check the counts against each other."""
    if split not in FILES:
        raise ValueError(f"unknown Fashion-MNIST split {split!r}; use 'train' or 'test'")
    root = Path(root)
    img_stem, lbl_stem, _ = FILES[split]
    img_path, lbl_path = _find(root, img_stem), _find(root, lbl_stem)
    missing = [s for s, p in ((img_stem, img_path), (lbl_stem, lbl_path)) if p is None]
    if missing:
        raise DatasetNotFoundError(f"Fashion-MNIST {split} files {missing} (.gz or plain) are missing from {root}")
    images = read_idx(img_path, IDX_IMAGES_MAGIC)
    labels = read_idx(lbl_path, IDX_LABELS_MAGIC)
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise ValueError(f"{img_path}: expected images of 28x28 pixels, found shape {images.shape}")
    if len(images) != len(labels):
        raise ValueError(f"{img_path} holds {len(images)} images but {lbl_path} holds {len(labels)} labels")
    if labels.size and int(labels.max()) >= len(CLASSES):
        raise ValueError(f"{lbl_path}: label {int(labels.max())} is out of range 0..{len(CLASSES) - 1}")
    return torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))


def _download(split: Split, cache: Path) -> tuple[torch.Tensor, torch.Tensor]:
    from torchvision.datasets import FashionMNIST

    ds = FashionMNIST(str(cache), train=(split == "train"), download=True)
    return ds.data.to(torch.uint8).clone(), ds.targets.to(torch.int64).clone()


def load_fashion_mnist(
    split: Split,
    root: Union[str, Path, None] = None,
    download: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST ``split`` ("train" or "test") as ``(images uint8 (N, 28, 28), labels int64 (N,))``.

    With ``root=None`` the IDX files come from ``/usr/share/datasets/fashion-mnist`` (Debian package
    ``dataset-fashion-mnist``); when that folder is absent and ``download`` is true, torchvision
    downloads the data set into ``~/.cache/vitscope/fashion-mnist``. With an explicit ``root`` the
    IDX files must be in that folder. The full splits hold 60000 and 10000 images.
    """
    if split not in FILES:
        raise ValueError(f"unknown Fashion-MNIST split {split!r}; use 'train' or 'test'")
    if root is not None:
        return read_fashion_mnist_idx(split, root)
    if SYSTEM_ROOT.is_dir():
        return read_fashion_mnist_idx(split, SYSTEM_ROOT)
    if download:
        try:
            return _download(split, CACHE_ROOT)
        except Exception as e:  # noqa: BLE001 - network and mirror errors vary; all mean "not available"
            reason = f"the download into {CACHE_ROOT} failed ({type(e).__name__}: {e})"
    else:
        reason = "downloading is switched off"
    raise DatasetNotFoundError(
        f"Fashion-MNIST is not installed at {SYSTEM_ROOT} and {reason}. Install it with "
        "`apt-get install dataset-fashion-mnist`, or pass root= a folder holding the four IDX files."
    )

"""Turning images into model input with the model's own preprocessing config."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image

ImageLike = Union[str, Path, Image.Image, np.ndarray, torch.Tensor]

_PIL_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}


@dataclass
class Preprocessing:
    """A model's evaluation preprocessing, as plain values.

    ``resize`` is either an int (shortest side, aspect kept) or ``(height, width)``; ``crop`` is the
    centre crop ``(height, width)`` or ``None``. Values come from timm's ``pretrained_cfg`` or a
    Hugging Face image processor. ``transform``, when set, is the model library's own transform and
    is used instead of the PIL implementation (timm models use timm's ``create_transform``).
    """

    input_size: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bicubic"
    resize: Union[int, tuple[int, int], None] = None
    crop: Optional[tuple[int, int]] = None
    rescale: float = 1.0 / 255.0
    transform: Optional[Callable[[Image.Image], torch.Tensor]] = field(default=None, repr=False)

    @property
    def channels(self) -> int:
        return self.input_size[0]

    def to_dict(self) -> dict[str, Any]:
        return {
            "input_size": list(self.input_size),
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
            "resize": self.resize if not isinstance(self.resize, tuple) else list(self.resize),
            "crop": list(self.crop) if self.crop else None,
        }

    @classmethod
    def from_timm_config(cls, cfg: dict[str, Any], transform: Optional[Callable] = None) -> "Preprocessing":
        c, h, w = cfg["input_size"]
        crop_pct = cfg.get("crop_pct", 1.0) or 1.0
        crop_mode = cfg.get("crop_mode", "center")
        if crop_mode == "squash":
            resize: Union[int, tuple[int, int]] = (math.floor(h / crop_pct), math.floor(w / crop_pct))
        else:
            resize = math.floor(min(h, w) / crop_pct) if h == w else (math.floor(h / crop_pct), math.floor(w / crop_pct))
        return cls(
            input_size=(c, h, w),
            mean=tuple(cfg["mean"]),
            std=tuple(cfg["std"]),
            interpolation=cfg.get("interpolation", "bicubic"),
            resize=resize,
            crop=(h, w),
            transform=transform,
        )

    def to_pil(self, image: ImageLike) -> Image.Image:
        """Open/convert one image to a PIL image with this model's channel count."""
        if isinstance(image, (str, Path)):
            from vitscope.data import open_image

            img = open_image(image)
        elif isinstance(image, Image.Image):
            img = image
        elif isinstance(image, torch.Tensor):
            arr = image.detach().cpu().numpy()
            if arr.ndim == 3 and arr.shape[0] in (1, 3, 4):  # torch's (C, H, W)
                arr = np.moveaxis(arr, 0, -1)
            img = _array_to_pil(arr)
        elif isinstance(image, np.ndarray):
            arr = image
            if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[2] not in (1, 3, 4):  # (C, H, W)
                arr = np.moveaxis(arr, 0, -1)
            img = _array_to_pil(arr)
        else:
            raise TypeError(f"cannot preprocess an object of type {type(image).__name__}; pass a path, PIL image or array")
        mode = "L" if self.channels == 1 else "RGB"
        if img.mode != mode:
            if img.mode in ("RGBA", "LA", "P") and mode == "RGB":
                img = img.convert("RGBA")
                bg = Image.new("RGBA", img.size, (255, 255, 255, 255))
                img = Image.alpha_composite(bg, img)
            img = img.convert(mode)
        return img

    def __call__(self, image: ImageLike) -> torch.Tensor:
        """One image -> ``(C, H, W)`` float tensor."""
        img = self.to_pil(image)
        if self.transform is not None:
            return self.transform(img)
        resample = _PIL_RESAMPLE.get(self.interpolation, Image.Resampling.BICUBIC)
        if isinstance(self.resize, int):
            w, h = img.size
            s = self.resize / min(w, h)
            size = (self.resize, max(1, round(h * s))) if w <= h else (max(1, round(w * s)), self.resize)
            img = img.resize(size, resample)
        elif isinstance(self.resize, tuple):
            img = img.resize((self.resize[1], self.resize[0]), resample)
        if self.crop is not None:
            ch, cw = self.crop
            w, h = img.size
            top = int(round((h - ch) / 2.0))
            left = int(round((w - cw) / 2.0))
            img = img.crop((left, top, left + cw, top + ch))
        arr = np.asarray(img, dtype=np.float32) * self.rescale
        if arr.ndim == 2:
            arr = arr[:, :, None]
        t = torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))
        mean = torch.tensor(self.mean, dtype=torch.float32)[:, None, None]
        std = torch.tensor(self.std, dtype=torch.float32)[:, None, None]
        return (t - mean) / std

    def batch(self, images: Union[ImageLike, Sequence[ImageLike], Iterable[ImageLike]]) -> torch.Tensor:
        """Many images -> ``(B, C, H, W)``.

        What each input form means (one rule for every entry point that takes images):

        - a floating-point ``torch.Tensor`` is already preprocessed: ``(B, C, H, W)`` a batch,
          ``(C, H, W)`` one image (preprocessing it again would silently change the model's input:
          a normalised photo is not an image in [0, 1]); other shapes are refused;
        - an integer (e.g. uint8) tensor holds pixels: ``(H, W)``, ``(C, H, W)`` or ``(H, W, C)`` one
          image, ``(B, ...)`` a batch of them, each preprocessed;
        - a numpy array holds pixels: ``(H, W)``, ``(H, W, C)`` or ``(C, H, W)`` one image, 4-d a
          batch; uint8 as is, floats in [0, 1] or [0, 255] (a float array with values outside
          [0, 255], such as a normalised input, is refused: pass it as a float tensor instead);
        - a path or PIL image is one image; a list or other iterable of any of these is a batch.
        """
        if isinstance(images, (str, Path, Image.Image)) or (isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim <= 3):
            images = [images]
        if isinstance(images, torch.Tensor) and images.ndim == 4 and images.is_floating_point():
            return self._preprocessed_batch(images)
        return torch.stack([self._preprocessed(im) if _is_model_input(im) else self(im) for im in images])

    def _preprocessed(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 3 or x.shape[0] != self.channels:
            raise ValueError(
                f"a floating-point tensor is taken as a preprocessed model input of shape ({self.channels}, H, W) "
                f"or (B, {self.channels}, H, W), but this one has shape {tuple(x.shape)}; to have vitscope "
                "preprocess an image, pass a path, a PIL image, a numpy array or a uint8 tensor"
            )
        return x  # kept in its own float dtype: a float64 input to a float64 model stays exact

    def _preprocessed_batch(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.channels:
            raise ValueError(
                f"a floating-point (B, C, H, W) tensor is taken as a preprocessed batch with C = {self.channels} "
                f"channels for this model, but this one has shape {tuple(x.shape)}; a (B, H, W, C) batch of "
                "pixels must be a uint8 tensor or numpy array (then vitscope preprocesses it)"
            )
        return x


def _is_model_input(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and x.is_floating_point()


def _array_to_pil(arr: np.ndarray) -> Image.Image:
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    elif arr.dtype != np.uint8:
        a = arr.astype(np.float32)
        if a.size and (not np.isfinite(a).all() or a.min() < 0 or a.max() > 255):
            raise ValueError(
                f"an array of pixels must hold values in [0, 1] or [0, 255], but this {arr.dtype} array of shape "
                f"{arr.shape} holds values from {np.nanmin(a):.3g} to {np.nanmax(a):.3g}{' and NaN or inf' if not np.isfinite(a).all() else ''}; "
                "if it is an already preprocessed model input, pass it as a float torch tensor (torch.from_numpy(x))"
            )
        if a.max() <= 1.0 + 1e-6:
            a = a * 255.0
        arr = np.clip(a, 0, 255).astype(np.uint8)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    return Image.fromarray(arr)

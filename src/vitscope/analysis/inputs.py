"""Input handling shared by the analyses: batches and target classes."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence, Union

import numpy as np
import torch

if TYPE_CHECKING:  # pragma: no cover
    from vitscope.models.vit import ViT

Targets = Union[None, int, Sequence[int], np.ndarray, torch.Tensor]


def as_batch(vit: "ViT", x: Any) -> torch.Tensor:
    """A preprocessed ``(B, C, H, W)`` tensor on the model's device and dtype (images are preprocessed first)."""
    if not (isinstance(x, torch.Tensor) and x.ndim == 4):
        x = vit.preprocess(x)
    param = next(vit.module.parameters())
    return x.to(param.device, dtype=param.dtype)


def resolve_targets(targets: Targets, prediction: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Targets as a long tensor on ``prediction``'s device; ``None`` or ``-1`` entries become the prediction."""
    B = prediction.shape[0]
    if targets is None:
        return prediction.clone()
    t = torch.as_tensor(np.asarray(targets.cpu() if isinstance(targets, torch.Tensor) else targets), dtype=torch.long)
    if t.ndim == 0:
        t = t.expand(B)
    if t.shape != (B,):
        raise ValueError(f"targets must hold one class index per image ({B}), got shape {tuple(t.shape)}")
    t = t.to(prediction.device)
    bad = (t < -1) | (t >= num_classes)
    if bool(bad.any()):
        raise ValueError(
            f"targets {t[bad].tolist()} are not class indices of this {num_classes}-class model; "
            "use -1 to mean 'the model's own prediction'"
        )
    return torch.where(t < 0, prediction, t)


def class_indices(values: Any, B: int, num_classes: Any, what: str = "target") -> torch.Tensor:
    """``values`` as a ``(B,)`` long CPU tensor of class indices (one index is repeated per image).

    Strict: booleans, floats, a wrong count and indices outside ``0..num_classes - 1`` raise a
    ``ValueError`` that names ``what`` (no ``-1`` placeholder, unlike :func:`resolve_targets`).
    """
    if isinstance(values, bool):
        raise ValueError(f"{what} must be a class index or one per image, got {values!r}")
    t = values.detach().to("cpu") if isinstance(values, torch.Tensor) else torch.as_tensor(np.asarray(values))
    if t.is_floating_point() or t.dtype == torch.bool:
        raise ValueError(f"{what} must hold integer class indices, got dtype {t.dtype}")
    t = t.to(torch.long)
    if t.ndim == 0:
        t = t.expand(B)
    if tuple(t.shape) != (B,):
        raise ValueError(f"{what} must be one class index, or one per image ({B}), got shape {tuple(t.shape)}")
    bad = (t < 0) | (t >= (num_classes or 0))
    if bool(bad.any()):
        raise ValueError(f"{what} {t[bad].tolist()} are not class indices of this {num_classes}-class model")
    return t


def split_batch(batch: Any) -> tuple[Any, Targets]:
    """``x``, ``(x, targets)`` or a :class:`vitscope.data.Batch` -> ``(x, targets)``."""
    if hasattr(batch, "x") and hasattr(batch, "labels"):
        return batch.x, batch.labels
    if isinstance(batch, (tuple, list)) and len(batch) == 2 and not isinstance(batch[0], (str, bytes)):
        return batch[0], batch[1]
    return batch, None

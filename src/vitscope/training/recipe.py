"""What a training run is: its :class:`Recipe` (every hyper-parameter and the seed) and its :class:`ModelSpec` (a timm architecture and its arguments)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional

from torch import nn

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
    attention starts out attending by position, which small data sets do not teach on their own),
    with ``mimetic_alpha`` and ``mimetic_beta`` the weights of its random and identity parts and
    ``pos_scale`` the scale of its sine-cosine position codes. ``freeze_pos_embed`` keeps the
    position embeddings at their initial values (fixed codes, as in MAE and MoCo v3), so training
    cannot remove the positional signal from the tokens (docs/builtin-model.md measures how much
    locality the heads keep).
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
    mimetic_alpha: float = 0.7
    mimetic_beta: float = 0.7
    pos_scale: float = 1.0
    freeze_pos_embed: bool = False

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
            ("mimetic_alpha", self.mimetic_alpha >= 0, "zero or positive"),
            ("mimetic_beta", self.mimetic_beta >= 0, "zero or positive"),
            ("pos_scale", self.pos_scale > 0, "positive"),
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

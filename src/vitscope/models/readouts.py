"""Class readouts put on top of a model's pooled embedding, for models without a classifier.

A backbone (DINOv2, a CLIP or SigLIP vision tower, MAE) has no class logits, so the importance
metrics that score a class (probability drop, accuracy, loss) have nothing to measure. A readout
gives it logits from its own pooled image embedding (:meth:`vitscope.ViT.embedding`) without
touching the model: :meth:`vitscope.ViT.with_readout` returns a view of the same model whose
:meth:`~vitscope.ViT.readout` is ``readout(embedding)``. Two kinds, both linear in what they read:

- :class:`ZeroShotReadout` — CLIP / SigLIP zero-shot classification: the image embedding's
  projection into the joint space, normalised, against the normalised text embeddings of one prompt
  per class (:mod:`vitscope.models.zero_shot` builds it from the model's own text tower);
- :class:`LinearReadout` — any linear map of the embedding, e.g. a linear probe fitted on the image
  set (:mod:`vitscope.analysis.probe`).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn


class Readout(nn.Module):
    """Pooled embedding ``(B, D)`` -> class logits ``(B, C)``, with the classes' names."""

    class_names: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def describe(self) -> str:  # pragma: no cover - overridden
        return type(self).__name__


class LinearReadout(Readout):
    """``logits = embedding @ weight.T + bias`` (a linear probe, or any fixed linear head)."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor], class_names: Sequence[str], *, what: str = "linear readout"):
        super().__init__()
        weight = torch.as_tensor(weight)
        if weight.ndim != 2 or weight.shape[0] != len(class_names):
            raise ValueError(f"weight must be (classes, embedding dim) with one row per class name, got {tuple(weight.shape)} "
                             f"for {len(class_names)} names")
        self.register_buffer("weight", weight.detach().clone())
        self.register_buffer("bias", None if bias is None else torch.as_tensor(bias).detach().clone())
        self.class_names = list(class_names)
        self.what = what

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        w = self.weight.to(embedding.device, embedding.dtype)
        out = embedding @ w.T
        return out if self.bias is None else out + self.bias.to(embedding.device, embedding.dtype)

    def describe(self) -> str:
        return f"{self.what} ({self.num_classes} classes)"


class ZeroShotReadout(Readout):
    """CLIP / SigLIP zero-shot logits: ``scale * cos(project(embedding), text[c]) + bias``.

    ``projection`` maps the vision tower's pooled output into the joint space (CLIP's
    ``visual_projection``; SigLIP has none), ``text`` holds one unit-norm text embedding per class
    (the prompts' mean, renormalised, when there are several prompts per class), ``scale`` is the
    model's ``exp(logit_scale)`` and ``bias`` SigLIP's ``logit_bias`` (0 for CLIP). A softmax over
    these logits is CLIP's zero-shot class probability; for SigLIP, trained with a per-pair sigmoid,
    it is the usual zero-shot ranking turned into a distribution over the given classes.
    """

    def __init__(self, text: torch.Tensor, class_names: Sequence[str], *, scale: float, bias: float = 0.0,
                 projection: Optional[torch.Tensor] = None, prompts: Sequence[str] = ()):
        super().__init__()
        text = torch.as_tensor(text)
        if text.ndim != 2 or text.shape[0] != len(class_names):
            raise ValueError(f"text must be (classes, dim) with one row per class name, got {tuple(text.shape)} for {len(class_names)} names")
        self.register_buffer("text", torch.nn.functional.normalize(text.detach().double(), dim=-1).to(text.dtype))
        self.register_buffer("projection", None if projection is None else torch.as_tensor(projection).detach().clone())
        self.scale, self.bias = float(scale), float(bias)
        self.class_names = list(class_names)
        self.prompts = list(prompts)

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        e = embedding if self.projection is None else embedding @ self.projection.to(embedding.device, embedding.dtype).T
        e = torch.nn.functional.normalize(e, dim=-1)
        return self.scale * (e @ self.text.to(e.device, e.dtype).T) + self.bias

    def describe(self) -> str:
        prompt = f", prompts {self.prompts!r}" if self.prompts else ""
        return f"zero-shot readout ({self.num_classes} classes{prompt})"

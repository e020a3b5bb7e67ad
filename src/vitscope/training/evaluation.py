"""Test accuracy and loss of a model on a dataset, with the training loop's own normalisation."""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from vitscope.training.augment import normalize


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

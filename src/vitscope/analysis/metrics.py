"""The head-importance metrics: one registry that the analyses, the pipeline, the report and the web
app read.

A metric turns the per-(image, head) rows an analysis records (``image_heads``) and the per-image
rows (``images``) into one effect per image and head; :func:`~vitscope.analysis.importance.summarize_importance`
averages it over images with bootstrap intervals, the pruning curves rank heads by it, metric
agreement correlates it with the others, and the web app's metric selector lists it. Adding a
metric is one :func:`register_head_metric` call (plus recording its inputs per image, if new).

Imports only numpy, so the server can read the labels without loading torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

#: ``grid(column)``: an ``image_heads`` column as an ``(N images, K heads)`` matrix;
#: ``per_image(column)``: an ``images`` column as ``(N, 1)``.
Grid = Callable[[str], np.ndarray]


@dataclass(frozen=True)
class HeadMetric:
    """One head-importance metric (larger = more important).

    Attributes:
        name: column name in ``heads`` (with ``<name>_lo`` / ``<name>_hi`` intervals).
        label: how figures and the web app name it.
        description: one sentence: what it measures.
        image_head_columns / image_columns: the inputs it needs; it is computed when all are there.
        effect: ``effect(grid, per_image) -> (N, K)`` effects per image and head.
        ranks_heads: ranked in the pruning curves and metric agreement (a diagnostic column that
            repeats another metric in other units sets this False).
    """

    name: str
    label: str
    description: str
    image_head_columns: tuple[str, ...]
    image_columns: tuple[str, ...]
    effect: Callable[[Grid, Grid], np.ndarray]
    ranks_heads: bool = True


#: Every metric, in registration order (the order of the ``heads`` columns and the report).
HEAD_METRICS: dict[str, HeadMetric] = {}


def register_head_metric(metric: HeadMetric) -> HeadMetric:
    """Add ``metric`` to :data:`HEAD_METRICS` (refuses a name that is taken)."""
    if metric.name in HEAD_METRICS:
        raise ValueError(f"a head metric named {metric.name!r} is already registered")
    HEAD_METRICS[metric.name] = metric
    return metric


def ranking_metrics() -> tuple[str, ...]:
    """The metrics that rank heads (curves, agreement), in registration order."""
    return tuple(m.name for m in HEAD_METRICS.values() if m.ranks_heads)


def metric_label(name: str) -> str:
    """A metric's readable name (its column name for a metric that is not registered, e.g. ``random``)."""
    m = HEAD_METRICS.get(name)
    return m.label if m is not None else {"random": "random order"}.get(name, name)


register_head_metric(HeadMetric(
    "acc_drop", "accuracy drop", "Accuracy unpruned minus accuracy with the head pruned.",
    ("pruned_correct",), ("correct",), lambda grid, per_image: per_image("correct") - grid("pruned_correct"),
))
register_head_metric(HeadMetric(
    "prob_drop", "probability drop", "Drop of the target's probability when the head is pruned.",
    ("pruned_prob",), ("base_prob",), lambda grid, per_image: per_image("base_prob") - grid("pruned_prob"),
))
register_head_metric(HeadMetric(
    "loss_increase", "loss increase", "Increase of the target's cross-entropy when the head is pruned.",
    ("pruned_loss",), ("base_loss",), lambda grid, per_image: grid("pruned_loss") - per_image("base_loss"),
))
register_head_metric(HeadMetric(
    "layer_change", "layer output change (1 - cos)", "1 - cosine between the pruned block's output and the unpruned one.",
    ("layer_change",), (), lambda grid, per_image: grid("layer_change"),
))
register_head_metric(HeadMetric(
    "layer_rel_l2", "layer output rel. L2", "Relative L2 change of the pruned block's output (layer_change in other units).",
    ("layer_rel_l2",), (), lambda grid, per_image: grid("layer_rel_l2"), ranks_heads=False,
))
register_head_metric(HeadMetric(
    "taylor", "Taylor (|mask gradient|)", "Absolute gradient of the loss with respect to the head's gate (Michel et al. 2019).",
    ("taylor",), (), lambda grid, per_image: np.abs(grid("taylor")),
))
register_head_metric(HeadMetric(
    "embedding_change", "embedding change (1 - cos)",
    "1 - cosine between the pooled image embedding with the head pruned and the unpruned one (the 'embedding' objective).",
    ("embedding_change",), (), lambda grid, per_image: grid("embedding_change"),
))

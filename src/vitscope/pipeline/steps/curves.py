"""Final step 3: cumulative head-pruning curves, held out and in sample.

The most expensive final step (about one forward per curve point, metric and curve image), so in a
parallel job the curve images are cut into fixed groups that the ranks take as they become free;
rank 0 adds the groups' sums in group order, which gives the one-process table bit for bit.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

from vitscope.analysis import importance as imp
from vitscope.pipeline.context import RunContext

#: Importance metrics whose cumulative pruning curves are computed (plus a random baseline).
CURVE_METRICS: tuple[str, ...] = (*imp.METRICS, "random")


class CurveWork(NamedTuple):
    """What the curves measure: the pruned sets, the evaluation images (``image_id, target``), and how
    many images ranked the held-out heads and were analysed in all."""

    plan: imp.CurvePlan
    subset: pd.DataFrame
    n_rank_images: int
    n_images: int


def curve_plan(ctx: RunContext, images: pd.DataFrame, image_heads: pd.DataFrame, heads: pd.DataFrame) -> CurveWork:
    """The :class:`CurveWork` of a run.

    Held-out curves rank the heads on the ``rank`` images and measure them on the ``evaluate`` ones;
    in-sample curves, for comparison, rank them on every image, these included.
    """
    role = ctx.curve_split(images)
    subset = images.loc[role == "evaluate", ["image_id", "target"]].reset_index(drop=True)
    rank_ids = set(images.loc[role == "rank", "image_id"].astype(int))
    rankings = {"in_sample": heads}
    if rank_ids:
        rank_images = images[images["image_id"].astype(int).isin(rank_ids)]
        held = imp.summarize_importance(image_heads[image_heads["image_id"].astype(int).isin(rank_ids)], rank_images, n_boot=0)
        rankings = {"held_out": held, **rankings}
    steps = imp.default_steps(len(heads), ctx.settings.curve_points)
    # The metrics this run measured (each objective has its own), and the random baseline.
    metrics = [m for m in CURVE_METRICS if m == "random" or m in heads.columns]
    plan = imp.ranking_curve_plan(ctx.vit, rankings, metrics, steps=steps, seed=ctx.settings.seed, objective=ctx.settings.measure)
    return CurveWork(plan, subset, len(rank_ids), len(images))


#: The curve images are cut into at least this many groups (when there are that many images), so
#: that the ranks of a job share them evenly; the groups do not depend on the job's size.
CURVE_GROUPS = 32


def curve_groups(n: int, batch_size: int) -> list[tuple[int, int]]:
    """``(start, stop)`` rows of each group of the ``n`` curve images: equal groups of at most
    ``batch_size`` rows, and at least :data:`CURVE_GROUPS` of them."""
    count = max(-(-n // batch_size), min(n, CURVE_GROUPS))
    size = -(-n // count) if count else 0
    return [(i, min(i + size, n)) for i in range(0, n, size)] if size else []


def turns_path(ctx: RunContext) -> Path:
    """The counter the ranks take curve groups by (reset by rank 0 before the shared steps)."""
    return ctx.store.work_path("curves_next_group")


def curve_parts(ctx: RunContext, work: CurveWork) -> list[tuple[tuple[int, int], tuple[int, np.ndarray]]]:
    """This rank's share of the curves: ``((group, fold), batch sums)`` of each group it takes."""
    plan, subset = work.plan, work.subset
    groups = curve_groups(len(subset), ctx.settings.batch_size)
    parts = []
    for j in ctx.job.take_turns(turns_path(ctx), len(groups)):
        rows = subset.iloc[groups[j][0] : groups[j][1]]
        for g, (vit, pos) in enumerate(ctx.readout.groups(rows["image_id"].tolist())):  # (a probe: one fold at a time)
            for batch in ctx.target_batches(rows.iloc[pos]):
                parts.append(((j, g), plan.batch_sums(vit, batch)))
    return parts


def curves_table(work: CurveWork, parts: list) -> pd.DataFrame:
    """The curves table from every rank's :func:`curve_parts`, summed in group order whichever rank
    evaluated each group: the same table for any job size."""
    ordered = sorted(parts, key=lambda p: p[0])
    df = imp.ranking_curves_table(work.plan, [p for _, p in ordered])
    df["n_rank_images"] = np.where(df["ranking"] == "held_out", work.n_rank_images, work.n_images)
    return df

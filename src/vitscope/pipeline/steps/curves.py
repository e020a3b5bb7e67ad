"""Final step 3: cumulative head-pruning curves, held out and in sample.

The most expensive final step (about one forward per curve point, metric and curve image), so in a
parallel job every rank evaluates a share of the curve images' batches; rank 0 adds the shares in
batch order, which gives the one-process table bit for bit.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from vitscope.analysis import importance as imp
from vitscope.pipeline.context import RunContext

#: Importance metrics whose cumulative pruning curves are computed (plus a random baseline).
CURVE_METRICS: tuple[str, ...] = (*imp.METRICS, "random")


def curve_plan(ctx: RunContext, images: pd.DataFrame, image_heads: pd.DataFrame, heads: pd.DataFrame) -> tuple[imp.CurvePlan, pd.DataFrame, int, int]:
    """What the curves measure: ``(plan, evaluation images, number of ranking images, of images)``.

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
    return plan, subset, len(rank_ids), len(images)


def curves(ctx: RunContext, plan: imp.CurvePlan, subset: pd.DataFrame, n_rank_images: int, n_images: int) -> pd.DataFrame:
    """The curves table; call it on every rank of a job (each evaluates the batches it owns)."""
    job, b = ctx.job, ctx.settings.batch_size
    owned = [j for j in range(-(-len(subset) // b)) if job.owns(j)]

    def share() -> list[tuple[tuple[int, int], tuple[int, np.ndarray]]]:
        parts = []
        for j in owned:  # one batch per group of rows, so the groups are the same for any job size
            rows = subset.iloc[j * b : (j + 1) * b]
            for g, (vit, pos) in enumerate(ctx.readout.groups(rows["image_id"].tolist())):  # (a probe: one fold at a time)
                for batch in ctx.target_batches(rows.iloc[pos]):
                    parts.append(((j, g), plan.batch_sums(vit, batch)))
        return parts

    parts = sorted((p for rank_parts in job.everyone(share) for p in rank_parts), key=lambda p: p[0])
    df = imp.ranking_curves_table(plan, [p for _, p in parts])
    df["n_rank_images"] = np.where(df["ranking"] == "held_out", n_rank_images, n_images)
    return df

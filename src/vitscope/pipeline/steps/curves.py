"""Final step 3: cumulative head-pruning curves, held out and in sample."""

from __future__ import annotations

import numpy as np
import pandas as pd

from vitscope.analysis import importance as imp
from vitscope.pipeline.context import RunContext

#: Importance metrics whose cumulative pruning curves are computed (plus a random baseline).
CURVE_METRICS: tuple[str, ...] = (*imp.METRICS, "random")


def curves(ctx: RunContext, images: pd.DataFrame, image_heads: pd.DataFrame, heads: pd.DataFrame) -> pd.DataFrame:
    """Held-out curves (heads ranked on the ``rank`` images, measured on the ``evaluate`` ones) and,
    for comparison, in-sample curves (ranked on every image, these included), in one pass."""
    role = ctx.curve_split(images)
    subset = images[role == "evaluate"]
    rank_ids = set(images.loc[role == "rank", "image_id"].astype(int))
    rankings = {"in_sample": heads}
    if rank_ids:
        rank_images = images[images["image_id"].astype(int).isin(rank_ids)]
        held = imp.summarize_importance(image_heads[image_heads["image_id"].astype(int).isin(rank_ids)], rank_images, n_boot=0)
        rankings = {"held_out": held, **rankings}
    steps = imp.default_steps(len(heads), ctx.settings.curve_points)
    # The metrics this run measured (each objective has its own), and the random baseline.
    metrics = [m for m in CURVE_METRICS if m == "random" or m in heads.columns]
    df = imp.pruning_curves_by_ranking(ctx.vit, ctx.target_batches(subset), rankings, metrics, steps=steps, seed=ctx.settings.seed,
                                       objective=ctx.settings.objective)
    df["n_rank_images"] = np.where(df["ranking"] == "held_out", len(rank_ids), len(images))
    return df

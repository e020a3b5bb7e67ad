"""Final step 5: the image overview, a seeded 2-D layout of the images by their heads' pruning response."""

from __future__ import annotations

import numpy as np
import pandas as pd

from vitscope.pipeline.batch import patterns_module
from vitscope.pipeline.context import RunContext


def overview(ctx: RunContext, images: pd.DataFrame, image_heads: pd.DataFrame) -> np.ndarray:
    """``(N images, 2)`` in images row order; written as the ``overview`` array."""
    st = ctx.store
    if st.has_array("overview"):
        return st.array("overview")[...]
    L, H = ctx.vit.num_layers, ctx.vit.num_heads
    # Each image's response to pruning each head: the target's pruned probability, or under the
    # embedding objective how far pruning moves its embedding.
    column = "pruned_prob" if "pruned_prob" in image_heads.columns else "embedding_change"
    mat = image_head_matrix(images, image_heads, column, L, H)
    xy = np.asarray(patterns_module().image_overview(mat, seed=ctx.settings.seed), dtype=np.float64)
    st.write_array("overview", xy, attrs={"dims": ["image", "xy"], "image_order": "images.parquet rows"})
    return xy


def image_head_matrix(images: pd.DataFrame, image_heads: pd.DataFrame, column: str, L: int, H: int) -> np.ndarray:
    """``image_heads[column]`` as ``(N images, L*H)`` in images row order, column ``layer*H + head``."""
    pos = pd.Series(np.arange(len(images)), index=images["image_id"].to_numpy())
    rows = pos.loc[image_heads["image_id"].to_numpy()].to_numpy()
    out = np.full((len(images), L * H), np.nan)
    out[rows, image_heads["layer"].to_numpy() * H + image_heads["head"].to_numpy()] = image_heads[column].to_numpy(dtype=np.float64)
    return out

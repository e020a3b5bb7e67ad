"""Final step 2: one row per head (importance with bootstrap intervals, strength) and metric agreement."""

from __future__ import annotations

import warnings

import pandas as pd

from vitscope.analysis import importance as imp
from vitscope.analysis import strength as stg
from vitscope.pipeline.context import RunContext


def summaries(ctx: RunContext, images: pd.DataFrame, image_heads: pd.DataFrame) -> pd.DataFrame:
    """The ``heads`` table (without pattern columns); writes ``agreement`` when it is not there."""
    s = ctx.settings
    importance = imp.summarize_importance(image_heads, images, n_boot=s.n_boot, seed=s.seed)
    strength = stg.summarize_strength(image_heads).drop(columns=["n_images"])
    heads = importance.merge(strength, on=["layer", "head"], how="left", validate="one_to_one")
    # Without a label an image's "accuracy" is agreement with the unpruned prediction: say per
    # run which one the metrics measure, and how many images had a label.
    n_labelled = int(images["label"].notna().sum())
    target = "label" if n_labelled == len(images) else "prediction" if n_labelled == 0 else "mixed"
    if s.objective == "embedding":
        target = "embedding"  # no class is measured: the metrics compare embeddings
    at = heads.columns.get_loc("n_images") + 1
    heads.insert(at, "n_labelled", n_labelled)
    heads.insert(at + 1, "target", target)
    if target == "mixed":  # (never under the embedding objective)
        from vitscope.data import VitscopeDataWarning

        warnings.warn(
            f"{n_labelled} of {len(images)} images have a label: for the others the importance metrics measure the "
            "unpruned prediction (agreement and its probability), not the label; heads.target says 'mixed'. "
            "Analyse the labelled and the unlabelled images as two runs to keep them apart.",
            VitscopeDataWarning, stacklevel=2,
        )
    if ctx.store.has_table("readout_image_heads") and not ctx.store.has_table("readout_heads"):
        # The readout layers' heads, summarised like the model's (layer = readout layer).
        rih = ctx.store.read_table("readout_image_heads").rename(columns={"readout_layer": "layer"})
        rh = imp.summarize_importance(rih, images, n_boot=s.n_boot, seed=s.seed).rename(columns={"layer": "readout_layer"})
        ctx.store.write_table("readout_heads", rh)
    if not ctx.store.has_table("agreement"):
        ctx.store.write_table("agreement", imp.metric_agreement(heads, [m for m in imp.METRICS if m in heads.columns]))
    return heads

"""Final step 6 (``--interactions``): the second paper's set-level results.

The chunks' interaction and field statistics merged in chunk order, the interaction and field
tables, the window-design and patch-removal curves (ranked on one half of the curve images,
measured on the other), and the estimate-vs-knock-out agreement, written last.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import torch

from vitscope.pipeline.context import RunContext
from vitscope.store.errors import NotARunError
from vitscope.store.layout import INTERACTION_STATE

#: False-discovery level of the interaction and field significance tests.
INTERACTION_Q = 0.05
#: Zarr array of the interaction summary -> its key in ``InteractionAccumulator.summary()``.
INTERACTION_ARRAYS = {
    "mean": "interaction_mean",
    "std": "interaction_std",
    "sem": "interaction_sem",
    "p_value": "interaction_p",
    "q_value": "interaction_q",
    "significant": "interaction_significant",
    "q_value_all": "interaction_q_all",
    "significant_all": "interaction_significant_all",
    "zero_spread": "interaction_zero_spread",
    "abs_mean": "interaction_abs_mean",
}
#: Estimate-vs-knock-out agreement: images, random patch queries per layer (plus CLS), and at most
#: this many random keys per layer (all keys on grids up to this size): knock-outs cost one forward each.
AGREEMENT_IMAGES = 4
AGREEMENT_QUERIES = 2
AGREEMENT_KEYS = 64


def merged_interaction_state(ctx: RunContext) -> tuple[Any, Any]:
    """The ``(InteractionAccumulator, FieldAccumulator)`` over every chunk, merged in chunk order."""
    from vitscope.analysis.fields import FieldAccumulator
    from vitscope.analysis.interaction import InteractionAccumulator

    vit = ctx.vit
    inter, field = InteractionAccumulator.for_model(vit), FieldAccumulator(vit.num_layers, vit.layout)
    for i in range(ctx.n_chunks):
        path = ctx.store.chunk_dir(i) / INTERACTION_STATE
        if not path.is_file():
            raise NotARunError(f"{ctx.store.path} lacks the interaction statistics of chunk {i} ({path}); the folder is damaged: rerun with --overwrite")
        with np.load(path) as z:
            state = {k: z[k] for k in z.files}

        def part(prefix: str) -> dict[str, np.ndarray]:
            return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}

        inter.merge(InteractionAccumulator.from_state(part("interaction.")))
        field.merge(FieldAccumulator.from_state(part("field."), vit.layout))
    return inter, field


def interactions(ctx: RunContext, images: pd.DataFrame) -> None:
    """Paper 2's set-level outputs; each part is skipped when written, ``interaction_agreement`` last."""
    from vitscope.analysis import fields as fld
    from vitscope.analysis import interaction as itr
    from vitscope.analysis import windows as win

    st, s, vit = ctx.store, ctx.settings, ctx.vit
    lay = vit.layout
    P = lay.num_patches
    if st.has_table("interaction_agreement"):
        return
    if not st.has_array("interaction_key_importance"):
        parts = [st.read_chunk_array(i, "interaction_key_importance") for i in range(ctx.n_chunks) if st.has_chunk_array(i, "interaction_key_importance")]
        st.write_array("interaction_key_importance", np.concatenate(parts), chunks=(min(len(images), 1024), P),
                       attrs={"dims": ["image", "key_patch"], "image_order": "images.parquet rows",
                              "what": "first-order impact of each key patch summed over queries and layers"})
    if not st.has_table("field_layers"):  # written last in this block
        inter, field = merged_interaction_state(ctx)
        summ = inter.summary(q=INTERACTION_Q)
        attrs = {"dims": ["layer", "query_patch", "key_patch"], "images": int(inter.count), "q": INTERACTION_Q}
        for key, name in INTERACTION_ARRAYS.items():
            data = np.asarray(summ[key])
            st.write_array(name, data.astype(np.uint8) if data.dtype == bool else data, chunks=(1, P, P), attrs=attrs)
        st.write_table("interaction_layers", itr.interaction_layer_table(summ, lay))
        fs = field.summary(q=INTERACTION_Q)
        for k in ("dx", "dy", "size"):
            st.write_array(f"field_image_{k}", np.asarray(fs[k], dtype=np.float64),
                           attrs={"dims": ["layer", "query_patch"], "what": f"mean per-image responsive-field {k}"})
        st.write_table("field_image_queries", fld.field_frame(fs, lay))
        st.write_table("field_image_layers", fld.field_layer_summary(fs, lay))
        _, stats = fld.responsive_fields(summ, lay)
        st.write_table("field_queries", fld.field_frame(stats, lay))
        st.write_table("field_layers", fld.field_layer_summary(stats, lay))
    fit, evaluate = ctx.interaction_subsets(images)
    if len(fit) >= 2 and len(evaluate) >= 1 and not (st.has_table("window_curve") and st.has_table("removal_curve")):
        # Rankings come from the fit half only, so the curves measure them on images they never saw.
        acc = itr.InteractionAccumulator.for_model(vit)
        for x, t in ctx.target_batches(fit):
            acc.update(itr.first_order_impact(vit, x, t))
        ranking = acc.summary(q=INTERACTION_Q)
        if not st.has_table("window_curve"):
            st.write_table("window_curve", win.window_curve(vit, ctx.target_batches(evaluate), ranking["mean"], seed=s.seed))
        if not st.has_table("removal_curve"):
            rc = win.removal_curve(vit, ctx.target_batches(evaluate), dataset_scores=ranking["key_importance_mean"],
                                   seeds=(s.seed, s.seed + 1, s.seed + 2))
            st.write_table("removal_summary", win.removal_summary(rc))
            st.write_table("removal_curve", rc)
    pick = (evaluate if len(evaluate) else images).iloc[:AGREEMENT_IMAGES]
    xs, ts = zip(*ctx.target_batches(pick))
    agreement = itr.knockout_agreement(vit, torch.cat(xs), torch.cat(ts), queries_per_layer=min(AGREEMENT_QUERIES, P),
                                       keys=None if P <= AGREEMENT_KEYS else AGREEMENT_KEYS, seed=s.seed)
    agreement.insert(2, "image_id", pick["image_id"].to_numpy(dtype=np.int64)[agreement["image"].to_numpy()])
    st.write_table("interaction_agreement", agreement)

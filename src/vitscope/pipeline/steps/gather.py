"""Final step 1: the chunks' parts gathered into ``image_heads``, the images rows and the run's arrays."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np
import pandas as pd

from vitscope.pipeline.context import RunContext
from vitscope.store import files
from vitscope.store.layout import EXPLAIN_TABLES


def gather(ctx: RunContext) -> tuple[pd.DataFrame, pd.DataFrame, list[dict[str, Any]]]:
    """Chunk parts -> ``image_heads.parquet``, the images table (without overview) and the arrays
    (``pattern_inputs/*`` concatenated, ``attention_mean`` from the chunks' sums in chunk order)."""
    st, vit = ctx.store, ctx.vit
    # Chunks stay until the run is complete, so their failure lists are always there to read.
    failures = [f for i in range(ctx.n_chunks) for f in st.read_chunk_meta(i)["failures"]]
    base_path = st.work_path("images_base.parquet")
    if base_path.is_file():  # written last by this step
        return files.read_parquet(base_path), st.read_table("image_heads"), failures
    with_rows = [i for i in range(ctx.n_chunks) if (st.chunk_dir(i) / "images.parquet").is_file()]
    if not with_rows:
        reasons = "; ".join(f"{f['path']}: {f['reason']}" for f in failures[:5])
        raise ValueError(f"none of the {len(ctx.records)} images could be read ({reasons}{' ...' if len(failures) > 5 else ''})")
    images = pd.concat([st.read_chunk_table(i, "images") for i in with_rows], ignore_index=True)
    images.insert(3, "label_name", [_name(ctx.image_set.class_names, v) for v in images["label"]])
    if "prediction" in images.columns:  # (runs under the embedding objective have no prediction)
        images.insert(5, "prediction_name", [_name(vit.class_names, v) for v in images["prediction"]])
    image_heads = pd.concat([st.read_chunk_table(i, "image_heads") for i in with_rows], ignore_index=True)
    n = len(images)
    H = vit.num_heads
    per_image = [f"pattern_inputs/{k}" for k in ("offset", "patch", "cls")] + [f"explain/{m}" for m in ctx.settings.explain]
    per_image.append("readout_attention")  # (models whose readout attends)
    for name in [n for n in per_image if st.has_chunk_array(with_rows[0], n)]:
        if st.has_array(name):
            continue
        first = st.read_chunk_array(with_rows[0], name)
        dims = ["image", "layer", "head", "channel", "y", "x"] if name.startswith("pattern_inputs/") else ["image", "row", "col"]
        if name == "readout_attention":
            dims = ["image", "readout_layer", "head", "query", "key"]
        attrs = {"dims": dims, "image_order": "images.parquet rows"}
        if name == "readout_attention":
            attrs["what"] = "attention of each readout layer (CaiT class attention, attention pooling); keys per ViT.readout_layout"
        if name.startswith("explain/"):
            attrs["what"] = f"{name.split('/', 1)[1]} explanation of each image's target over the patch grid"
        chunk_shape = (min(n, ctx.settings.batch_size), *([1] if len(first.shape) > 3 else []), *first.shape[2 if len(first.shape) > 3 else 1:])
        with st.new_array(name, (n, *first.shape[1:]), first.dtype, chunks=chunk_shape, attrs=attrs) as arr:
            pos = 0
            for i in with_rows:  # one chunk in memory at a time
                part = st.read_chunk_array(i, name)
                arr[pos : pos + len(part)] = part
                pos += len(part)
    if not st.has_array("attention_mean") and st.has_chunk_array(with_rows[0], "attention_sum"):
        total = np.zeros((vit.num_layers, H, vit.num_tokens, vit.num_tokens))
        for i in with_rows:  # in chunk order, one chunk in memory at a time
            total = total + st.read_chunk_array(i, "attention_sum")
        st.write_array(
            "attention_mean",
            (total / n).astype(np.float32),
            chunks=(1, H, *total.shape[2:]),
            attrs={"dims": ["layer", "head", "query", "key"], "images": n, "what": "mean post-softmax attention over the analysed images"},
        )
    readout = [st.read_chunk_table(i, "readout_image_heads") for i in with_rows if (st.chunk_dir(i) / "readout_image_heads.parquet").is_file()]
    if readout:
        st.write_table("readout_image_heads", pd.concat(readout, ignore_index=True))
    if ctx.settings.explain_faithfulness:  # (an older run's table goes with --overwrite: the store's clear)
        explain_faithfulness(ctx, images)
    st.write_table("image_heads", image_heads)
    files.write_parquet(base_path, images)  # written last: it marks the gather step as done
    return images, image_heads, failures


def explain_faithfulness(ctx: RunContext, images: pd.DataFrame) -> None:
    """Score every stored explanation map (``explain/<method>``, rows in ``images`` order) into the
    ``explain_faithfulness`` table: one row per (image, method) with the AUCs of
    :func:`vitscope.analysis.faithfulness.faithfulness_aucs`, the explained class and the accuracy
    reference both being the image's target.

    The images are decoded again one batch (``batch_size`` images) at a time; each batch's rows
    are kept in ``work/`` as they are scored, so a resumed run neither decodes nor scores the
    batches it had finished (the scoring costs about 45 forwards per image and method, far more
    than the rest of the step).
    """
    import torch

    from vitscope.analysis import faithfulness as fth

    st, vit = ctx.store, ctx.vit
    if st.has_table(EXPLAIN_TABLES[0]):
        return
    methods = list(ctx.settings.explain)
    # Families that cannot run on a shortened sequence get NaN in the tokens columns.
    forms = fth.REMOVAL_FORMS if fth.supports_token_dropping(vit) else ("pixels",)
    row_of = {int(i): r for r, i in enumerate(images["image_id"])}
    targets = images["target"].to_numpy(dtype=np.int64)
    by_id = {r.image_id: r for r in ctx.records}
    records = [by_id[int(i)] for i in images["image_id"]]
    parts: list[pd.DataFrame] = []
    size = ctx.settings.batch_size
    with ctx.clock("explain_faithfulness"):
        for start in range(0, len(records), size):
            group = records[start : start + size]
            path = st.work_path(f"{EXPLAIN_TABLES[0]}/{int(group[0].image_id):08d}.parquet")
            if path.is_file():
                parts.append(files.read_parquet(path))
                continue
            group_parts = []
            for b in ctx.decode(group, lambda rec, why: None):  # one group in memory at a time
                rows = np.asarray([row_of[int(i)] for i in b.image_ids], dtype=np.int64)
                maps = {m: torch.as_tensor(np.asarray(st.array(f"explain/{m}").oindex[rows])) for m in methods}
                aucs = fth.faithfulness_aucs(vit, b.x, maps, torch.as_tensor(targets[rows]), forms=forms)
                group_parts.append(fth.faithfulness_table(images["image_id"].to_numpy()[rows], aucs))
            if group_parts:
                part = pd.concat(group_parts, ignore_index=True)
                files.write_parquet(path, part)
                parts.append(part)
    table = pd.concat(parts, ignore_index=True) if parts else fth.faithfulness_table([], {m: {} for m in methods})
    scored = set(table["image_id"].astype(int))
    if scored != set(row_of):
        missing = sorted(set(row_of) - scored)[:5]
        raise ValueError(f"images {missing} could not be decoded again to score their explanations; rerun the command to retry")
    st.write_table(EXPLAIN_TABLES[0], table)


def _name(names: Optional[Sequence[str]], v: Any) -> Optional[str]:
    if names is None or v is None or pd.isna(v):
        return None
    v = int(v)
    return names[v] if 0 <= v < len(names) else None

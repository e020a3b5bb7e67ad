"""The final steps of ``analyze``, one module each, run in order by :func:`finish`.

Each expensive step writes its result before the next starts and is skipped when the result
exists, and every step is seeded, so a resumed run ends equal to an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import time
from typing import Iterator

import numpy as np
import pandas as pd

from vitscope.core.progress import Progress
from vitscope.pipeline.context import RunContext
from vitscope.pipeline.steps.curves import curves
from vitscope.pipeline.steps.gather import gather
from vitscope.pipeline.steps.interactions import interactions
from vitscope.pipeline.steps.model_masks import model_masks
from vitscope.pipeline.steps.overview import overview
from vitscope.pipeline.steps.patterns import patterns
from vitscope.pipeline.steps.summaries import summaries
from vitscope.store.manifest import completed_manifest


def finish(ctx: RunContext, prog: Progress) -> None:
    """Every final step, then the final tables and the completed manifest; the chunks go last."""
    cats = ctx.catalogues()
    names = ["gather", "summaries", "curves", *[f"patterns ({k})" for k in cats], "overview",
             *(["interactions"] if ctx.settings.interactions else []), "tables"]
    task = prog.add_task("final steps", total=len(names))
    st = ctx.store

    @contextlib.contextmanager
    def step(name: str, what: str) -> Iterator[None]:
        prog.update(task, description=f"final steps: {what}")
        with ctx.clock(name):
            yield
        prog.advance(task)

    with step("gather", "gathering chunks"):
        images_base, image_heads, failures = gather(ctx)
    with step("summaries", "head summaries"):
        heads = summaries(ctx, images_base, image_heads)
    with step("curves", "pruning curves"):
        if not st.has_table("curves"):
            st.write_table("curves", curves(ctx, images_base, image_heads, heads))
    pattern_frames, cluster_frames, dominant = [], [], []
    for kind, input_kind in cats.items():
        with step(f"patterns_{kind}", f"{kind} attention patterns"):
            maps, clusters, dom = patterns(ctx, kind, input_kind, images_base)
        pattern_frames.append(maps)
        cluster_frames.append(clusters)
        dominant.append(dom)
    with step("overview", "image overview"):
        xy = overview(ctx, images_base, image_heads)
    if ctx.settings.interactions:
        with step("interactions", "patch interactions"):
            interactions(ctx, images_base)

    prog.update(task, description="final steps: writing tables")
    start = time.perf_counter()
    for dom in dominant:
        heads = heads.merge(dom, on=["layer", "head"], how="left", validate="one_to_one")
    images = images_base.copy()
    images["curve_split"] = ctx.curve_split(images_base)
    images["overview_x"] = xy[:, 0].astype(np.float64)
    images["overview_y"] = xy[:, 1].astype(np.float64)
    st.write_table("patterns", pd.concat(pattern_frames, ignore_index=True))
    st.write_table("pattern_clusters", pd.concat(cluster_frames, ignore_index=True))
    st.write_table("heads", heads)
    st.write_table("images", images)
    model_masks(ctx)
    ctx.timings["tables"] = time.perf_counter() - start
    manifest = completed_manifest(
        ctx.manifest, failures=failures, listed=len(ctx.records), analysed=int(len(images)),
        patterns={kind: {"input": inp} for kind, inp in cats.items()},
        timings={k: round(v, 3) for k, v in ctx.timings.items()},
    )
    st.write_manifest(manifest)
    ctx.manifest = manifest
    st.remove_chunks()
    prog.advance(task)
    prog.update(task, description="final steps: done")

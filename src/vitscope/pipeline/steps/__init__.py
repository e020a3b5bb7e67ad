"""The final steps of ``analyze``, one module each, run in order by :func:`finish`.

Each expensive step writes its result before the next starts and is skipped when the result
exists, and every step is seeded, so a resumed run ends equal to an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Iterator, Optional

import numpy as np
import pandas as pd

from vitscope.core.progress import Progress
from vitscope.pipeline.context import RunContext
from vitscope.pipeline.distributed import reset_turns
from vitscope.pipeline.steps.curves import curve_parts, curve_plan, curves_table, turns_path
from vitscope.pipeline.steps.gather import gather
from vitscope.pipeline.steps.interactions import interactions
from vitscope.pipeline.steps.model_masks import model_masks
from vitscope.pipeline.steps.overview import overview
from vitscope.pipeline.steps.patterns import catalogue_arrays, pattern_tables
from vitscope.pipeline.steps.summaries import summaries
from vitscope.store.manifest import completed_manifest


def finish(ctx: RunContext, prog: Progress) -> None:
    """Every final step, then the final tables and the completed manifest; the chunks go last.

    Call it on every rank of a job: rank 0 runs the steps, except the curves and the pattern
    catalogues, which every rank shares (see :mod:`vitscope.pipeline.distributed`).
    """
    job = ctx.job
    cats = ctx.catalogues()
    names = ["gather", "summaries", "curves", "patterns", "overview",
             *(["interactions"] if ctx.settings.interactions else []), "tables"]
    task = prog.add_task("final steps", total=len(names))
    st = ctx.store

    @contextlib.contextmanager
    def step(name: str, what: str) -> Iterator[None]:
        prog.update(task, description=f"final steps: {what}")
        with ctx.clock(name):
            yield
        prog.advance(task)

    def first_steps() -> tuple[pd.DataFrame, pd.DataFrame, list, pd.DataFrame, Optional[tuple]]:
        with step("gather", "gathering chunks"):
            images_base, image_heads, failures = gather(ctx)
        with step("summaries", "head summaries"):
            heads = summaries(ctx, images_base, image_heads)
        plan = None if st.has_table("curves") else curve_plan(ctx, images_base, image_heads, heads)
        reset_turns(turns_path(ctx))
        return images_base, image_heads, failures, heads, plan

    # Rank 0 gathers; the others get only what their share of the curves needs.
    if job.world == 1:
        images_base, image_heads, failures, heads, plan = first_steps()
    else:
        kept: dict = {}
        plan = job.from_main(lambda: kept.setdefault("first", first_steps())[4])
        if job.is_main:
            images_base, image_heads, failures, heads, _ = kept["first"]
    # The shared steps, in one exchange so that no rank waits for another in between (and an error
    # on any rank reaches them all): each rank trains its pattern catalogues (arrays into the store;
    # rank 0 reads them back), then takes groups of curve images until none is left.
    def shared_steps() -> list:
        with step("patterns", f"attention patterns ({', '.join(cats)})"):
            for i, (kind, inp) in enumerate(cats.items()):
                if job.owns(i):
                    catalogue_arrays(ctx, kind, inp)
        with step("curves", "pruning curves"):
            return [] if plan is None else curve_parts(ctx, plan)

    parts = [p for rank_parts in job.everyone(shared_steps) for p in rank_parts]
    if plan is not None and job.is_main:
        st.write_table("curves", curves_table(plan, parts))
    job.from_main(lambda: _finish_main(ctx, prog, task, step, images_base, image_heads, failures, heads))


def _finish_main(ctx: RunContext, prog: Progress, task: Any, step: Any, images_base: pd.DataFrame, image_heads: pd.DataFrame,
                 failures: list, heads: pd.DataFrame) -> None:
    """The final steps after the shared ones, on rank 0 alone."""
    st, cats = ctx.store, ctx.catalogues()
    pattern_frames, cluster_frames, dominant = [], [], []
    for kind in cats:
        maps, clusters, dom = pattern_tables(ctx, kind, images_base)
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

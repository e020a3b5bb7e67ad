"""The chunked stage of ``analyze``: each chunk of images analysed and published as one folder.

The image list is cut into fixed chunks of ``batch_size`` images (chunk ``i`` is always the same
images). Each chunk holds its own partial sums (attention, interaction statistics), merged in chunk
order by the final steps: no chunk depends on another, so any one can be redone alone, and a killed
run resumes at the chunks that are not there.
"""

from __future__ import annotations

import io
import warnings
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from vitscope.core.progress import Progress
from vitscope.pipeline.batch import BatchResult, analyze_batch, merge_batch_results
from vitscope.pipeline.context import RunContext
from vitscope.pipeline.distributed import reset_turns
from vitscope.store.errors import DamagedChunkWarning, NotARunError
from vitscope.store.layout import INTERACTION_STATE
from vitscope.store.manifest import now_iso

if TYPE_CHECKING:  # pragma: no cover
    from vitscope.data import Batch, ImageRecord


def verified_done_chunks(ctx: RunContext, prog: Progress) -> set[int]:
    """The finished chunks a resume can trust; damaged ones are removed, reported and listed in the
    manifest's ``redone_chunks``."""
    store = ctx.store
    done = set(store.done_chunks())
    bad = [i for i in done if i >= ctx.n_chunks]
    if bad:
        raise NotARunError(
            f"{store.path}/chunks holds chunks {sorted(bad)} beyond this run's {ctx.n_chunks} chunks; "
            "the folder is damaged: rerun with --overwrite"
        )
    # A chunk is trusted only when every file it lists is there, whole (size and SHA-256): a
    # power loss or a hand can damage a finished chunk, and zarr would read a lost file as zeros.
    redone = []
    for i in sorted(done):
        why = store.verify_chunk(i)
        if why is not None:
            message = f"chunk {i} ({len(ctx.chunk_records(i))} images) of {store.path} is damaged: {why}; analysing it again"
            prog.log(message)
            warnings.warn(message, DamagedChunkWarning, stacklevel=3)
            store.remove_chunk(i)
            done.discard(i)
            redone.append({"chunk": i, "reason": why, "when": now_iso()})
    if redone:
        ctx.manifest["redone_chunks"] = [*ctx.manifest.get("redone_chunks", []), *redone]
        store.write_manifest(ctx.manifest)
    return done


def run_chunks(ctx: RunContext, prog: Progress) -> None:
    """Analyse and publish every chunk that is not already done (in a parallel job: this rank's share)."""
    job = ctx.job
    turns = ctx.store.work_path("chunks_next")

    def start() -> set[int]:
        done = verified_done_chunks(ctx, prog)
        reset_turns(turns)
        return done

    done = job.from_main(start)
    n_done_images = sum(len(ctx.chunk_records(i)) for i in done)
    task = prog.add_task("analysing images", total=len(ctx.records), completed=n_done_images)
    if done:
        prog.log(f"resuming: {len(done)} of {ctx.n_chunks} chunks already done")
    if job.world > 1:
        prog.log(f"{job.world} processes share the chunks (each takes the next one when it is free); this bar shows rank 0's")
    todo = [i for i in range(ctx.n_chunks) if i not in done]
    for turn in job.take_turns(turns, len(todo)):
        i = todo[turn]
        records = ctx.chunk_records(i)
        failures: list[dict[str, Any]] = []

        def on_failure(rec: "ImageRecord", reason: str) -> None:
            failures.append({"image_id": rec.image_id, "path": rec.location, "reason": reason, "stage": "decode"})
            prog.log(f"skipped {rec.location}: {reason}")

        with ctx.clock("decode"):
            batches = ctx.decode(records, on_failure)
        results = [analyze_rows(ctx, b) for b in batches]
        blobs = {}
        if ctx.settings.interactions:
            with ctx.clock("interactions"):
                blobs[INTERACTION_STATE] = interaction_chunk(ctx, batches, results)
        with ctx.clock("write_chunks"):
            write_chunk(ctx, i, records, batches, results, failures, blobs)
        prog.advance(task, len(records))


def analyze_rows(ctx: RunContext, b: "Batch") -> BatchResult:
    """:func:`analyze_batch` of one decoded batch, each image scored by its own model view (under a
    cross-fitted probe, the rows of each fold go through that fold's probe)."""
    s = ctx.settings
    parts = []
    for vit, rows in ctx.readout.groups(b.image_ids):
        whole = len(rows) == len(b.image_ids)
        x, labels = (b.x, b.labels) if whole else (b.x[torch.as_tensor(rows)], b.labels[torch.as_tensor(rows)])
        ids = list(b.image_ids) if whole else [b.image_ids[i] for i in rows]
        parts.append((rows, analyze_batch(vit, x, labels, ids, pattern_size=s.pattern_size, explain=s.explain, objective=s.measure,
                                          stream_dtype=s.stream_dtype, timings=ctx.timings)))
    return merge_batch_results(parts)


def write_chunk(ctx: RunContext, index: int, records: Sequence["ImageRecord"], batches: Sequence["Batch"],
                results: Sequence[BatchResult], failures: list[dict[str, Any]], blobs: Mapping[str, bytes]) -> None:
    """One chunk's rows, arrays, failures and blobs, published atomically as ``chunks/<index>``."""
    if results:
        images = pd.concat([r.images for r in results], ignore_index=True)
        image_heads = pd.concat([r.image_heads for r in results], ignore_index=True)
        arrays = {k: np.concatenate([r.arrays[k] for r in results]) for k in results[0].arrays if k != "attention_sum"}
        if "attention_sum" in results[0].arrays:  # (not kept for long sequences)
            arrays["attention_sum"] = np.sum([r.arrays["attention_sum"] for r in results], axis=0)
    else:
        images, image_heads, arrays = None, None, {}
    tables = {}
    if images is not None:
        by_id = {r.image_id: r for r in records}
        images.insert(1, "path", [str(by_id[i].path) for i in images["image_id"]])
        column = 2
        if any(r.member is not None for r in records):
            images.insert(column, "member", [by_id[i].member for i in images["image_id"]])
            column += 1
        images.insert(column, "label", pd.array([by_id[i].label for i in images["image_id"]], dtype="Int64"))
        tables = {"images": images, "image_heads": image_heads}
        for name in results[0].tables:  # (readout_image_heads)
            tables[name] = pd.concat([r.tables[name] for r in results], ignore_index=True)
    meta = {
        "chunk": index,
        "image_ids": [int(r.image_id) for r in records],
        "analysed": [int(i) for b in batches for i in b.image_ids],
        "failures": failures,
    }
    ctx.store.write_chunk(index, tables=tables, arrays=arrays, meta=meta, blobs=blobs)


def interaction_chunk(ctx: RunContext, batches: Sequence["Batch"], results: Sequence[BatchResult]) -> bytes:
    """First-order impacts of one chunk: per-image key importance goes into the chunk's arrays;
    the chunk's own interaction and field statistics are returned as ``.npz`` bytes (stored in the
    chunk, merged over chunks by the final steps)."""
    from vitscope.analysis.fields import FieldAccumulator
    from vitscope.analysis.interaction import InteractionAccumulator, first_order_impact, key_importance

    vit = ctx.vit
    inter, field = InteractionAccumulator.for_model(vit), FieldAccumulator(vit.num_layers, vit.layout)
    for b, res in zip(batches, results):
        r = first_order_impact(vit, b.x, np.array(res.images["target"], dtype=np.int64))
        inter.update(r)
        field.update(r["impact"])
        res.arrays["interaction_key_importance"] = key_importance(r["impact"], r["prefix_impact"]).astype(np.float32)
    state = {f"interaction.{k}": np.asarray(v) for k, v in inter.state().items()}
    state.update({f"field.{k}": np.asarray(v) for k, v in field.state().items()})
    buf = io.BytesIO()
    np.savez(buf, **state)
    return buf.getvalue()

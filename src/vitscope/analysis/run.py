"""`analyze`: every Paper 1 analysis over an image set, written to a resumable run folder.

Data flows one way: images -> model + probes -> per-chunk analyses -> run store.

1. **Chunks.** The image list is cut into fixed chunks of ``batch_size`` images (chunk ``i`` is
   always the same images, whatever happened before). For each chunk: one forward with
   :meth:`ViT.stream` hands every layer's attention to the strength measures and the pattern-input
   pooling (only one layer's attention is alive at a time); :func:`head_sweep` prunes every head;
   :func:`taylor_importance` adds the mask-gradient importance. The chunk's rows and arrays are
   written as one folder that appears atomically, so a killed run resumes at the first unfinished
   chunk and redoes nothing.
2. **Final steps.** Gather the chunks into ``image_heads`` and the zarr arrays; summarise
   importance (bootstrap intervals) and strength per head; metric agreement; cumulative pruning
   curves on a seeded image subset; pattern autoencoders (patch block and CLS maps), latent codes,
   2-D projection, density and clusters with decoded prototypes; the image overview; the final
   tables. Each expensive step writes its result before the next starts and is skipped when the
   result exists, and every step is seeded, so a resumed run ends equal to an uninterrupted one.

The run folder format is documented in docs/run-format.md; read it back with
:func:`vitscope.open_run`.
"""

from __future__ import annotations

import contextlib
import io
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Optional, Sequence, Union

import numpy as np
import pandas as pd
import torch

from vitscope.analysis import importance as imp
from vitscope.analysis import strength as stg
from vitscope.analysis.settings import AnalyzeSettings
from vitscope.store import files
from vitscope.store.errors import DamagedChunkWarning, NotARunError, RunMismatchError
from vitscope.store.lock import RunLock
from vitscope.store.layout import FORMAT, FORMAT_VERSION, STATUS_COMPLETE, STATUS_RUNNING
from vitscope.store.manifest import describe_mismatch, fingerprint, now_iso, package_versions
from vitscope.store.reader import Run, open_run
from vitscope.store.writer import RunStore

if TYPE_CHECKING:  # pragma: no cover
    from vitscope.data import Batch, ImageRecord, ImageSet
    from vitscope.models.vit import ViT

#: Importance metrics whose cumulative pruning curves are computed (plus a random baseline).
CURVE_METRICS: tuple[str, ...] = (*imp.METRICS, "random")


# ============================================================================ settings
#: False-discovery level of the interaction and field significance tests.
INTERACTION_Q = 0.05
#: Each chunk's own interaction and field statistics (``.npz``), merged over chunks at the end.
INTERACTION_STATE = "interaction_state.npz"
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
#: The Parquet tables written by ``interactions=True``.
INTERACTION_TABLES = (
    "interaction_layers",
    "field_image_queries",
    "field_image_layers",
    "field_queries",
    "field_layers",
    "window_curve",
    "removal_curve",
    "removal_summary",
    "interaction_agreement",
)


# ============================================================================ progress
class _NoProgress:
    """Stands in for a rich Progress when progress display is off."""

    def add_task(self, *_a: Any, **_k: Any) -> int:
        return 0

    def update(self, *_a: Any, **_k: Any) -> None:
        pass

    def advance(self, *_a: Any, **_k: Any) -> None:
        pass

    def log(self, *_a: Any, **_k: Any) -> None:
        pass


@contextlib.contextmanager
def _progress(enabled: bool, console: Any) -> Iterator[Any]:
    if not enabled:
        yield _NoProgress()
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    with Progress(
        SpinnerColumn(),
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
    ) as prog:
        yield _RichProgress(prog)


class _RichProgress:
    def __init__(self, prog: Any) -> None:
        self.prog = prog

    def add_task(self, description: str, total: Optional[float] = None, completed: float = 0) -> int:
        return self.prog.add_task(description, total=total, completed=completed)

    def update(self, task: int, **kw: Any) -> None:
        self.prog.update(task, **kw)

    def advance(self, task: int, n: float = 1) -> None:
        self.prog.advance(task, n)

    def log(self, *args: Any) -> None:
        self.prog.console.log(*args)


# ============================================================================ one batch
@dataclass
class BatchResult:
    """What one chunk of images contributes to a run."""

    images: pd.DataFrame
    image_heads: pd.DataFrame
    arrays: dict[str, np.ndarray]


def _patterns_module() -> Any:
    from vitscope.analysis import patterns

    return patterns


def analyze_batch(
    vit: "ViT",
    x: torch.Tensor,
    labels: torch.Tensor,
    image_ids: Sequence[int],
    *,
    pattern_size: int = 16,
    timings: Optional[dict[str, float]] = None,
) -> BatchResult:
    """Every per-image analysis of one batch.

    Args:
        x: preprocessed ``(B, C, H, W)`` images; ``labels``: class per image, ``-1`` = unknown (the
            model's own prediction then plays the label's part).
        image_ids: the images' ids, in batch order.

    Returns rows of ``images`` (``image_id, prediction, probability, target, base_prob,
    base_loss, correct``), rows of ``image_heads`` (one per image, layer, head) and arrays:
    ``pattern_inputs/<kind> (B, L, H, C, S, S)`` for every map kind of
    :func:`~vitscope.analysis.patterns.pattern_inputs` (``offset``, ``patch`` and, with a CLS
    token, ``cls``) and ``attention_sum (L, H, T, T)`` (float64 sum of the maps over the batch).
    """
    patterns = _patterns_module()
    L, H, T = vit.num_layers, vit.num_heads, vit.num_tokens
    B = int(x.shape[0])
    layout = vit.layout
    per_layer: list[Optional[dict[str, np.ndarray]]] = [None] * L
    pat: dict[str, list[Optional[np.ndarray]]] = {}
    attn_sum = torch.zeros(L, H, T, T, dtype=torch.float64)

    def on_attention(layer: int, attn: torch.Tensor) -> None:
        # Everything that needs the full maps is computed here, so no layer's maps outlive its block.
        per_layer[layer] = stg.attention_strength(attn, layout)
        for kind, maps in patterns.pattern_inputs(attn, layout, size=pattern_size).items():
            pat.setdefault(kind, [None] * L)[layer] = _to_numpy(maps)
        attn_sum[layer] = attn.detach().to(torch.float64).sum(dim=0).cpu()

    clock = _Clock(timings)
    with clock("stream"), torch.no_grad():
        vit.stream(x, on_attention=on_attention)
    with clock("head_sweep"):
        sweep = imp.head_sweep(vit, x, labels)
    with clock("taylor"):
        taylor = imp.taylor_importance(vit, x, torch.as_tensor(sweep["target"]))

    ids = np.asarray(list(image_ids), dtype=np.int64)
    logits = torch.as_tensor(sweep["base_logits"]).double()
    prediction = np.asarray(sweep["prediction"], dtype=np.int64)
    probability = logits.softmax(-1).numpy()[np.arange(B), prediction]
    images = pd.DataFrame(
        {
            "image_id": ids,
            "prediction": prediction,
            "probability": probability,
            "target": np.asarray(sweep["target"], dtype=np.int64),
            "base_prob": np.asarray(sweep["base_prob"], dtype=np.float64),
            "base_loss": np.asarray(sweep["base_loss"], dtype=np.float64),
            "correct": prediction == np.asarray(sweep["target"]),
        }
    )

    def flat(a: np.ndarray) -> np.ndarray:  # (B, L, H) -> (B*L*H,) in (image, layer, head) order
        return np.asarray(a).reshape(B * L * H)

    strength = {k: np.stack([per_layer[l][k] for l in range(L)], axis=1) for k in per_layer[0]}  # type: ignore[index]
    ih = pd.DataFrame(
        {
            "image_id": np.repeat(ids, L * H),
            "layer": np.tile(np.repeat(np.arange(L, dtype=np.int64), H), B),
            "head": np.tile(np.arange(H, dtype=np.int64), B * L),
            "pruned_prob": flat(sweep["pruned_prob"]),
            "pruned_loss": flat(sweep["pruned_loss"]),
            "pruned_correct": flat(sweep["pruned_correct"]).astype(bool),
            "layer_change": flat(sweep["layer_change"]),
            "layer_rel_l2": flat(sweep["layer_rel_l2"]),
            "taylor": flat(taylor).astype(np.float64),
        }
    )
    for name in stg.SCALAR_MEASURES:
        ih[name] = flat(strength[name])
    G = strength["hop_profile"].shape[-1]
    ih["hop_profile"] = list(strength["hop_profile"].reshape(B * L * H, G))
    arrays = {f"pattern_inputs/{k}": np.stack(v, axis=1) for k, v in pat.items()}  # type: ignore[arg-type]
    arrays["attention_sum"] = attn_sum.numpy()
    return BatchResult(images=images, image_heads=ih, arrays=arrays)


class _Clock:
    """Adds the wall time of ``with clock(name):`` blocks to ``timings[name]`` (no-op without a dict)."""

    def __init__(self, timings: Optional[dict[str, float]]) -> None:
        self.timings = timings

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.timings is not None:
                self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start


def _to_numpy(a: Any) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        return a.detach().cpu().numpy()
    return np.asarray(a)


# ============================================================================ the driver
def analyze(
    model: Union[str, "ViT"],
    images: Union[str, Path, Sequence[Union[str, Path]], None],
    out: Union[str, Path],
    *,
    weights: Union[str, Path, None] = None,
    labels: Any = None,
    limit: Optional[int] = None,
    settings: Optional[AnalyzeSettings] = None,
    overwrite: bool = False,
    device: Union[str, torch.device, None] = None,
    num_workers: int = 0,
    progress: bool = True,
    console: Any = None,
    command: Optional[str] = None,
) -> Run:
    """Analyse ``images`` with ``model`` and write (or resume) the run folder ``out``.

    Args:
        model: a model spec for :func:`vitscope.load_model` or a loaded :class:`~vitscope.ViT`.
        images: a folder, a list of files, or ``"sample"``/``None`` (the embedded sample; with a
            labels CSV and no images, the images that CSV lists).
        labels: a CSV with ``path`` and ``label``/``class_index`` columns, or one label per
            image (a list); a folder's own ``labels.csv`` or class sub-folders are used when omitted.
        limit: analyse only the first ``limit`` images of the sorted list.
        overwrite: discard whatever run ``out`` holds and start afresh.
        num_workers: image-decoding worker processes.
        progress: show rich progress bars (on ``console``, default stderr).
        command: the command line, recorded in the manifest and quoted in resume hints.

    Rerunning the same call on an unfinished folder resumes it; a folder made by a different
    model, image list or settings raises :class:`~vitscope.store.RunMismatchError` unless
    ``overwrite``. Unreadable images are skipped and listed in the manifest. Returns the finished
    :class:`~vitscope.store.Run`.
    """
    settings = settings or AnalyzeSettings()
    settings.validate()
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of images, got {limit}")
    store = RunStore(out)
    if store.path.exists() and not store.path.is_dir():
        raise NotARunError(f"--out {store.path} is a file; give a folder for the run")
    if not store.is_empty() and not store.has_manifest():
        raise NotARunError(
            f"--out {store.path} is not empty and is not a vitscope run folder; choose a new or empty folder "
            "(vitscope will not write into, or delete, other files)"
        )
    if console is None:
        from rich.console import Console

        console = Console(stderr=True)

    # One writer per run folder: a second command on the same folder is refused (RunLockedError)
    # instead of deleting the first one's temporary chunks or publishing half of a chunk.
    with RunLock(store.path, command=command or "vitscope.analyze"):
        return _analyze_locked(model, images, store, weights=weights, labels=labels, limit=limit, settings=settings,
                               overwrite=overwrite, device=device, num_workers=num_workers, progress=progress,
                               console=console, command=command)


def _analyze_locked(
    model: Union[str, "ViT"],
    images: Union[str, Path, Sequence[Union[str, Path]], None],
    store: RunStore,
    *,
    weights: Union[str, Path, None],
    labels: Any,
    limit: Optional[int],
    settings: AnalyzeSettings,
    overwrite: bool,
    device: Union[str, torch.device, None],
    num_workers: int,
    progress: bool,
    console: Any,
    command: Optional[str],
) -> Run:
    from vitscope.data import load_images
    from vitscope.models import ViT, load_model

    vit = model if isinstance(model, ViT) else load_model(model, weights=weights, device=device)
    vit._require_head()
    image_set = load_images(images, labels=labels, limit=limit, class_names=vit.class_names)
    source = images if images is not None else ("sample" if labels is None else labels)
    if not image_set.records:
        raise ValueError(f"no images to analyse in {source}")
    _check_labels(image_set, vit)
    manifest = _new_manifest(vit, image_set, settings, source=source, labels=labels, limit=limit, command=command)

    if store.has_manifest():
        old = store.read_manifest()
        if overwrite:
            store.clear()
            for name in INTERACTION_TABLES:  # not among the store's core tables, so cleared here
                store.table_path(name).unlink(missing_ok=True)
        elif old.get("fingerprint") != manifest["fingerprint"]:
            raise RunMismatchError(
                f"{store.path} holds a run made by a different command ({describe_mismatch(old, manifest)}). "
                "Rerun the original command to resume it, choose another --out folder, or pass --overwrite to replace it."
            )
        elif old.get("status") == STATUS_COMPLETE:
            console.print(f"run {store.path} is already complete; nothing to do (pass --overwrite to redo it)")
            return open_run(store.path)
        else:
            invocations = list(old.get("invocations", [])) + manifest["invocations"]
            manifest = {**old, "resumed": int(old.get("resumed", 0)) + 1, "command": command or old.get("command"),
                        "invocations": invocations}
    store.path.mkdir(parents=True, exist_ok=True)
    store.remove_leftovers()
    store.write_manifest(manifest)

    driver = _Driver(vit, image_set, store, settings, manifest, num_workers=num_workers)
    with _progress(progress, console) as prog:
        driver.run_chunks(prog)
        driver.finish(prog)
    run = open_run(store.path)
    if run.manifest.get("failures"):
        console.print(f"skipped {len(run.manifest['failures'])} unreadable image(s); they are listed in {store.manifest_path}")
    return run


def _check_labels(image_set: "ImageSet", vit: "ViT") -> None:
    n = int(vit.num_classes or 0)
    for rec in image_set.records:
        if rec.label is not None and not 0 <= rec.label < n:
            raise ValueError(
                f"image {rec.path} has label {rec.label}, but {vit.name} has {n} classes (0..{n - 1}); "
                "check that the labels file uses the model's class indices"
            )


def _file_size(path: Path) -> Optional[int]:
    try:
        return path.stat().st_size
    except OSError:
        return None


def _new_manifest(
    vit: "ViT",
    image_set: "ImageSet",
    settings: AnalyzeSettings,
    *,
    source: Any,
    labels: Any,
    limit: Optional[int],
    command: Optional[str],
) -> dict[str, Any]:
    records = [
        {"image_id": r.image_id, "path": str(r.path), "label": r.label, "size": _file_size(Path(r.path))}
        for r in image_set.records
    ]
    lay = vit.layout
    state_sha = vit.state_sha256()
    model = {
        "spec": vit.spec,
        "name": vit.name,
        "library": vit.library,
        "weights_sha256": vit.weights_sha256,
        "state_sha256": state_sha,
        "dtype": str(vit.dtype).removeprefix("torch."),
        "device_type": vit.device.type,
        "weights": getattr(vit, "weights_path", None),
        "num_layers": vit.num_layers,
        "num_heads": vit.num_heads,
        "num_classes": vit.num_classes,
        "layout": lay.to_dict(),
        "preprocessing": vit.preprocessing.to_dict(),
        "class_names": vit.class_names,
    }
    settings_d = {**settings.to_dict(), "device": vit.device.type}
    images = {
        "source": str(source) if not isinstance(source, (list, tuple)) else f"{len(source)} files",
        "labels": str(labels) if isinstance(labels, (str, Path)) else (None if labels is None else "given in the call"),
        "limit": limit,
        "count": len(records),
        "class_names": image_set.class_names,
        "records": records,
    }
    fp, parts = fingerprint(
        {
            # The loaded weights themselves (not only a file's hash, absent for hub ids and
            # in-memory modules), their dtype and the device type decide every number.
            "model": {"spec": vit.spec, "weights_sha256": vit.weights_sha256, "state_sha256": state_sha,
                      "dtype": model["dtype"], "device_type": model["device_type"]},
            "images": [[r["image_id"], r["path"], r["label"], r["size"]] for r in records],
            "settings": settings_d,
        }
    )
    n_chunks = math.ceil(len(records) / settings.batch_size)
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "status": STATUS_RUNNING,
        "created": now_iso(),
        "completed": None,
        "command": command,
        "fingerprint": fp,
        "fingerprint_parts": parts,
        "model": model,
        "images": images,
        "settings": settings_d,
        "chunks": {"size": settings.batch_size, "count": n_chunks},
        "versions": package_versions(),
        # Every command that worked on the run (the first one and each resume), with its versions.
        "invocations": [{"started": now_iso(), "command": command, "versions": package_versions()}],
        "failures": [],
        "counts": {"listed": len(records), "analysed": None, "failed": None},
    }


class _Driver:
    """Runs the chunked stage and the final steps of one analysis into ``store``."""

    def __init__(self, vit: "ViT", image_set: "ImageSet", store: RunStore, settings: AnalyzeSettings, manifest: dict[str, Any], *, num_workers: int) -> None:
        self.vit = vit
        self.image_set = image_set
        self.records = list(image_set.records)
        self.store = store
        self.settings = settings
        self.manifest = manifest
        self.num_workers = num_workers
        self.n_chunks = int(manifest["chunks"]["count"])
        #: Seconds spent in each part of this invocation (recorded in the manifest as ``timings``).
        self.timings: dict[str, float] = {}
        self.clock = _Clock(self.timings)
        #: Finished chunks found damaged and analysed again by this invocation (also in the manifest).
        self.redone_chunks: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ chunks
    def chunk_records(self, index: int) -> list["ImageRecord"]:
        b = self.settings.batch_size
        return self.records[index * b : (index + 1) * b]

    def _decode(self, records: Sequence["ImageRecord"], on_failure: Callable[["ImageRecord", str], None]) -> list["Batch"]:
        from vitscope.data import VitscopeDataWarning, iter_batches

        with warnings.catch_warnings():
            # Failures are reported through on_failure (logged, and listed in the manifest).
            warnings.simplefilter("ignore", VitscopeDataWarning)
            return list(
                iter_batches(records, self.vit.preprocessing, batch_size=self.settings.batch_size, num_workers=self.num_workers, on_failure=on_failure)
            )

    def run_chunks(self, prog: Any) -> None:
        done = set(self.store.done_chunks())
        bad = [i for i in done if i >= self.n_chunks]
        if bad:
            raise NotARunError(
                f"{self.store.path}/chunks holds chunks {sorted(bad)} beyond this run's {self.n_chunks} chunks; "
                "the folder is damaged: rerun with --overwrite"
            )
        # A chunk is trusted only when every file it lists is there, whole (size and SHA-256): a
        # power loss or a hand can damage a finished chunk, and zarr would read a lost file as zeros.
        for i in sorted(done):
            why = self.store.verify_chunk(i)
            if why is not None:
                message = f"chunk {i} ({len(self.chunk_records(i))} images) of {self.store.path} is damaged: {why}; analysing it again"
                prog.log(message)
                warnings.warn(message, DamagedChunkWarning, stacklevel=2)
                self.store.remove_chunk(i)
                done.discard(i)
                self.redone_chunks.append({"chunk": i, "reason": why, "when": now_iso()})
        if self.redone_chunks:
            self.manifest["redone_chunks"] = [*self.manifest.get("redone_chunks", []), *self.redone_chunks]
            self.store.write_manifest(self.manifest)
        n_done_images = sum(len(self.chunk_records(i)) for i in done)
        task = prog.add_task("analysing images", total=len(self.records), completed=n_done_images)
        if done:
            prog.log(f"resuming: {len(done)} of {self.n_chunks} chunks already done")
        for i in range(self.n_chunks):
            if i in done:
                continue
            records = self.chunk_records(i)
            failures: list[dict[str, Any]] = []

            def on_failure(rec: "ImageRecord", reason: str) -> None:
                failures.append({"image_id": rec.image_id, "path": str(rec.path), "reason": reason, "stage": "decode"})
                prog.log(f"skipped {rec.path}: {reason}")

            with self.clock("decode"):
                batches = self._decode(records, on_failure)
            results = [
                analyze_batch(self.vit, b.x, b.labels, b.image_ids, pattern_size=self.settings.pattern_size, timings=self.timings)
                for b in batches
            ]
            blobs = {}
            if self.settings.interactions:
                with self.clock("interactions"):
                    blobs[INTERACTION_STATE] = self._interaction_chunk(batches, results)
            with self.clock("write_chunks"):
                self._write_chunk(i, records, batches, results, failures, blobs)
            prog.advance(task, len(records))

    def _write_chunk(self, index: int, records: Sequence["ImageRecord"], batches: Sequence["Batch"], results: Sequence[BatchResult],
                     failures: list[dict[str, Any]], blobs: Mapping[str, bytes]) -> None:
        # Each chunk holds its own partial sums (attention, interaction statistics), merged in chunk
        # order by the final steps: no chunk depends on another, so any one can be redone alone.
        if results:
            images = pd.concat([r.images for r in results], ignore_index=True)
            image_heads = pd.concat([r.image_heads for r in results], ignore_index=True)
            arrays = {k: np.concatenate([r.arrays[k] for r in results]) for k in results[0].arrays if k != "attention_sum"}
            arrays["attention_sum"] = np.sum([r.arrays["attention_sum"] for r in results], axis=0)
        else:
            images, image_heads, arrays = None, None, {}
        tables = {}
        if images is not None:
            by_id = {r.image_id: r for r in records}
            images.insert(1, "path", [str(by_id[i].path) for i in images["image_id"]])
            images.insert(2, "label", pd.array([by_id[i].label for i in images["image_id"]], dtype="Int64"))
            tables = {"images": images, "image_heads": image_heads}
        meta = {
            "chunk": index,
            "image_ids": [int(r.image_id) for r in records],
            "analysed": [int(i) for b in batches for i in b.image_ids],
            "failures": failures,
        }
        self.store.write_chunk(index, tables=tables, arrays=arrays, meta=meta, blobs=blobs)

    # ------------------------------------------------------------------ final steps
    def catalogues(self) -> dict[str, str]:
        """Pattern catalogues of this run (name -> input map kind); ``cls`` only with a CLS token."""
        cats = self.settings.catalogue_inputs()
        if self.vit.layout.cls_index is None:
            cats.pop("cls")
        return cats

    def finish(self, prog: Any) -> None:
        cats = self.catalogues()
        steps = ["gather", "summaries", "curves", *[f"patterns ({k})" for k in cats], "overview", *(["interactions"] if self.settings.interactions else []), "tables"]
        task = prog.add_task("final steps", total=len(steps))
        st = self.store

        @contextlib.contextmanager
        def step(name: str, what: str) -> Iterator[None]:
            prog.update(task, description=f"final steps: {what}")
            with self.clock(name):
                yield
            prog.advance(task)

        with step("gather", "gathering chunks"):
            images_base, image_heads, failures = self._gather()
        with step("summaries", "head summaries"):
            heads = self._summaries(images_base, image_heads)
        with step("curves", "pruning curves"):
            if not st.has_table("curves"):
                st.write_table("curves", self._curves(images_base, image_heads, heads))
        pattern_frames, cluster_frames, dominant = [], [], []
        for kind, input_kind in cats.items():
            with step(f"patterns_{kind}", f"{kind} attention patterns"):
                maps, clusters, dom = self._patterns(kind, input_kind, images_base)
            pattern_frames.append(maps)
            cluster_frames.append(clusters)
            dominant.append(dom)
        with step("overview", "image overview"):
            overview = self._overview(images_base, image_heads)
        if self.settings.interactions:
            with step("interactions", "patch interactions"):
                self._interactions(images_base)

        prog.update(task, description="final steps: writing tables")
        start = time.perf_counter()
        for dom in dominant:
            heads = heads.merge(dom, on=["layer", "head"], how="left", validate="one_to_one")
        images = images_base.copy()
        images["curve_split"] = self.curve_split(images_base)
        images["overview_x"] = overview[:, 0].astype(np.float64)
        images["overview_y"] = overview[:, 1].astype(np.float64)
        st.write_table("patterns", pd.concat(pattern_frames, ignore_index=True))
        st.write_table("pattern_clusters", pd.concat(cluster_frames, ignore_index=True))
        st.write_table("heads", heads)
        st.write_table("images", images)
        self._model_masks()
        manifest = dict(self.manifest)
        manifest["failures"] = failures
        manifest["counts"] = {"listed": len(self.records), "analysed": int(len(images)), "failed": len(failures)}
        manifest["patterns"] = {kind: {"input": inp} for kind, inp in cats.items()}
        manifest["status"] = STATUS_COMPLETE
        manifest["completed"] = now_iso()
        self.timings["tables"] = time.perf_counter() - start
        manifest["timings"] = {k: round(v, 3) for k, v in self.timings.items()}
        st.write_manifest(manifest)
        self.manifest = manifest
        st.remove_chunks()
        prog.advance(task)
        prog.update(task, description="final steps: done")

    # interactions (Paper 2, opt-in) --------------------------------------
    def _merged_interaction_state(self) -> tuple[Any, Any]:
        """The ``(InteractionAccumulator, FieldAccumulator)`` over every chunk, merged in chunk order."""
        from vitscope.analysis.fields import FieldAccumulator
        from vitscope.analysis.interaction import InteractionAccumulator

        vit = self.vit
        inter, field = InteractionAccumulator.for_model(vit), FieldAccumulator(vit.num_layers, vit.layout)
        for i in range(self.n_chunks):
            path = self.store.chunk_dir(i) / INTERACTION_STATE
            if not path.is_file():
                raise NotARunError(f"{self.store.path} lacks the interaction statistics of chunk {i} ({path}); the folder is damaged: rerun with --overwrite")
            with np.load(path) as z:
                state = {k: z[k] for k in z.files}

            def part(prefix: str) -> dict[str, np.ndarray]:
                return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}

            inter.merge(InteractionAccumulator.from_state(part("interaction.")))
            field.merge(FieldAccumulator.from_state(part("field."), vit.layout))
        return inter, field

    def _interaction_chunk(self, batches: Sequence["Batch"], results: Sequence[BatchResult]) -> bytes:
        """First-order impacts of one chunk: per-image key importance goes into the chunk's arrays;
        the chunk's own interaction and field statistics are returned as ``.npz`` bytes (stored in
        the chunk, merged over chunks by the final steps)."""
        from vitscope.analysis.fields import FieldAccumulator
        from vitscope.analysis.interaction import InteractionAccumulator, first_order_impact, key_importance

        vit = self.vit
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

    def interaction_subsets(self, images: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
        """``(fit, evaluate)`` images of the window and removal curves: the seeded curve subset
        (:meth:`curve_subset`), every second image ranking keys, the others evaluated."""
        subset = self.curve_subset(images)
        return subset.iloc[0::2], subset.iloc[1::2]

    def _interaction_batches(self, images: pd.DataFrame) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        by_id = {r.image_id: r for r in self.records}
        targets = dict(zip(images["image_id"].astype(int), images["target"].astype(int)))
        for b in self._decode([by_id[int(i)] for i in images["image_id"]], lambda rec, why: None):
            yield b.x, torch.tensor([targets[i] for i in b.image_ids])

    def _interactions(self, images: pd.DataFrame) -> None:
        """Paper 2's set-level outputs; each part is skipped when written, ``interaction_agreement`` last."""
        from vitscope.analysis import fields as fld
        from vitscope.analysis import interaction as itr
        from vitscope.analysis import windows as win

        st, s, vit = self.store, self.settings, self.vit
        lay = vit.layout
        P = lay.num_patches
        if st.has_table("interaction_agreement"):
            return
        if not st.has_array("interaction_key_importance"):
            parts = [st.read_chunk_array(i, "interaction_key_importance") for i in range(self.n_chunks) if st.has_chunk_array(i, "interaction_key_importance")]
            st.write_array("interaction_key_importance", np.concatenate(parts), chunks=(min(len(images), 1024), P),
                           attrs={"dims": ["image", "key_patch"], "image_order": "images.parquet rows",
                                  "what": "first-order impact of each key patch summed over queries and layers"})
        if not st.has_table("field_layers"):  # written last in this block
            inter, field = self._merged_interaction_state()
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
        fit, evaluate = self.interaction_subsets(images)
        if len(fit) >= 2 and len(evaluate) >= 1 and not (st.has_table("window_curve") and st.has_table("removal_curve")):
            # Rankings come from the fit half only, so the curves measure them on images they never saw.
            acc = itr.InteractionAccumulator.for_model(vit)
            for x, t in self._interaction_batches(fit):
                acc.update(itr.first_order_impact(vit, x, t))
            ranking = acc.summary(q=INTERACTION_Q)
            if not st.has_table("window_curve"):
                st.write_table("window_curve", win.window_curve(vit, self._interaction_batches(evaluate), ranking["mean"], seed=s.seed))
            if not st.has_table("removal_curve"):
                rc = win.removal_curve(vit, self._interaction_batches(evaluate), dataset_scores=ranking["key_importance_mean"],
                                       seeds=(s.seed, s.seed + 1, s.seed + 2))
                st.write_table("removal_summary", win.removal_summary(rc))
                st.write_table("removal_curve", rc)
        pick = (evaluate if len(evaluate) else images).iloc[:AGREEMENT_IMAGES]
        xs, ts = zip(*self._interaction_batches(pick))
        agreement = itr.knockout_agreement(vit, torch.cat(xs), torch.cat(ts), queries_per_layer=min(AGREEMENT_QUERIES, P),
                                           keys=None if P <= AGREEMENT_KEYS else AGREEMENT_KEYS, seed=s.seed)
        agreement.insert(2, "image_id", pick["image_id"].to_numpy(dtype=np.int64)[agreement["image"].to_numpy()])
        st.write_table("interaction_agreement", agreement)

    def _model_masks(self) -> None:
        """A masked-attention model's (WinfT's) allowed keys as ``winft_masks`` ``(L, P, P)`` uint8, so
        the run shows the masks it was analysed under without the weights file."""
        module = self.vit.module
        if not callable(getattr(module, "allowed_masks", None)) or self.store.has_array("winft_masks"):
            return
        from vitscope.models.winft import mask_stats

        lay = self.vit.layout
        masks = module.allowed_masks().bool().cpu()
        stats = mask_stats(masks, lay)
        patch = masks[:, lay.patch_slice, lay.patch_slice].numpy().astype(np.uint8)
        self.store.write_array("winft_masks", patch, chunks=(1, *patch.shape[1:]), attrs={
            "dims": ["layer", "query_patch", "key_patch"], "what": "1 where the patch query may attend to the patch key",
            "keys_per_query_by_layer": [float(v) for v in stats["keys_per_query_by_layer"]],
            "keys_per_query": float(stats["keys_per_query"]), "sparsity": float(stats["sparsity"]),
        })

    # gather ---------------------------------------------------------------
    def _gather(self) -> tuple[pd.DataFrame, pd.DataFrame, list[dict[str, Any]]]:
        """Chunk parts -> ``image_heads.parquet``, the images table (without overview) and the arrays."""
        st = self.store
        vit = self.vit
        # Chunks stay until the run is complete, so their failure lists are always there to read.
        failures = [f for i in range(self.n_chunks) for f in st.read_chunk_meta(i)["failures"]]
        base_path = st.work_path("images_base.parquet")
        if base_path.is_file():  # written last by this step
            return files.read_parquet(base_path), st.read_table("image_heads"), failures
        with_rows = [i for i in range(self.n_chunks) if (st.chunk_dir(i) / "images.parquet").is_file()]
        if not with_rows:
            reasons = "; ".join(f"{f['path']}: {f['reason']}" for f in failures[:5])
            raise ValueError(f"none of the {len(self.records)} images could be read ({reasons}{' ...' if len(failures) > 5 else ''})")
        images = pd.concat([st.read_chunk_table(i, "images") for i in with_rows], ignore_index=True)
        images.insert(3, "label_name", [_name(self.image_set.class_names, v) for v in images["label"]])
        images.insert(5, "prediction_name", [_name(vit.class_names, v) for v in images["prediction"]])
        image_heads = pd.concat([st.read_chunk_table(i, "image_heads") for i in with_rows], ignore_index=True)
        n = len(images)
        H = vit.num_heads
        kinds = [k for k in ("offset", "patch", "cls") if st.has_chunk_array(with_rows[0], f"pattern_inputs/{k}")]
        for kind in kinds:
            name = f"pattern_inputs/{kind}"
            if st.has_array(name):
                continue
            first = st.read_chunk_array(with_rows[0], name)
            attrs = {"dims": ["image", "layer", "head", "channel", "y", "x"], "image_order": "images.parquet rows"}
            chunk_shape = (min(n, self.settings.batch_size), 1, *first.shape[2:])
            with st.new_array(name, (n, *first.shape[1:]), first.dtype, chunks=chunk_shape, attrs=attrs) as arr:
                pos = 0
                for i in with_rows:  # one chunk in memory at a time
                    part = st.read_chunk_array(i, name)
                    arr[pos : pos + len(part)] = part
                    pos += len(part)
        if not st.has_array("attention_mean"):
            vit = self.vit
            total = np.zeros((vit.num_layers, H, vit.num_tokens, vit.num_tokens))
            for i in with_rows:  # in chunk order, one chunk in memory at a time
                total = total + st.read_chunk_array(i, "attention_sum")
            st.write_array(
                "attention_mean",
                (total / n).astype(np.float32),
                chunks=(1, H, *total.shape[2:]),
                attrs={"dims": ["layer", "head", "query", "key"], "images": n, "what": "mean post-softmax attention over the analysed images"},
            )
        st.write_table("image_heads", image_heads)
        files.write_parquet(base_path, images)  # written last: it marks the gather step as done
        return images, image_heads, failures

    # summaries ------------------------------------------------------------
    def _summaries(self, images: pd.DataFrame, image_heads: pd.DataFrame) -> pd.DataFrame:
        s = self.settings
        importance = imp.summarize_importance(image_heads, images, n_boot=s.n_boot, seed=s.seed)
        strength = stg.summarize_strength(image_heads).drop(columns=["n_images"])
        heads = importance.merge(strength, on=["layer", "head"], how="left", validate="one_to_one")
        # Without a label an image's "accuracy" is agreement with the unpruned prediction: say per
        # run which one the metrics measure, and how many images had a label.
        n_labelled = int(images["label"].notna().sum())
        target = "label" if n_labelled == len(images) else "prediction" if n_labelled == 0 else "mixed"
        at = heads.columns.get_loc("n_images") + 1
        heads.insert(at, "n_labelled", n_labelled)
        heads.insert(at + 1, "target", target)
        if target == "mixed":
            from vitscope.data import VitscopeDataWarning

            warnings.warn(
                f"{n_labelled} of {len(images)} images have a label: for the others the importance metrics measure the "
                "unpruned prediction (agreement and its probability), not the label; heads.target says 'mixed'. "
                "Analyse the labelled and the unlabelled images as two runs to keep them apart.",
                VitscopeDataWarning, stacklevel=2,
            )
        if not self.store.has_table("agreement"):
            self.store.write_table("agreement", imp.metric_agreement(heads, [m for m in imp.METRICS if m in heads.columns]))
        return heads

    # curves ---------------------------------------------------------------
    def curve_subset(self, images: pd.DataFrame) -> pd.DataFrame:
        """The seeded random subset of analysed images used for the pruning curves (in image order)."""
        n = self.settings.curve_images
        if n == 0 or n >= len(images):
            return images
        rng = np.random.default_rng(self.settings.seed)
        pick = np.sort(rng.choice(len(images), size=n, replace=False))
        return images.iloc[pick]

    def curve_split(self, images: pd.DataFrame) -> np.ndarray:
        """Each analysed image's part in the pruning curves: ``"evaluate"`` (the curves are measured
        on it) or ``"rank"`` (the heads are ranked on it), in image order.

        Ranking heads on the images a curve is measured on flatters every metric (it is fitted to
        them), so the curves are held out: the evaluation images are the seeded curve subset, at most
        half the images, and the heads are ranked on all the others. With fewer than two images
        there is nothing to hold out and every image is both ranked and evaluated.
        """
        n = len(images)
        role = np.full(n, "rank", dtype=object)
        if n < 2:
            role[:] = "evaluate"
            return role
        size = self.settings.curve_images
        size = n // 2 if size == 0 or size > n // 2 else size
        rng = np.random.default_rng(self.settings.seed)
        role[rng.choice(n, size=size, replace=False)] = "evaluate"
        return role

    def _curves(self, images: pd.DataFrame, image_heads: pd.DataFrame, heads: pd.DataFrame) -> pd.DataFrame:
        """Held-out curves (heads ranked on the ``rank`` images, measured on the ``evaluate`` ones) and,
        for comparison, in-sample curves (ranked on every image, these included), in one pass."""
        role = self.curve_split(images)
        subset = images[role == "evaluate"]
        rank_ids = set(images.loc[role == "rank", "image_id"].astype(int))
        by_id = {r.image_id: r for r in self.records}
        records = [by_id[int(i)] for i in subset["image_id"]]
        targets = dict(zip(subset["image_id"].astype(int), subset["target"].astype(int)))

        def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            for b in self._decode(records, lambda rec, why: None):
                yield b.x, torch.tensor([targets[i] for i in b.image_ids])

        rankings = {"in_sample": heads}
        if rank_ids:
            rank_images = images[images["image_id"].astype(int).isin(rank_ids)]
            held = imp.summarize_importance(image_heads[image_heads["image_id"].astype(int).isin(rank_ids)], rank_images, n_boot=0)
            rankings = {"held_out": held, **rankings}
        steps = imp.default_steps(len(heads), self.settings.curve_points)
        df = imp.pruning_curves_by_ranking(self.vit, batches(), rankings, list(CURVE_METRICS), steps=steps, seed=self.settings.seed)
        df["n_rank_images"] = np.where(df["ranking"] == "held_out", len(rank_ids), len(images))
        return df

    # patterns -------------------------------------------------------------
    def _patterns(self, kind: str, input_kind: str, images: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
        """Autoencoder codes, projection, density and clusters of one catalogue; tables from the arrays.

        Two resumable sub-steps: the latent codes (``patterns/<kind>/codes``, with the trained
        weights in ``work/``) and the catalogue (embedding, clusters, density, decoded prototypes;
        ``patterns/<kind>/prototypes`` is written last and marks it done).
        """
        P = _patterns_module()
        st, s = self.store, self.settings
        pre = f"patterns/{kind}"
        inputs = st.array(f"pattern_inputs/{input_kind}")
        N, L, H = (int(v) for v in inputs.shape[:3])
        M = N * L * H
        ae = None
        state_path = st.work_path(f"autoencoder_{kind}.pt")
        if not st.has_array(f"{pre}/codes"):
            maps = np.asarray(inputs[...]).reshape(M, *inputs.shape[3:])
            ae = P.train_autoencoder(maps, latent_dim=s.latent_dim, epochs=s.ae_epochs, seed=s.seed, max_train=s.ae_max_maps or M,
                                     min_steps=s.ae_min_steps)
            del maps
            _save_state(ae.state_dict(), state_path)
            codes = np.asarray(ae.codes, dtype=np.float32)
            st.write_array(f"{pre}/codes", codes.reshape(N, L, H, -1), chunks=(min(N, 256), 1, H, codes.shape[-1]),
                           attrs={"dims": ["image", "layer", "head", "latent"], "image_order": "images.parquet rows", "input": input_kind})
        if not st.has_array(f"{pre}/prototypes"):
            codes = np.asarray(st.array(f"{pre}/codes")[...], dtype=np.float32).reshape(M, -1)
            if ae is None:
                ae = P.AutoencoderResult.from_state_dict(_load_state(state_path))
            cat = P.catalogue_patterns(codes, n_clusters=min(s.n_clusters, M), seed=s.seed, projection=s.projection, autoencoder=ae)
            prototypes = np.asarray(cat.prototypes, dtype=np.float32)
            names = [P.describe_prototype(p, kind=input_kind, grid=tuple(self.vit.layout.grid)) for p in prototypes]
            gx, gy = np.asarray(cat.grid_x, dtype=float), np.asarray(cat.grid_y, dtype=float)
            st.write_array(f"{pre}/embedding", np.asarray(cat.embedding, dtype=np.float32).reshape(N, L, H, 2),
                           attrs={"dims": ["image", "layer", "head", "xy"], "projection": s.projection})
            st.write_array(f"{pre}/cluster", np.asarray(cat.labels, dtype=np.int32).reshape(N, L, H),
                           attrs={"dims": ["image", "layer", "head"], "names": names})
            st.write_array(f"{pre}/centroids", np.asarray(cat.centroids, dtype=np.float32), attrs={"dims": ["cluster", "latent"]})
            st.write_array(f"{pre}/density", np.asarray(cat.density, dtype=np.float32),
                           attrs={"dims": ["y", "x"], "extent": [float(gx[0]), float(gx[-1]), float(gy[0]), float(gy[-1])],
                                  "grid_x": gx.tolist(), "grid_y": gy.tolist()})
            st.write_array(f"{pre}/prototypes", prototypes,
                           attrs={"dims": ["cluster", "channel", "y", "x"], "names": names, "input": input_kind})
        return self._pattern_tables(kind, images)

    def _pattern_tables(self, kind: str, images: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
        """``patterns`` rows, ``pattern_clusters`` rows and each head's dominant cluster, from the arrays."""
        P = _patterns_module()
        st = self.store
        pre = f"patterns/{kind}"
        emb = np.asarray(st.array(f"{pre}/embedding")[...], dtype=np.float64)
        lab_arr = st.array(f"{pre}/cluster")
        lab = np.asarray(lab_arr[...], dtype=np.int64)
        names = list(lab_arr.attrs["names"])  # type: ignore[arg-type]
        N, L, H = lab.shape
        maps = pd.DataFrame(
            {
                "kind": kind,
                "image_id": np.repeat(images["image_id"].to_numpy(dtype=np.int64), L * H),
                "layer": np.tile(np.repeat(np.arange(L, dtype=np.int64), H), N),
                "head": np.tile(np.arange(H, dtype=np.int64), N * L),
                "x": emb[..., 0].reshape(-1),
                "y": emb[..., 1].reshape(-1),
                "cluster": lab.reshape(-1),
            }
        )
        K = len(names)
        g = maps.groupby("cluster")
        size = g.size().reindex(range(K), fill_value=0)
        clusters = pd.DataFrame(
            {
                "kind": kind,
                "cluster": np.arange(K, dtype=np.int64),
                "size": size.to_numpy(dtype=np.int64),
                "share": size.to_numpy(dtype=np.float64) / max(1, len(maps)),
                "name": names,
                "x": g["x"].mean().reindex(range(K)).to_numpy(),
                "y": g["y"].mean().reindex(range(K)).to_numpy(),
            }
        )
        prefix = "pattern" if kind == "patch" else f"{kind}_pattern"
        dom = P.dominant_cluster(lab)
        dominant = pd.DataFrame(
            {
                "layer": dom["layer"].to_numpy(dtype=np.int64),
                "head": dom["head"].to_numpy(dtype=np.int64),
                f"{prefix}_cluster": dom["cluster"].to_numpy(dtype=np.int64),
                f"{prefix}_name": [names[int(c)] for c in dom["cluster"]],
                f"{prefix}_share": dom["share"].to_numpy(dtype=np.float64),
            }
        )
        return maps, clusters, dominant

    # overview -------------------------------------------------------------
    def _overview(self, images: pd.DataFrame, image_heads: pd.DataFrame) -> np.ndarray:
        st = self.store
        if st.has_array("overview"):
            return st.array("overview")[...]
        L, H = self.vit.num_layers, self.vit.num_heads
        mat = _image_head_matrix(images, image_heads, "pruned_prob", L, H)
        xy = np.asarray(_patterns_module().image_overview(mat, seed=self.settings.seed), dtype=np.float64)
        st.write_array("overview", xy, attrs={"dims": ["image", "xy"], "image_order": "images.parquet rows"})
        return xy


def _name(names: Optional[Sequence[str]], v: Any) -> Optional[str]:
    if names is None or v is None or pd.isna(v):
        return None
    v = int(v)
    return names[v] if 0 <= v < len(names) else None


def _image_head_matrix(images: pd.DataFrame, image_heads: pd.DataFrame, column: str, L: int, H: int) -> np.ndarray:
    """``image_heads[column]`` as ``(N images, L*H)`` in images row order, column ``layer*H + head``."""
    pos = pd.Series(np.arange(len(images)), index=images["image_id"].to_numpy())
    rows = pos.loc[image_heads["image_id"].to_numpy()].to_numpy()
    out = np.full((len(images), L * H), np.nan)
    out[rows, image_heads["layer"].to_numpy() * H + image_heads["head"].to_numpy()] = image_heads[column].to_numpy(dtype=np.float64)
    return out


def _save_state(state: dict[str, Any], path: Path) -> None:
    tmp = files.tmp_sibling(path)
    torch.save(state, tmp)
    files.publish(tmp, path)


def _load_state(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)

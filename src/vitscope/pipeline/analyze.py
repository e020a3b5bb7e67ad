"""`analyze`: every analysis of the first paper (and, on request, the second's) over an image set,
written to a resumable run folder.

Data flows one way: images -> model + probes -> per-chunk analyses (:mod:`.chunks`, :mod:`.batch`)
-> final steps (:mod:`.steps`) -> run store. The run folder format is documented in
docs/run-format.md; read it back with :func:`vitscope.open_run`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence, Union

from vitscope.analysis.settings import AnalyzeSettings
from vitscope.core.progress import Progress, progress_for
from vitscope.pipeline import chunks, steps
from vitscope.pipeline.context import RunContext
from vitscope.pipeline.distributed import Job, current_job, device_for
from vitscope.pipeline.manifest import check_labels, run_manifest
from vitscope.store.errors import NotARunError, RunMismatchError
from vitscope.store.layout import STATUS_COMPLETE
from vitscope.store.lock import LOCK_NAME, RunLock, check_job_holds
from vitscope.store.manifest import describe_mismatch, resumed_manifest
from vitscope.store.reader import Run, open_run
from vitscope.store.writer import RunStore

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from vitscope.models.vit import ViT


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
    device: Union[str, "torch.device", None] = None,
    num_workers: int = 0,
    progress: Union[bool, Progress] = True,
    console: Any = None,
    command: Optional[str] = None,
    max_memory: Union[str, int, None] = None,
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
        progress: ``True`` shows rich progress bars (on ``console``, default stderr), ``False``
            nothing; or any :class:`vitscope.core.progress.Progress` to report to.
        command: the command line, recorded in the manifest and quoted in resume hints.
        max_memory: a memory budget (``"16G"``, bytes): the batch is made smaller than
            ``settings.batch_size`` where its estimated peak would not fit
            (:func:`vitscope.pipeline.memory.fit_batch_size`; the run records the batch size used), and
            a model whose single image does not fit is refused with what to change.

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
    # A folder with vitscope's lock file but no manifest yet is a run another command is starting
    # (its manifest is being written): the lock below says who holds it, not this check.
    starting = (store.path / LOCK_NAME).is_file()
    if not store.is_empty() and not store.has_manifest() and not starting:
        raise NotARunError(
            f"--out {store.path} is not empty and is not a vitscope run folder; choose a new or empty folder "
            "(vitscope will not write into, or delete, other files)"
        )
    if console is None:
        from rich.console import Console

        console = Console(stderr=True)

    # One writer per run folder: a second command on the same folder is refused (RunLockedError)
    # instead of deleting the first one's temporary chunks or publishing half of a chunk. Under
    # torchrun the job is the writer: its first process holds the lock for all of them.
    job = current_job(device)
    lock = RunLock(store.path, command=command or "vitscope.analyze", job=job.job_id)
    job.from_main(lambda: lock.acquire() and None)  # (the lock itself stays on rank 0)
    try:
        if not job.is_main:
            check_job_holds(store.path, str(job.job_id))
        return _analyze_locked(model, images, store, weights=weights, labels=labels, limit=limit, settings=settings,
                               overwrite=overwrite, device=device_for(job, device), num_workers=num_workers,
                               progress=progress if job.is_main else False, console=console, command=command, job=job,
                               max_memory=max_memory)
    finally:
        lock.release()


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
    device: Union[str, "torch.device", None],
    num_workers: int,
    progress: Union[bool, Progress],
    console: Any,
    command: Optional[str],
    job: Job,
    max_memory: Union[str, int, None] = None,
) -> Run:
    from vitscope.data import load_images
    from vitscope.models import ViT, load_model

    vit = model if isinstance(model, ViT) else load_model(model, weights=weights, device=device)
    if max_memory is not None:
        import dataclasses

        from vitscope.pipeline.memory import fit_batch_size

        fitted = fit_batch_size(vit, settings.batch_size, max_memory)
        if fitted < settings.batch_size:
            if job.is_main:
                console.print(f"--max-memory {max_memory}: batches of {fitted} images instead of {settings.batch_size}")
            settings = dataclasses.replace(settings, batch_size=fitted)
    from vitscope.analysis.importance import check_objective

    if settings.objective in ("label", "embedding"):
        check_objective(vit, settings.objective)  # a backbone without a classifier is told to use the embedding objective
    image_set = load_images(images, labels=labels, limit=limit, class_names=vit.class_names if settings.objective == "label" else None)
    source = images if images is not None else ("sample" if labels is None else labels)
    if not image_set.records:
        raise ValueError(f"no images to analyse in {source}")
    if settings.objective == "label":
        check_labels(image_set, vit)  # under the embedding objective labels are only recorded
    manifest = run_manifest(vit, image_set, settings, source=source, labels=labels, limit=limit, command=command)

    def open_folder() -> Optional[dict]:
        """The manifest to work under (rank 0 decides), or None when the run is already complete."""
        nonlocal manifest
        if store.has_manifest():
            old = store.read_manifest()
            if overwrite:
                store.clear()
            elif old.get("fingerprint") != manifest["fingerprint"]:
                raise RunMismatchError(
                    f"{store.path} holds a run made by a different command ({describe_mismatch(old, manifest)}). "
                    "Rerun the original command to resume it, choose another --out folder, or pass --overwrite to replace it."
                )
            elif old.get("status") == STATUS_COMPLETE:
                console.print(f"run {store.path} is already complete; nothing to do (pass --overwrite to redo it)")
                return None
            else:
                manifest = resumed_manifest(old, manifest, command)
        store.path.mkdir(parents=True, exist_ok=True)
        store.remove_leftovers()
        if not store.has_manifest() and not store.is_empty():  # (checked again under the lock: a start that died early)
            raise NotARunError(f"--out {store.path} is not empty and is not a vitscope run folder; choose a new or empty folder "
                               "(vitscope will not write into, or delete, other files)")
        store.write_manifest(manifest)
        return manifest

    shared = job.from_main(open_folder)
    if shared is None:
        return open_run(store.path)
    if shared["fingerprint"] != manifest["fingerprint"]:
        raise RunMismatchError(f"this process's model, images or settings differ from the job's first process "
                               f"({describe_mismatch(shared, manifest)}); start every process with the same command")
    manifest = shared

    from vitscope.pipeline.readout import run_readout

    # Under the zero-shot and probe objectives the backbone is scored through a class readout.
    readout = run_readout(vit, image_set, settings, store, job, num_workers=num_workers)
    ctx = RunContext(readout.models[0], image_set, store, settings, manifest, num_workers=num_workers, job=job, readout=readout)
    with progress_for(progress, console) as prog:
        chunks.run_chunks(ctx, prog)
        job.barrier()  # every chunk of every rank is published
        steps.finish(ctx, prog)  # (on every rank: they share the curves and the pattern catalogues)
    run = open_run(store.path)
    if run.manifest.get("failures"):
        console.print(f"skipped {len(run.manifest['failures'])} unreadable image(s); they are listed in {store.manifest_path}")
    return run

"""Decoding and preprocessing an image set into :class:`Batch` es, optionally in worker processes,
skipping files that fail with a warning (or a callback) that names the file and the reason."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import (
    Callable,
    Iterator,
    Optional,
    Sequence,
    Union,
)

import torch
from PIL import Image

from vitscope.data.containers import open_record
from vitscope.data.records import (
    Batch,
    ImageError,
    ImageRecord,
    ImageSet,
    VitscopeDataWarning,
)

# --------------------------------------------------------------------------------------------------
# Batching

Preprocess = Callable[[Image.Image], torch.Tensor]
_Item = tuple[Optional[torch.Tensor], Optional[str], list[tuple[type, str]]]


def _load_one(record: ImageRecord, preprocess: Preprocess, max_pixels: Optional[float]) -> _Item:
    """Decode + preprocess one record; returns ``(tensor, None, warnings)`` or ``(None, reason, warnings)``.

    Warnings are returned rather than emitted so that worker processes can hand them to the caller.
    """
    problem = _unstorable_name(record.path)
    if problem is not None:
        return None, problem, []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            img = open_record(record, max_pixels=max_pixels)
        except ImageError as e:
            return None, e.reason, _caught(caught)
        try:
            x = preprocess(img)
        except Exception as e:
            raise RuntimeError(f"preprocessing {record.location} failed: {type(e).__name__}: {e}") from e
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"preprocess must return a torch.Tensor, got {type(x).__name__} for {record.location}")
    return x, None, _caught(caught)


def _unstorable_name(path: Path) -> Optional[str]:
    """Why results for ``path`` could not be stored, or ``None``: its name is not valid UTF-8.

    Linux file names are bytes; Python keeps bytes that are not UTF-8 (e.g. Latin-1 ``caf\\xe9.png``)
    as lone surrogates, which the run's tables (UTF-8 text) cannot hold, so such a file would stop a
    whole run when its row is written. It is skipped with this reason instead.
    """
    if _encodes(str(path)):
        return None
    bad = next((part for part in path.parts if not _encodes(part)), path.name)
    return (
        f"file name is not valid UTF-8 ({os.fsencode(bad)!r}); vitscope stores file names as UTF-8 text, "
        "so rename the file (e.g. with convmv) to analyse it"
    )


def _encodes(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _caught(caught: list[warnings.WarningMessage]) -> list[tuple[type, str]]:
    return [(w.category, str(w.message)) for w in caught]


class _DecodeDataset(torch.utils.data.Dataset):
    """Map-style dataset used only to run :func:`_load_one` in DataLoader workers."""

    def __init__(self, records: Sequence[ImageRecord], preprocess: Preprocess, max_pixels: Optional[float]) -> None:
        self.records = list(records)
        self.preprocess = preprocess
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> _Item:
        return _load_one(self.records[i], self.preprocess, self.max_pixels)


def _as_list(items: list[_Item]) -> list[_Item]:
    return items


def iter_batches(
    images: Union[ImageSet, Sequence[ImageRecord]],
    preprocess: Preprocess,
    batch_size: int = 32,
    num_workers: int = 0,
    on_failure: Optional[Callable[[ImageRecord, str], None]] = None,
    max_pixels: Optional[float] = None,
) -> Iterator[Batch]:
    """Decode and preprocess images in order, yielding :class:`Batch` es of ``batch_size`` (the last may be smaller).

    Files that cannot be decoded are skipped: each raises a :class:`VitscopeDataWarning` naming the
    file and the reason, is appended to ``images.failures`` when ``images`` is an :class:`ImageSet`,
    and is passed to ``on_failure(record, reason)``. Batches are filled with the images that did
    decode, so a batch holds ``batch_size`` images whenever that many remain.

    ``num_workers > 0`` decodes in that many worker processes with a torch ``DataLoader``; results,
    order and failure reports are the same as with ``num_workers=0``. ``preprocess`` then has to be
    picklable if the platform starts workers by spawning. Errors raised by ``preprocess`` itself are
    not skipped: they stop the iteration, naming the file. ``max_pixels`` is passed to :func:`open_image`.
    A file whose name is not valid UTF-8 is skipped too (with a reason saying so), since its results
    could not be stored.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"num_workers must be 0 or more, got {num_workers!r}")
    records = list(images.records if isinstance(images, ImageSet) else images)
    failures = images.failures if isinstance(images, ImageSet) else None

    def results() -> Iterator[_Item]:
        if num_workers == 0 or len(records) <= 1:
            for rec in records:
                yield _load_one(rec, preprocess, max_pixels)
            return
        loader = torch.utils.data.DataLoader(
            _DecodeDataset(records, preprocess, max_pixels),
            batch_size=batch_size,
            shuffle=False,
            num_workers=num_workers,
            collate_fn=_as_list,
        )
        for chunk in loader:
            yield from chunk

    pending: list[tuple[ImageRecord, torch.Tensor]] = []
    for rec, (x, reason, caught) in zip(records, results()):
        for category, message in caught:
            warnings.warn(message, category, stacklevel=2)
        if x is None:
            reason = reason or "unknown error"
            warnings.warn(f"skipped image {rec.location}: {reason}", VitscopeDataWarning, stacklevel=2)
            if failures is not None:
                failures.append((rec.location, reason))
            if on_failure is not None:
                on_failure(rec, reason)
            continue
        pending.append((rec, x))
        if len(pending) == batch_size:
            yield _make_batch(pending)
            pending = []
    if pending:
        yield _make_batch(pending)


def _make_batch(items: list[tuple[ImageRecord, torch.Tensor]]) -> Batch:
    shape = items[0][1].shape
    for rec, x in items:
        if x.shape != shape:
            raise ValueError(
                f"preprocess gave {rec.location} shape {tuple(x.shape)} but {items[0][0].location} shape {tuple(shape)}; "
                "the preprocessing must resize/crop every image to one size"
            )
    recs = [r for r, _ in items]
    return Batch(
        image_ids=[r.image_id for r in recs],
        x=torch.stack([x for _, x in items]),
        labels=torch.tensor([-1 if r.label is None else r.label for r in recs], dtype=torch.long),
        records=recs,
    )

"""The values the data layer hands around: :class:`ImageRecord`, :class:`ImageSet`, :class:`Batch`, and its errors."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import (
    Any,
    Iterator,
    Mapping,
    Optional,
    Sequence,
    Union,
    overload,
)

import torch

PathLike = Union[str, "os.PathLike[str]"]
LabelsArg = Union[PathLike, Sequence[Union[int, str, None]], Mapping[Any, Union[int, str, None]], None]



class VitscopeDataWarning(UserWarning):
    """An image was skipped or read imperfectly; the message names the file and the reason."""


class DataError(ValueError):
    """The images or labels given cannot be used as they are (the message names the item and the fix)."""


class ImageError(ValueError):
    """One file could not be decoded into an image.

    ``path`` is the file and ``reason`` a short human-readable cause such as ``"empty file"``.
    """

    def __init__(self, path: PathLike, reason: str) -> None:
        super().__init__(str(path), reason)
        self.path = str(path)
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


@dataclass(frozen=True)
class ImageRecord:
    """One image of a set: ``image_id`` is its position in the set, ``label`` its class index or ``None``.

    ``path`` is the image file, or for an image stored inside a container (a WebDataset ``.tar``
    shard, an Arrow or Parquet file of a Hugging Face dataset) that container, with ``member``
    naming the image in it (the tar member's name, or the row number as text). ``(path, member)``
    is the image's stable identity across runs.
    """

    image_id: int
    path: Path
    label: Optional[int] = None
    member: Optional[str] = None

    @property
    def location(self) -> str:
        """``path``, or ``path::member`` for an image inside a container (for messages and tables)."""
        return str(self.path) if self.member is None else f"{self.path}::{self.member}"


@dataclass
class ImageSet:
    """An ordered list of images with optional labels.

    ``class_names[i]`` names class index ``i`` when known (given by the caller, taken from class
    folders or from a names column of the labels file). ``root`` is the folder the images were found
    in (``None`` for a list of files). ``failures`` collects ``(path, reason)`` for every image that
    :func:`iter_batches` had to skip.
    """

    records: list[ImageRecord]
    class_names: Optional[list[str]] = None
    root: Optional[Path] = None
    failures: list[tuple[str, str]] = field(default_factory=list)
    # Names for class indices read from a labels file whose names do not cover 0..K-1 without gaps;
    # only used to fill ``label_name`` in :meth:`to_frame` when ``class_names`` is unknown.
    label_names: dict[int, str] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[ImageRecord]:
        return iter(self.records)

    @overload
    def __getitem__(self, index: int) -> ImageRecord: ...

    @overload
    def __getitem__(self, index: slice) -> "ImageSet": ...

    def __getitem__(self, index: Union[int, slice]) -> Union[ImageRecord, "ImageSet"]:
        """One record, or for a slice a new set sharing class names (records keep their ``image_id``)."""
        if isinstance(index, slice):
            return ImageSet(self.records[index], self.class_names, self.root, [], dict(self.label_names))
        return self.records[index]

    @property
    def labels(self) -> list[Optional[int]]:
        return [r.label for r in self.records]

    @property
    def paths(self) -> list[Path]:
        return [r.path for r in self.records]

    def label_name(self, label: Optional[int]) -> Optional[str]:
        """The name of class index ``label``, or ``None`` when it has no known name."""
        if label is None:
            return None
        if self.class_names is not None and 0 <= label < len(self.class_names):
            return self.class_names[label]
        return self.label_names.get(label)

    def to_frame(self) -> Any:
        """A pandas DataFrame with columns ``image_id, path, label, label_name`` (missing labels are
        ``<NA>``), plus ``member`` when some image lives inside a container file."""
        import pandas as pd

        frame = pd.DataFrame(
            {
                "image_id": pd.Series([r.image_id for r in self.records], dtype="int64"),
                "path": pd.Series([str(r.path) for r in self.records], dtype="object"),
                "label": pd.Series([r.label for r in self.records], dtype="Int64"),
                "label_name": pd.Series([self.label_name(r.label) for r in self.records], dtype="object"),
            }
        )
        if any(r.member is not None for r in self.records):
            frame.insert(2, "member", pd.Series([r.member for r in self.records], dtype="object"))
        return frame


@dataclass
class Batch:
    """Preprocessed images ``x`` of shape ``(B, C, H, W)`` with their ids, labels (``-1`` = unknown) and records."""

    image_ids: list[int]
    x: torch.Tensor
    labels: torch.Tensor
    records: list[ImageRecord]

    def __len__(self) -> int:
        return len(self.image_ids)

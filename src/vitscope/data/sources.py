"""Finding and labelling images: folders (class sub-folders or a ``labels.csv``), CSV files, lists,
and the embedded sample, in a fixed (sorted) order with a stable ``image_id`` per image."""

from __future__ import annotations

import atexit
import contextlib
import csv
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import (
    Any,
    Iterable,
    Mapping,
    Optional,
    Sequence,
    Union,
)

import numpy as np

from vitscope.data.containers import container_files, load_container_images
from vitscope.data.records import (
    DataError,
    ImageRecord,
    ImageSet,
    LabelsArg,
    PathLike,
    VitscopeDataWarning,
)

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
"""File name endings listed from folders (compared case-insensitively)."""

# Column names accepted in label CSV files (compared case-insensitively).
_LABEL_COLUMNS = ("label", "class_index")
_NAME_COLUMNS = ("label_name", "description", "class_name")

# --------------------------------------------------------------------------------------------------
# Finding and labelling images


def load_images(
    source: Union[PathLike, Sequence[PathLike], None] = None,
    labels: LabelsArg = None,
    limit: Optional[int] = None,
    class_names: Optional[Sequence[str]] = None,
    recursive: bool = True,
) -> ImageSet:
    """List images and their labels in a reproducible order.

    ``source`` may be:

    - a folder: image files (``IMAGE_EXTENSIONS``, any case; hidden files and folders skipped) are
      listed in sorted order of their path relative to the folder, through sub-folders when
      ``recursive``. When every image sits in a sub-folder, the first sub-folder level names its class
      (``root/cat/x.jpg`` has class ``cat``), as in torchvision's ``ImageFolder``; folders named
      ``0``, ``1``, ... are class indices. A ``labels.csv``
      directly inside the folder is used as ``labels`` when none is given.
    - a single image file, or a list of files (kept in the given order).
    - images inside containers: WebDataset ``.tar`` shards (a file, a list, a glob pattern such as
      ``"shards/train-*.tar"``, or a folder of shards) and Hugging Face datasets on disk (a
      ``Dataset.save_to_disk`` folder, ``.arrow`` or ``.parquet`` files); labels then come from the
      data (see :mod:`vitscope.data.containers`) and each record's ``member`` names the image.
    - ``None`` or the string ``"sample"``: the embedded sample (:func:`embedded_sample`), or when
      ``labels`` is a CSV file, the images that file lists (in its row order).

    ``labels`` may be a CSV file with a ``path`` column and a ``label`` or ``class_index`` column
    (ImageNet style ``path,wnid,class_index,description`` works as is); paths are absolute or relative
    to the CSV's folder or to ``source``. A label is a class index or a class name; an empty cell
    means unknown. An optional ``label_name``/``description``/``class_name`` column names the indices.
    ``labels`` may also be a list aligned with the files, or a mapping from path to label.

    ``class_names`` (e.g. ``model.class_names``) fixes which index each class name gets; names are
    matched exactly, then ignoring case, then by any comma-separated synonym ("tench" matches
    ImageNet's "tench, Tinca tinca"). Without it, class names get indices in sorted order.

    ``limit`` keeps the first N images of that order. Each image's ``image_id`` is its position.
    Missing paths raise ``FileNotFoundError``; unusable labels raise :class:`DataError`.
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise DataError(f"limit must be a positive whole number of images, got {limit!r}")
    names = list(class_names) if class_names is not None else None
    shards = container_files(source)
    if shards is not None:
        return load_container_images(shards, labels, limit, names)

    if source is None and labels is not None:
        if not _is_pathlike(labels):
            raise DataError("without a source, labels must be a CSV file listing the images; pass the images as source")
        return _set_from_csv(_existing_file(labels, "labels file"), None, names, limit)
    if source is None or (isinstance(source, str) and source == "sample"):
        if labels is not None:
            raise DataError("the embedded sample has its own labels; leave labels out, or pass your images as source")
        return _finish(_sample_set(names), limit)

    if _is_pathlike(source):
        src = Path(source)  # type: ignore[arg-type]
        if not src.exists():
            raise FileNotFoundError(f"image source {src} does not exist; pass an image folder, an image file or a list of files")
        if src.is_dir():
            return _set_from_folder(src, labels, limit, names, recursive)
        files, root = [src.absolute()], src.absolute().parent
    elif isinstance(source, Iterable):
        files = []
        for item in source:
            if not _is_pathlike(item):
                raise DataError(f"image list items must be file paths, got {type(item).__name__}: {item!r}")
            f = Path(item)
            if not f.exists():
                raise FileNotFoundError(f"image file {f} does not exist (item {len(files)} of the image list)")
            if f.is_dir():
                raise DataError(f"{f} is a folder; pass a folder as the whole source, or list its image files")
            files.append(f.absolute())
        if not files:
            raise DataError("the image list is empty; pass at least one image file")
        root = None
    else:
        raise DataError(f"cannot load images from a {type(source).__name__}; pass a folder, a file, a list of files or None")

    if labels is None:
        return _finish(ImageSet([ImageRecord(i, f, None) for i, f in enumerate(files)], names, root), limit)
    return _attach_labels(files, labels, names, root, root, limit)


def _is_pathlike(x: Any) -> bool:
    return isinstance(x, (str, os.PathLike))


def _existing_file(p: Any, what: str) -> Path:
    path = Path(p)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist or is not a file")
    return path


def _list_images(root: Path, recursive: bool) -> list[Path]:
    """Image files under ``root`` sorted by relative path; hidden files and folders are skipped."""
    found: list[tuple[str, Path]] = []
    if recursive:
        # Symlinked folders are followed (datasets are often assembled from links); a folder reached
        # twice through links is listed once, which also stops link cycles.
        visited: set[str] = set()
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True, onerror=_warn_unlistable):
            real = os.path.realpath(dirpath)
            if real in visited:
                dirnames[:] = []
                continue
            visited.add(real)
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for name in filenames:
                if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS):
                    full = Path(dirpath) / name
                    found.append((full.relative_to(root).as_posix(), full))
    else:
        for entry in os.scandir(root):
            # Like os.walk: everything that is not a folder is a file, so a broken or looping symlink
            # is listed (and later skipped with its reason) instead of vanishing or raising here.
            if not entry.name.startswith(".") and entry.name.lower().endswith(IMAGE_EXTENSIONS) and not _is_dir(entry):
                found.append((entry.name, Path(entry.path)))
    found.sort(key=lambda t: t[0])
    return [p for _, p in found]


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:  # e.g. a symlink loop
        return False


def _warn_unlistable(e: OSError) -> None:
    """os.walk error handler: a sub-folder that cannot be read is reported, not silently left out."""
    warnings.warn(
        f"could not list folder {e.filename} ({e.strerror or e}); the images in it are not included",
        VitscopeDataWarning,
        stacklevel=2,
    )


def _set_from_folder(src: Path, labels: LabelsArg, limit: Optional[int], names: Optional[list[str]], recursive: bool) -> ImageSet:
    root = src.absolute()
    files = _list_images(root, recursive)
    if not files:
        raise DataError(
            f"no images found in {src} (looked for {', '.join(IMAGE_EXTENSIONS)}"
            f"{' in it and its sub-folders' if recursive else ''}; hidden files are skipped)"
        )
    if labels is None and (root / "labels.csv").is_file():
        labels = root / "labels.csv"
    if labels is not None:
        return _attach_labels(files, labels, names, root, root, limit)

    rel = [f.relative_to(root).parts for f in files]
    if not recursive or any(len(parts) == 1 for parts in rel):
        return _finish(ImageSet([ImageRecord(i, f, None) for i, f in enumerate(files)], names, root), limit)

    # Class-folder layout: every image sits in a sub-folder named for its class.
    folders = sorted({parts[0] for parts in rel})
    if all(name.isdigit() for name in folders):
        # Folders named 0, 1, 2, ... are class indices, not names to renumber.
        index = {name: int(name) for name in folders}
        if names is not None and max(index.values()) >= len(names):
            raise DataError(f"class folder {root / max(folders, key=int)} is out of range for {len(names)} class names")
        set_names: Optional[list[str]] = names
    elif names is None:
        index = {name: i for i, name in enumerate(folders)}
        set_names = folders
    else:
        matcher = _ClassMatcher(names)
        index = {}
        for name in folders:
            idx, problem = matcher.lookup(name)
            if problem:
                raise DataError(
                    f"class folder {root / name}: {problem}. Rename the folder to a class name, "
                    "give labels=CSV with class indices, or leave class_names out to number the folders in sorted order"
                )
            index[name] = idx  # type: ignore[assignment]
        set_names = names
    records = [ImageRecord(i, f, index[parts[0]]) for i, (f, parts) in enumerate(zip(files, rel))]
    return _finish(ImageSet(records, set_names, root), limit)


def _finish(images: ImageSet, limit: Optional[int]) -> ImageSet:
    if limit is not None and limit < len(images.records):
        images.records = images.records[:limit]
    return images


def _attach_labels(
    files: list[Path],
    labels: LabelsArg,
    names: Optional[list[str]],
    root: Optional[Path],
    base: Optional[Path],
    limit: Optional[int],
) -> ImageSet:
    """Give ``files`` (already in final order) labels from a CSV, a list or a mapping."""
    if _is_pathlike(labels):
        table = _read_label_csv(_existing_file(labels, "labels file"), base)
        # Resolve every row, not just the listed files, so that name -> index numbering depends
        # only on the CSV and not on which of its files happen to be present.
        raw = [(r.label, r.where) for r in table.rows]
        resolved, set_names, extra = _resolve_labels(raw, names, table.index_names, str(table.csv_path))
        by_file = {_key(r.path): lab for r, lab in zip(table.rows, resolved)}  # duplicates rejected while reading
        keys = [_key(f) for f in files]
        if not any(k in by_file for k in keys):
            raise DataError(
                f"none of the {len(files)} images appear in {table.csv_path}; its paths must be absolute or "
                f"relative to {table.csv_path.parent}" + (f" or {base}" if base else "")
            )
        records = [ImageRecord(i, f, by_file.get(k)) for i, (f, k) in enumerate(zip(files, keys))]
        return _finish(ImageSet(records, set_names, root, label_names=extra), limit)

    if isinstance(labels, Mapping):
        # Relative keys are taken relative to the source folder (or the working directory for lists).
        lookup = {_key(base / k if base is not None else Path(k)): v for k, v in labels.items()}
        raw = [(lookup.get(_key(f)), f"labels entry for {f}") for f in files]
    elif isinstance(labels, Sequence) and not isinstance(labels, (str, bytes)):
        if len(labels) != len(files):
            raise DataError(f"labels has {len(labels)} entries but there are {len(files)} images; give one label per image (None for unknown)")
        raw = [(v, f"labels[{i}] ({files[i].name})") for i, v in enumerate(labels)]
    else:
        raise DataError(f"labels must be a CSV file, a list or a mapping, not {type(labels).__name__}")
    label_of, set_names, extra = _resolve_labels(raw, names, {}, "labels")
    records = [ImageRecord(i, f, label_of[i]) for i, f in enumerate(files)]
    return _finish(ImageSet(records, set_names, root, label_names=extra), limit)


def _key(p: Path) -> str:
    """A comparison key for a file path that ignores how the path was spelled (relative, symlinked)."""
    return os.path.normcase(os.path.realpath(p))


@dataclass
class _Row:
    path: Path
    label: Union[int, str, None]
    where: str  # "FILE line N" for messages


@dataclass
class _LabelTable:
    csv_path: Path
    rows: list[_Row]
    index_names: dict[int, str]


def _read_label_csv(csv_path: Path, base: Optional[Path]) -> _LabelTable:
    """Read ``path`` + ``label``/``class_index`` (+ names) rows; every path must exist."""
    with open(csv_path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        header = {(h or "").strip().lower(): h for h in (reader.fieldnames or [])}
        label_col = next((header[c] for c in _LABEL_COLUMNS if c in header), None)
        if "path" not in header or label_col is None:
            raise DataError(
                f"labels CSV {csv_path} needs a 'path' column and a 'label' or 'class_index' column "
                f"(found columns: {', '.join(reader.fieldnames or []) or 'none'})"
            )
        path_col = header["path"]
        name_col = next((header[c] for c in _NAME_COLUMNS if c in header), None)
        rows: list[_Row] = []
        index_names: dict[int, str] = {}
        seen: dict[str, _Row] = {}
        for rec in reader:
            where = f"{csv_path} line {reader.line_num}"
            rel = (rec.get(path_col) or "").strip()
            if not rel:
                raise DataError(f"{where}: the path is empty; every row needs an image path")
            path = _resolve_row_path(rel, csv_path.parent, base, where)
            value = _parse_label((rec.get(label_col) or "").strip())
            if name_col is not None and isinstance(value, int):
                name = (rec.get(name_col) or "").strip()
                if name:
                    if index_names.get(value, name) != name:
                        raise DataError(f"{where}: class index {value} is named {name!r} here but {index_names[value]!r} on an earlier row")
                    index_names[value] = name
            row = _Row(path, value, where)
            k = _key(path)
            if k in seen:
                if seen[k].label != value:
                    raise DataError(f"{where}: {rel} already has label {seen[k].label!r} at {seen[k].where}; keep one row per image")
                continue
            seen[k] = row
            rows.append(row)
    if not rows:
        raise DataError(f"labels CSV {csv_path} has no rows; add one 'path,label' row per image")
    return _LabelTable(csv_path, rows, index_names)


def _resolve_row_path(rel: str, csv_dir: Path, base: Optional[Path], where: str) -> Path:
    p = Path(rel)
    if p.is_absolute():
        if p.is_file():
            return p
        raise FileNotFoundError(f"{where}: image {p} does not exist")
    tried = [csv_dir / p] + ([base / p] if base is not None and base.absolute() != csv_dir.absolute() else [])
    for cand in tried:
        if cand.is_file():
            return cand.absolute()
    raise FileNotFoundError(f"{where}: image {rel} not found (looked in {' and '.join(str(t.parent) for t in tried)})")


def _parse_label(text: str) -> Union[int, str, None]:
    if text == "":
        return None
    try:
        return int(text)
    except ValueError:
        return text


def _resolve_labels(
    raw: list[tuple[Any, str]],
    names: Optional[list[str]],
    index_names: dict[int, str],
    source: str,
) -> tuple[list[Optional[int]], Optional[list[str]], dict[int, str]]:
    """Turn raw labels (indices, names or None) into class indices.

    Returns the indices, the set's class names and any partial index -> name table.
    """
    values: list[tuple[Union[int, str, None], str]] = []
    for v, where in raw:
        if isinstance(v, str):
            v = _parse_label(v.strip())
        elif isinstance(v, (bool, np.bool_)) or not (v is None or isinstance(v, (int, np.integer))):
            raise DataError(f"{where}: label {v!r} is neither a class index nor a class name")
        values.append((int(v) if isinstance(v, (int, np.integer)) else v, where))

    has_names = any(isinstance(v, str) for v, _ in values)
    has_ints = any(isinstance(v, int) for v, _ in values)
    if names is None and has_names and has_ints:
        first = next(w for v, w in values if isinstance(v, str))
        raise DataError(
            f"{source} mixes class indices and class names (first name at {first}); use one kind, "
            "or pass class_names so names can be mapped to indices"
        )

    if names is None and has_names:
        set_names: Optional[list[str]] = sorted({v for v, _ in values if isinstance(v, str)})
        index = {n: i for i, n in enumerate(set_names)}
        return [index[v] if v is not None else None for v, _ in values], set_names, {}

    set_names = names
    extra: dict[int, str] = {}
    if set_names is None and index_names:
        k = max(index_names) + 1
        if sorted(index_names) == list(range(k)):
            set_names = [index_names[i] for i in range(k)]
        else:
            extra = dict(index_names)

    matcher = _ClassMatcher(names) if names is not None and has_names else None
    out: list[Optional[int]] = []
    for v, where in values:
        if v is None:
            out.append(None)
        elif isinstance(v, int):
            if v < 0 or (names is not None and v >= len(names)):
                bound = f"0..{len(names) - 1}" if names is not None else "0 or more"
                raise DataError(f"{where}: class index {v} is out of range (must be {bound}); check the label column")
            out.append(v)
        else:
            idx, problem = matcher.lookup(v)  # type: ignore[union-attr]
            if problem:
                raise DataError(f"{where}: {problem}; use a class index or one of the model's class names")
            out.append(idx)
    return out, set_names, extra


class _ClassMatcher:
    """Maps a class name to its index: exact, then case-insensitive, then by comma-separated synonym."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = list(names)
        self.exact: dict[str, list[int]] = {}
        self.folded: dict[str, list[int]] = {}
        self.synonyms: dict[str, list[int]] = {}
        for i, n in enumerate(self.names):
            self.exact.setdefault(n, []).append(i)
            self.folded.setdefault(_fold(n), []).append(i)
            for s in {_fold(part) for part in n.split(",") if part.strip()}:
                self.synonyms.setdefault(s, []).append(i)

    def lookup(self, name: str) -> tuple[Optional[int], Optional[str]]:
        """``(index, None)`` or ``(None, problem)``."""
        for table, key in ((self.exact, name), (self.folded, _fold(name)), (self.synonyms, _fold(name))):
            hits = table.get(key)
            if hits:
                if len(hits) == 1:
                    return hits[0], None
                shown = ", ".join(f"{i} ({self.names[i]!r})" for i in hits[:5])
                return None, f"class name {name!r} matches several classes: {shown}"
        return None, f"class name {name!r} is not one of the {len(self.names)} given class names"


def _fold(s: str) -> str:
    return " ".join(s.split()).casefold()


def _set_from_csv(csv_path: Path, base: Optional[Path], names: Optional[list[str]], limit: Optional[int]) -> ImageSet:
    table = _read_label_csv(csv_path, base)
    raw = [(r.label, r.where) for r in table.rows]
    label_of, set_names, extra = _resolve_labels(raw, names, table.index_names, str(csv_path))
    records = [ImageRecord(i, r.path, label_of[i]) for i, r in enumerate(table.rows)]
    return _finish(ImageSet(records, set_names, csv_path.parent.absolute(), label_names=extra), limit)


# --------------------------------------------------------------------------------------------------
# Embedded sample

_RESOURCES = contextlib.ExitStack()
atexit.register(_RESOURCES.close)


def _sample_dir() -> Path:
    from importlib.resources import as_file, files

    res = files("vitscope").joinpath("assets", "sample")
    if isinstance(res, Path):
        return res
    # Installed from a zip: extract once for the life of the process.
    return _RESOURCES.enter_context(as_file(res))


def _sample_set(names: Optional[list[str]]) -> ImageSet:
    folder = _sample_dir()
    csv_path = folder / "labels.csv"
    if not csv_path.is_file():
        raise FileNotFoundError(
            f"the embedded sample is missing ({csv_path} not found); reinstall vitscope, "
            "or pass your own image folder as the source"
        )
    return _set_from_csv(csv_path, None, names, None)


def embedded_sample() -> ImageSet:
    """The small labelled image sample shipped with vitscope (``vitscope/assets/sample``).

    Useful for trying the tools without data. Raises ``FileNotFoundError`` if the package was installed
    without its data files.
    """
    return _sample_set(None)

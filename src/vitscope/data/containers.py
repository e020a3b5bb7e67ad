"""Images stored inside container files: WebDataset ``.tar`` shards and Hugging Face datasets saved
on disk (``save_to_disk`` folders of Arrow files, or Parquet files).

Data sets at scale rarely come as one file per image. These readers list such containers as an
:class:`ImageSet` whose records keep the container's path and the image's ``member`` inside it (the
tar member's name; the row number in an Arrow/Parquet file), so every image has a stable identity
``(path, member)`` across runs and resume, and images decode one at a time, in any order, in any
worker process:

- **WebDataset** shards: uncompressed tar files whose members are grouped into samples by key (the
  member's path up to the first dot of its file name, WebDataset's own rule): ``000123.jpg``,
  ``000123.cls`` (the class index as text) and/or ``000123.json`` (``{"label": 3}`` or a class
  name). Only the standard library's ``tarfile`` is needed; a shard is indexed once per process
  and members are then read by offset.
- **Hugging Face datasets**: a folder written by ``Dataset.save_to_disk`` (``state.json`` +
  ``*.arrow``), a single ``.arrow`` file, or ``.parquet`` files (as the Hub serves them). The image
  column is the one whose feature is ``Image`` (or any ``{bytes, path}`` struct column), the label
  column the ``ClassLabel`` one (or an integer ``label``/``labels`` column), whose names become the
  class names. Read with pyarrow (memory-mapped), so the ``datasets`` package is not required.
"""

from __future__ import annotations

import functools
import glob
import json
import os
import posixpath
import tarfile
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from PIL import Image

from vitscope.data.decode import open_image, open_image_bytes
from vitscope.data.records import DataError, ImageError, ImageRecord, ImageSet

#: Container file endings vitscope reads images from.
TAR_SUFFIX = ".tar"
TABLE_SUFFIXES = (".arrow", ".parquet")
_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm", "pgm")
_COMPRESSED_TARS = (".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar.zst")


# --------------------------------------------------------------------------------------------------
# Recognising a container source


def container_files(source: Any) -> Optional[list[Path]]:
    """The container files ``source`` names, or ``None`` when it is not a container source.

    A container source is a ``.tar``/``.arrow``/``.parquet`` file, a list of them, a glob pattern
    matching them (``"shards/train-*.tar"``), a ``save_to_disk`` folder, or a folder holding only
    such files (no image files). Files of one source must all be of one kind.
    """
    if isinstance(source, (list, tuple)):
        if not source or not all(isinstance(s, (str, os.PathLike)) and _is_container_name(Path(s)) for s in source):
            return None
        files = [Path(s) for s in source]
    elif isinstance(source, (str, os.PathLike)):
        text = os.fspath(source)
        path = Path(text)
        if any(c in text for c in "*?[") and not path.exists():
            files = [Path(p) for p in sorted(glob.glob(text))]
            if not files:
                raise FileNotFoundError(f"no files match {text!r}")
            if not all(_is_container_name(f) for f in files):
                bad = next(f for f in files if not _is_container_name(f))
                raise DataError(f"{text!r} matches {bad}, which is not a .tar, .arrow or .parquet file")
        elif path.is_dir():
            files = _folder_containers(path)
            if files is None:
                return None
        elif _is_container_name(path) or path.name.endswith(_COMPRESSED_TARS):
            files = [path]
        else:
            return None
    else:
        return None
    for f in files:
        if f.name.endswith(_COMPRESSED_TARS):
            raise DataError(f"{f} is a compressed tar; images are read from shards by offset, so decompress it to a plain .tar first")
        if not f.is_file():
            raise FileNotFoundError(f"container file {f} does not exist")
    kinds = {_kind(f) for f in files}
    if len(kinds) > 1:
        raise DataError(f"the image source mixes {' and '.join(sorted(kinds))} files; give one kind at a time")
    return files


def _is_container_name(path: Path) -> bool:
    return path.suffix.lower() in (TAR_SUFFIX, *TABLE_SUFFIXES) and not path.name.endswith(_COMPRESSED_TARS)


def _kind(path: Path) -> str:
    return "WebDataset .tar" if path.suffix.lower() == TAR_SUFFIX else path.suffix.lower()


def _folder_containers(folder: Path) -> Optional[list[Path]]:
    if (folder / "dataset_dict.json").is_file():
        splits = json.loads((folder / "dataset_dict.json").read_text()).get("splits", [])
        raise DataError(
            f"{folder} holds a Hugging Face DatasetDict with splits {', '.join(splits)}; "
            f"pass one split's folder, e.g. {folder / (splits[0] if splits else 'test')}"
        )
    if (folder / "state.json").is_file():
        state = json.loads((folder / "state.json").read_text())
        names = [d["filename"] for d in state.get("_data_files", [])]
        if not names:
            raise DataError(f"{folder}/state.json lists no data files; is this a complete Dataset.save_to_disk folder?")
        return [folder / n for n in names]
    entries = [p for p in folder.iterdir() if not p.name.startswith(".")]
    containers = sorted(p for p in entries if p.is_file() and _is_container_name(p))
    if not containers:
        return None
    from vitscope.data.sources import IMAGE_EXTENSIONS

    if any(p.is_file() and p.name.lower().endswith(IMAGE_EXTENSIONS) for p in entries):
        return None  # a folder of images that happens to hold an archive too
    return containers


# --------------------------------------------------------------------------------------------------
# Listing


def load_container_images(
    files: Sequence[Path], labels: Any = None, limit: Optional[int] = None, class_names: Optional[Sequence[str]] = None
) -> ImageSet:
    """The images of ``files`` (see :func:`container_files`) in order: files in the given order,
    then samples in tar order or rows in table order. Labels come from the containers themselves."""
    if labels is not None:
        raise DataError(
            "labels for WebDataset shards and datasets come from the data themselves (a sample's .cls/.json "
            "member; the dataset's label column); leave labels out"
        )
    names = list(class_names) if class_names is not None else None
    entries: list[tuple[Path, str, Any]] = []
    found_names: Optional[list[str]] = None
    for f in files:
        if f.suffix.lower() == TAR_SUFFIX:
            entries.extend((f, member, label) for member, label in _tar_samples(f))
        else:
            rows, file_names = _table_samples(f)
            entries.extend((f, member, label) for member, label in rows)
            if file_names is not None:
                if found_names is not None and found_names != file_names:
                    raise DataError(f"{f} names its classes differently from the files before it; give files of one dataset")
                found_names = file_names
        if limit is not None and len(entries) >= limit:
            break
    if not entries:
        raise DataError(f"no images found in {', '.join(map(str, files[:3]))}{' ...' if len(files) > 3 else ''}")
    if limit is not None:
        entries = entries[:limit]
    set_names = names if names is not None else found_names
    index = _label_index([label for _, _, label in entries], set_names)
    if set_names is None and index:
        set_names = sorted(index, key=index.get)  # type: ignore[arg-type]
    records = [ImageRecord(i, path, _to_index(label, index, path, member), member) for i, (path, member, label) in enumerate(entries)]
    root = files[0].parent if len({f.parent for f in files}) == 1 else None
    return ImageSet(records, set_names, root)


def _label_index(labels: list[Any], names: Optional[list[str]]) -> dict[str, int]:
    """Class name -> index for the labels given by name (indices stay as they are)."""
    text = sorted({label for label in labels if isinstance(label, str)})
    if not text:
        return {}
    if names is None:
        return {name: i for i, name in enumerate(text)}
    lookup = {n: i for i, n in enumerate(names)}
    missing = [t for t in text if t not in lookup]
    if missing:
        raise DataError(f"class name(s) {missing[:5]} in the data are not among the {len(names)} class names given")
    return lookup


def _to_index(label: Any, index: dict[str, int], path: Path, member: str) -> Optional[int]:
    if label is None:
        return None
    if isinstance(label, str):
        return index[label]
    if isinstance(label, bool) or not isinstance(label, int) or label < 0:
        raise DataError(f"{path}::{member}: label {label!r} is not a class index (0, 1, 2, ...) or a class name")
    return label


def _tar_samples(shard: Path) -> list[tuple[str, Any]]:
    """``(image member, label)`` per sample of a WebDataset shard, in tar order."""
    samples: dict[str, dict[str, str]] = {}
    for name in _tar_index(shard):
        folder, base = posixpath.split(name)
        if base.startswith(".") or "." not in base:
            continue
        stem, ext = base.split(".", 1)
        samples.setdefault(posixpath.join(folder, stem), {})[ext.lower()] = name
    out: list[tuple[str, Any]] = []
    for key, members in samples.items():
        image = next((members[e] for e in _IMAGE_EXTS if e in members), None)
        if image is None:
            continue  # a sample without an image (e.g. text only) is not an image of the set
        out.append((image, _tar_label(shard, key, members)))
    return out


def _tar_label(shard: Path, key: str, members: dict[str, str]) -> Any:
    if "cls" in members:
        text = read_member(shard, members["cls"]).decode("utf-8", "replace").strip()
        try:
            return int(text)
        except ValueError:
            raise DataError(f"{shard}::{members['cls']}: a .cls member holds a class index, found {text[:40]!r}") from None
    if "json" in members:
        try:
            meta = json.loads(read_member(shard, members["json"]))
        except ValueError as e:
            raise DataError(f"{shard}::{members['json']}: not valid JSON ({e})") from None
        if isinstance(meta, dict):
            for field in ("label", "class_index", "cls", "class_name"):
                if field in meta:
                    return meta[field]
    return None


@functools.lru_cache(maxsize=64)
def _tar_index_cached(path: str, mtime_ns: int, size: int) -> dict[str, tuple[int, int]]:
    index: dict[str, tuple[int, int]] = {}
    try:
        with tarfile.open(path, "r:") as tf:
            for m in tf:
                if m.isfile():
                    index[m.name] = (m.offset_data, m.size)
    except tarfile.ReadError as e:
        raise DataError(f"{path} is not a readable (uncompressed) tar file: {e}") from None
    return index


def _tar_index(shard: Path) -> dict[str, tuple[int, int]]:
    """Member name -> (data offset, size), built once per shard and process (keyed by mtime and size,
    so a rewritten shard is indexed again)."""
    st = shard.stat()
    return _tar_index_cached(str(shard), st.st_mtime_ns, st.st_size)


def _table_samples(path: Path) -> tuple[list[tuple[str, Any]], Optional[list[str]]]:
    """``(row number, label)`` per row of an Arrow/Parquet dataset file, and its class names."""
    table = _read_table(path)
    _, label_col, names = _columns(path, table.schema)
    labels = table.column(label_col).to_pylist() if label_col is not None else [None] * table.num_rows
    if names is not None:
        labels = [None if v is None or v < 0 else v for v in labels]  # ClassLabel's -1 means "no label"
    return [(str(i), v) for i, v in enumerate(labels)], names


def _features(path: Path, schema: Any) -> dict[str, Any]:
    """The Hugging Face feature types of a dataset file: from its schema (``datasets`` writes them
    there) or from a ``save_to_disk`` folder's ``dataset_info.json``."""
    meta = schema.metadata or {}
    if b"huggingface" in meta:
        info = json.loads(meta[b"huggingface"])
        return info.get("info", {}).get("features", {}) or {}
    info_file = path.parent / "dataset_info.json"
    if info_file.is_file():
        return json.loads(info_file.read_text()).get("features", {}) or {}
    return {}


def _columns(path: Path, schema: Any) -> tuple[str, Optional[str], Optional[list[str]]]:
    import pyarrow as pa

    features = _features(path, schema)
    image = next((n for n, f in features.items() if isinstance(f, dict) and f.get("_type") == "Image"), None)
    if image is None:
        image = next(
            (f.name for f in schema if pa.types.is_struct(f.type) and {"bytes", "path"} <= {c.name for c in f.type}), None
        )
    if image is None:
        raise DataError(
            f"{path} has no image column (an Image feature or a {{bytes, path}} struct); columns: {', '.join(schema.names)}"
        )
    label = next((n for n, f in features.items() if isinstance(f, dict) and f.get("_type") == "ClassLabel"), None)
    names = list(features[label]["names"]) if label is not None and "names" in features[label] else None
    if label is None:
        label = next((n for n in ("label", "labels") if n in schema.names and pa.types.is_integer(schema.field(n).type)), None)
    return image, label, names


@functools.lru_cache(maxsize=8)
def _read_table_cached(path: str, mtime_ns: int, size: int) -> Any:
    import pyarrow as pa

    if path.lower().endswith(".parquet"):
        import pyarrow.parquet as pq

        return pq.read_table(path, memory_map=True)
    source = pa.memory_map(path)
    try:
        return pa.ipc.open_stream(source).read_all()  # what Dataset.save_to_disk writes
    except pa.ArrowInvalid:
        return pa.ipc.open_file(source).read_all()


def _read_table(path: Path) -> Any:
    """The whole table, memory-mapped (Arrow) or read once per process (Parquet); cached per file."""
    st = path.stat()
    try:
        return _read_table_cached(str(path), st.st_mtime_ns, st.st_size)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a damaged file
        if isinstance(e, DataError):
            raise
        raise DataError(f"{path} cannot be read as an Arrow/Parquet dataset file ({type(e).__name__}: {e})") from None


# --------------------------------------------------------------------------------------------------
# Reading one image


def read_member(path: Union[str, Path], member: str) -> bytes:
    """The bytes of image ``member`` of container ``path`` (a tar member name, or a row number)."""
    path = Path(path)
    if path.suffix.lower() == TAR_SUFFIX:
        try:
            offset, size = _tar_index(path)[member]
        except KeyError:
            raise ImageError(f"{path}::{member}", "no such member in the shard (was the shard rewritten?)") from None
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read(size)
        if len(data) != size:
            raise ImageError(f"{path}::{member}", f"truncated shard: {len(data)} of {size} bytes")
        return data
    table = _read_table(path)
    image_col, _, _ = _columns(path, table.schema)
    try:
        row = int(member)
        cell = table.column(image_col)[row].as_py()
    except (ValueError, IndexError):
        raise ImageError(f"{path}::{member}", f"no row {member} (the file has {table.num_rows} rows)") from None
    if isinstance(cell, dict):
        if cell.get("bytes"):
            return cell["bytes"]
        if cell.get("path"):
            file = Path(cell["path"])
            if not file.is_absolute():
                file = path.parent / file
            if not file.is_file():
                raise ImageError(f"{path}::{member}", f"the row refers to image file {cell['path']}, which does not exist")
            return file.read_bytes()
        raise ImageError(f"{path}::{member}", "the row's image is empty (no bytes and no path)")
    if isinstance(cell, (bytes, bytearray)):
        return bytes(cell)
    raise ImageError(f"{path}::{member}", f"the image column holds {type(cell).__name__}, not encoded image bytes")


def open_record(record: ImageRecord, max_pixels: Optional[float] = None) -> Image.Image:
    """Decode ``record``'s image, from its file or from inside its container (see :func:`open_image`)."""
    if record.member is None:
        return open_image(record.path, max_pixels=max_pixels)
    try:
        data = read_member(record.path, record.member)
    except OSError as e:
        raise ImageError(record.location, f"cannot read the container ({e.strerror or e})") from None
    return open_image_bytes(data, record.location, max_pixels=max_pixels)

"""`RunStore`: reading and writing the pieces of one run folder, each piece crash-safe.

The analysis pipeline (:mod:`vitscope.pipeline`) decides *what* to compute; this class decides
*where* it goes and makes every write atomic, so that "the piece exists" always means "the step
that writes it finished". That is what lets a killed run resume without redoing finished work.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence, Union

import numpy as np
import pandas as pd
import zarr
from zarr.storage import LocalStore

from vitscope.store import files
from vitscope.store.errors import NotARunError
from vitscope.store.lock import LOCK_NAME
from vitscope.store.layout import ARRAYS, CHUNK_FILES_KEY, CHUNK_META, CHUNKS, EXPLAIN_TABLES, FORMAT, INTERACTION_TABLES, MANIFEST, READOUT_TABLES, REPORT, TABLES, WORK

_GROUP_META = json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {}}).encode()


def _check_name(name: str) -> list[str]:
    parts = name.split("/")
    if not name or any(not p or p.startswith(".") for p in parts):
        raise ValueError(f"invalid array name {name!r}: use names like 'codes/patch' (no empty or hidden parts)")
    return parts


def _ensure_groups(root: Path, parts: Sequence[str]) -> None:
    """Make ``root`` and each parent of an array a zarr v3 group (``zarr.json``), atomically."""
    folder = root
    for part in [None, *parts[:-1]]:
        if part is not None:
            folder = folder / part
        meta = folder / "zarr.json"
        if not meta.exists():
            files.write_bytes(meta, _GROUP_META)


def write_zarr_array(
    root: Path,
    name: str,
    data: np.ndarray,
    *,
    chunks: Optional[Sequence[int]] = None,
    attrs: Optional[Mapping[str, Any]] = None,
) -> None:
    """Write ``data`` as array ``name`` inside the zarr group at ``root``, atomically."""
    with new_zarr_array(root, name, data.shape, data.dtype, chunks=chunks, attrs=attrs) as arr:
        if data.size:
            arr[...] = data


@contextlib.contextmanager
def new_zarr_array(
    root: Path,
    name: str,
    shape: Sequence[int],
    dtype: Any,
    *,
    chunks: Optional[Sequence[int]] = None,
    attrs: Optional[Mapping[str, Any]] = None,
) -> Iterator[zarr.Array]:
    """Yield a writable array that appears as ``root/name`` only when the block finishes without error.

    Lets large arrays be filled piece by piece (bounded memory) while staying crash-safe.
    """
    parts = _check_name(name)
    _ensure_groups(root, parts)
    final = root.joinpath(*parts)
    tmp = files.tmp_sibling(final)
    shape = tuple(int(s) for s in shape)
    if chunks is None:
        chunks = tuple(max(1, s) for s in shape)
    chunks = tuple(max(1, min(int(c), max(1, s))) for c, s in zip(chunks, shape))
    try:
        arr = zarr.create_array(store=LocalStore(str(tmp)), shape=shape, chunks=chunks, dtype=np.dtype(dtype), fill_value=0)
        if attrs:
            arr.attrs.update(dict(attrs))
        yield arr
        files.fsync_tree(tmp)
        files.publish(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def open_zarr_array(root: Path, name: str, mode: str = "r") -> zarr.Array:
    parts = _check_name(name)
    path = root.joinpath(*parts)
    if not (path / "zarr.json").exists():
        raise KeyError(name)
    return zarr.open_array(store=LocalStore(str(path), read_only=(mode == "r")), mode=mode)


def list_zarr_arrays(root: Path) -> list[str]:
    """Names (``a/b``) of every array under the zarr group at ``root``."""
    if not (root / "zarr.json").exists():
        return []
    names = []
    for meta in sorted(root.rglob("zarr.json")):
        rel = meta.parent.relative_to(root)
        if any(p.startswith(".") for p in rel.parts) or not rel.parts:
            continue
        if json.loads(meta.read_text()).get("node_type") == "array":
            names.append("/".join(rel.parts))
    return names


class RunStore:
    """The files of one run folder.

    ``path/manifest.json`` describes the run; final tables are ``path/<name>.parquet``; arrays live in
    the zarr group ``path/arrays.zarr``; per-chunk results of the chunked stage live in
    ``path/chunks/NNNNN/`` (each folder renamed into place only when complete).
    """

    def __init__(self, path: Union[str, Path]) -> None:
        self.path = Path(path)

    # --------------------------------------------------------------- manifest
    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST

    def has_manifest(self) -> bool:
        return self.manifest_path.is_file()

    def read_manifest(self) -> dict[str, Any]:
        if not self.has_manifest():
            raise NotARunError(f"{self.path} is not a vitscope run folder: it has no {MANIFEST}")
        try:
            m = files.read_json(self.manifest_path)
        except (OSError, ValueError) as e:
            raise NotARunError(f"{self.manifest_path} is not readable JSON ({e}); it is not a vitscope run manifest") from e
        if not isinstance(m, dict) or m.get("format") != FORMAT:
            raise NotARunError(f"{self.manifest_path} is not a vitscope run manifest (its 'format' is not {FORMAT!r})")
        return m

    def write_manifest(self, manifest: Mapping[str, Any]) -> None:
        files.write_json(self.manifest_path, dict(manifest))

    # ----------------------------------------------------------------- tables
    def table_path(self, name: str) -> Path:
        return self.path / f"{name}.parquet"

    def has_table(self, name: str) -> bool:
        return self.table_path(name).is_file()

    def write_table(self, name: str, df: pd.DataFrame) -> None:
        files.write_parquet(self.table_path(name), df)

    def read_table(self, name: str, columns: Optional[list[str]] = None) -> pd.DataFrame:
        return files.read_parquet(self.table_path(name), columns=columns)

    # ----------------------------------------------------------------- arrays
    @property
    def arrays_path(self) -> Path:
        return self.path / ARRAYS

    def has_array(self, name: str) -> bool:
        return (self.arrays_path.joinpath(*_check_name(name)) / "zarr.json").is_file()

    def write_array(self, name: str, data: np.ndarray, *, chunks: Optional[Sequence[int]] = None, attrs: Optional[Mapping[str, Any]] = None) -> None:
        write_zarr_array(self.arrays_path, name, np.asarray(data), chunks=chunks, attrs=attrs)

    def new_array(self, name: str, shape: Sequence[int], dtype: Any, *, chunks: Optional[Sequence[int]] = None, attrs: Optional[Mapping[str, Any]] = None):
        return new_zarr_array(self.arrays_path, name, shape, dtype, chunks=chunks, attrs=attrs)

    def array(self, name: str) -> zarr.Array:
        """The zarr array ``name`` (read-only, loaded lazily: slice it to read)."""
        try:
            return open_zarr_array(self.arrays_path, name)
        except KeyError:
            have = ", ".join(self.array_names()) or "none"
            raise KeyError(f"run {self.path} has no array {name!r}; it has: {have}") from None

    def array_names(self) -> list[str]:
        return list_zarr_arrays(self.arrays_path)

    # ----------------------------------------------------------------- chunks
    @property
    def chunks_path(self) -> Path:
        return self.path / CHUNKS

    def chunk_dir(self, index: int) -> Path:
        return self.chunks_path / f"{index:05d}"

    def chunk_done(self, index: int) -> bool:
        return (self.chunk_dir(index) / CHUNK_META).is_file()

    def done_chunks(self) -> list[int]:
        if not self.chunks_path.is_dir():
            return []
        out = []
        for p in self.chunks_path.iterdir():
            if p.name.isdigit() and (p / CHUNK_META).is_file():
                out.append(int(p.name))
        return sorted(out)

    def write_chunk(
        self,
        index: int,
        *,
        tables: Mapping[str, pd.DataFrame],
        arrays: Mapping[str, np.ndarray],
        meta: Mapping[str, Any],
        blobs: Optional[Mapping[str, bytes]] = None,
    ) -> None:
        """Write one chunk's tables, arrays, other files (``blobs``: name -> bytes) and metadata as a
        folder that appears all at once, durably.

        ``chunk.json`` lists every other file with its size and SHA-256 (key ``files``), so a resume
        can tell a chunk that a power loss or a hand truncated (:meth:`verify_chunk`). Every file and
        folder is fsynced before the folder is renamed into place, and the rename itself after.
        """
        final = self.chunk_dir(index)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = files.tmp_sibling(final)
        tmp.mkdir()
        try:
            for name, df in tables.items():
                df.reset_index(drop=True).to_parquet(tmp / f"{name}.parquet", index=False, engine="pyarrow")
            for name, data in arrays.items():
                write_zarr_array(tmp / ARRAYS, name, np.asarray(data))
            for name, data in (blobs or {}).items():
                (tmp / name).write_bytes(data)
            listed = {**dict(meta), CHUNK_FILES_KEY: files.file_digests(tmp)}
            files.fsync_tree(tmp)
            files.write_json(tmp / CHUNK_META, listed)
            files.fsync_dir(tmp)
            files.publish(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def verify_chunk(self, index: int) -> Optional[str]:
        """None when chunk ``index`` holds every file its ``chunk.json`` lists, with the listed size and
        SHA-256; otherwise why not (so the caller can redo the chunk and say so)."""
        folder = self.chunk_dir(index)
        try:
            meta = files.read_json(folder / CHUNK_META)
        except (OSError, ValueError) as e:
            return f"its {CHUNK_META} is unreadable ({e})"
        listed = meta.get(CHUNK_FILES_KEY) if isinstance(meta, dict) else None
        if not isinstance(listed, dict):
            return f"its {CHUNK_META} has no list of files to check"
        return files.check_digests(folder, listed)

    def remove_chunk(self, index: int) -> None:
        """Delete chunk ``index`` (moved aside first, so a half-deleted chunk never looks done)."""
        folder = self.chunk_dir(index)
        if folder.exists():
            aside = files.tmp_sibling(folder)
            os.rename(folder, aside)
            files.fsync_dir(folder.parent)
            shutil.rmtree(aside, ignore_errors=True)

    def read_chunk_blob(self, index: int, name: str) -> bytes:
        return (self.chunk_dir(index) / name).read_bytes()

    def read_chunk_meta(self, index: int) -> dict[str, Any]:
        return files.read_json(self.chunk_dir(index) / CHUNK_META)

    def read_chunk_table(self, index: int, name: str) -> pd.DataFrame:
        return files.read_parquet(self.chunk_dir(index) / f"{name}.parquet")

    def has_chunk_array(self, index: int, name: str) -> bool:
        return (self.chunk_dir(index) / ARRAYS).joinpath(*_check_name(name)).joinpath("zarr.json").is_file()

    def read_chunk_array(self, index: int, name: str) -> np.ndarray:
        return open_zarr_array(self.chunk_dir(index) / ARRAYS, name)[...]

    def remove_chunks(self) -> None:
        shutil.rmtree(self.chunks_path, ignore_errors=True)

    # ------------------------------------------------------------ work files
    def work_path(self, name: str) -> Path:
        p = self.path / WORK / name
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    # ---------------------------------------------------------- housekeeping
    def remove_leftovers(self) -> None:
        """Delete the temporary files a killed run left behind."""
        files.remove_leftovers(self.path)

    def is_empty(self) -> bool:
        """No files besides the folder's lock file (which a starting command creates first)."""
        return not self.path.exists() or not any(p.name != LOCK_NAME for p in self.path.iterdir())

    def clear(self) -> None:
        """Delete everything a run writes (and only that) so the folder can hold a new run."""
        for name in (*TABLES, *INTERACTION_TABLES, *EXPLAIN_TABLES, *READOUT_TABLES):
            self.table_path(name).unlink(missing_ok=True)
        for sub in (ARRAYS, CHUNKS, WORK, REPORT):
            shutil.rmtree(self.path / sub, ignore_errors=True)
        self.remove_leftovers()
        # The manifest goes last: a clear that is interrupted still leaves a recognisable run folder.
        self.manifest_path.unlink(missing_ok=True)

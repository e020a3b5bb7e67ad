"""Crash-safe writes: every file or folder appears complete under its final name, or not at all.

A run can be killed at any instant (Ctrl-C, SIGKILL, a full disk). Each writer below builds its
output under a temporary name in the same folder and renames it into place, which POSIX makes
atomic. A reader therefore sees either the old state or the new one, never half a file, and "the
file exists" is a reliable marker that the step that writes it has finished.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd

#: Temporary names start with this prefix; leftovers from a killed run are removed on the next start.
TMP_PREFIX = ".tmp-"


def tmp_sibling(path: Path) -> Path:
    """A fresh temporary name next to ``path`` (same folder, so the final rename is atomic)."""
    return path.with_name(f"{TMP_PREFIX}{uuid.uuid4().hex[:12]}-{path.name}")


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    """Make a folder's entries (files created, renamed or removed in it) durable."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # a platform that cannot open folders (Windows): nothing more to do there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """fsync every file under ``path`` and then every folder, deepest first, so that after a power
    loss the tree is either absent (not yet published) or whole: no truncated file, no lost entry."""
    folders = []
    for root, _dirs, names in os.walk(path):
        folders.append(Path(root))
        for name in names:
            _fsync_file(Path(root) / name)
    for folder in reversed(folders):
        fsync_dir(folder)


def publish(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` to ``final`` durably; an existing ``final`` (file or folder) is replaced.

    The caller has made ``tmp``'s contents durable (see :func:`fsync_tree`); the parent folder is
    fsynced after the rename, so a published name survives a power loss too.
    """
    if final.is_dir() and not final.is_symlink():
        # A folder cannot be renamed over a non-empty folder: move the old one aside first.
        old = tmp_sibling(final)
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    fsync_dir(final.parent)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_digests(folder: Path) -> dict[str, list[Any]]:
    """``{relative path: [size in bytes, sha256 hex]}`` of every file under ``folder``."""
    out: dict[str, list[Any]] = {}
    for root, _dirs, names in os.walk(folder):
        for name in names:
            p = Path(root) / name
            out[p.relative_to(folder).as_posix()] = [p.stat().st_size, _sha256(p)]
    return dict(sorted(out.items()))


def check_digests(folder: Path, expected: dict[str, list[Any]]) -> Optional[str]:
    """None when every file of ``expected`` is in ``folder`` with its size and sha256, else what is wrong."""
    for rel, (size, digest) in expected.items():
        p = folder / rel
        if not p.is_file():
            return f"{rel} is missing"
        have = p.stat().st_size
        if have != int(size):
            return f"{rel} is {have} bytes, expected {int(size)}"
        if _sha256(p) != digest:
            return f"{rel} does not match its checksum"
    return None


def write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_sibling(path)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    publish(tmp, path)


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"cannot write {type(o).__name__} to JSON")


def to_json(obj: Any) -> str:
    return json.dumps(obj, indent=2, default=_json_default, allow_nan=True)


def write_json(path: Path, obj: Any) -> None:
    write_bytes(path, to_json(obj).encode("utf-8"))


def read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write_parquet(path: Path, df: pd.DataFrame) -> None:
    """Write ``df`` (without its index) as one Parquet file, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_sibling(path)
    df.reset_index(drop=True).to_parquet(tmp, index=False, engine="pyarrow")
    _fsync_file(tmp)
    publish(tmp, path)


def read_parquet(path: Path, columns: Optional[list[str]] = None) -> pd.DataFrame:
    return pd.read_parquet(path, columns=columns, engine="pyarrow")


def remove_leftovers(folder: Path) -> None:
    """Delete temporary files and folders a killed run left behind (recursively)."""
    if not folder.is_dir():
        return
    for p in sorted(folder.rglob(f"{TMP_PREFIX}*"), key=lambda q: len(q.parts), reverse=True):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        elif p.exists() or p.is_symlink():
            p.unlink(missing_ok=True)

"""The run folder's file kinds, each written crash-safely: JSON, Parquet, raw bytes, and the size /
SHA-256 lists that let a resume check a finished chunk.

A run can be killed at any instant (Ctrl-C, SIGKILL, a full disk, a power loss). Every writer here
goes through :mod:`vitscope.core.atomic` (temporary name, fsync, rename), so a reader sees either
the old state or the new one, never half a file, and "the file exists" is a reliable marker that
the step that writes it has finished.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd

# The atomic-write primitives live in the core (every layer writes files this way); the run store
# adds its own file kinds (JSON, Parquet, digests) on top.
from vitscope.core.atomic import TMP_PREFIX, fsync_file, fsync_dir, fsync_tree, publish, tmp_sibling, write_bytes

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
    fsync_file(tmp)
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


__all__ = [
    "TMP_PREFIX", "check_digests", "file_digests", "fsync_dir", "fsync_tree", "publish", "read_json", "read_parquet",
    "remove_leftovers", "tmp_sibling", "to_json", "write_bytes", "write_json", "write_parquet", "fsync_file",
]  # fmt: skip

"""Crash-safe writes, the one way vitscope writes a file or folder: build it under a temporary name
in the same folder, make it durable (fsync), rename it into place (atomic on POSIX), fsync the folder.

A reader therefore sees either the old state or the new one, never half a file, even after a
crash or a power loss, and "the file exists" is a reliable marker that the step that writes it
has finished. Leftover temporary names (a killed writer) start with :data:`TMP_PREFIX`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator, Union

#: Temporary names start with this prefix; leftovers from a killed run are removed on the next start.
TMP_PREFIX = ".tmp-"


def tmp_sibling(path: Path) -> Path:
    """A fresh temporary name next to ``path`` (same folder, so the final rename is atomic)."""
    return path.with_name(f"{TMP_PREFIX}{uuid.uuid4().hex[:12]}-{path.name}")


def fsync_file(path: Path) -> None:
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
            fsync_file(Path(root) / name)
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


def write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_sibling(path)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    publish(tmp, path)


@contextlib.contextmanager
def atomic_path(path: Union[str, Path]) -> Iterator[Path]:
    """Yield a temporary path next to ``path`` for a writer that wants a file name (``torch.save``,
    safetensors, matplotlib); on success the file is fsynced and published as ``path``, on error removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_sibling(path)
    try:
        yield tmp
        fsync_file(tmp)
        publish(tmp, path)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise

"""An exclusive lock on a run folder, so that two commands never write one run at once.

The lock is an OS advisory lock (``flock`` on POSIX, ``msvcrt.locking`` on Windows) on the file
``<run>/.vitscope.lock``. The operating system releases it when the holding process exits, however
it exits (crash, ``kill -9``, power loss), so there is never a stale lock to delete by hand. The
file itself stays and records who holds (or last held) the lock, for the error message.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Optional, Union

from vitscope.store.errors import RunLockedError

#: Name of the lock file inside a run folder (ignored when deciding whether a folder is empty).
LOCK_NAME = ".vitscope.lock"


def _try_lock(fh: IO[str]) -> bool:
    if sys.platform == "win32":  # pragma: no cover - exercised on Windows only
        import msvcrt

        try:
            msvcrt.locking(fh.fileno(), msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False
    import fcntl

    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _unlock(fh: IO[str]) -> None:
    if sys.platform == "win32":  # pragma: no cover
        import msvcrt

        msvcrt.locking(fh.fileno(), msvcrt.LK_UNLCK, 1)
    else:
        import fcntl

        fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def read_holder(folder: Union[str, Path]) -> dict[str, Any]:
    """Who holds (or last held) the lock of ``folder``: ``pid``, ``host``, ``command``, ``since``."""
    try:
        return dict(json.loads((Path(folder) / LOCK_NAME).read_text() or "{}"))
    except (OSError, ValueError):
        return {}


class RunLock:
    """Hold the exclusive lock of a run folder inside a ``with`` block.

    ``RunLock(folder, command="vitscope analyze ...")`` creates the folder if needed and takes the
    lock without waiting; if another process holds it, :class:`RunLockedError` names that process
    and its command. The lock is re-entrant within one process only through the same object.
    """

    def __init__(self, folder: Union[str, Path], command: Optional[str] = None, job: Optional[str] = None) -> None:
        self.folder = Path(folder)
        self.command = command
        #: The id of the parallel job (e.g. torchrun's) whose processes share this lock, if any.
        self.job = job
        self._fh: Optional[IO[str]] = None

    @property
    def path(self) -> Path:
        return self.folder / LOCK_NAME

    def acquire(self) -> "RunLock":
        if self._fh is not None:
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        # "a+" neither truncates the holder's record before we own the lock nor fails if it exists.
        fh = open(self.path, "a+", encoding="utf-8")
        if not _try_lock(fh):
            fh.close()
            holder = read_holder(self.folder)
            who = f"process {holder.get('pid', '?')} on {holder.get('host', '?')}"
            what = f" ({holder['command']})" if holder.get("command") else ""
            since = f", since {holder['since']}" if holder.get("since") else ""
            raise RunLockedError(
                f"{self.folder} is in use by {who}{what}{since}. Wait for it to finish, or stop it and rerun "
                "this command to resume the run; use another --out folder to run both at once."
            )
        fh.seek(0)
        fh.truncate()
        record = {"pid": os.getpid(), "host": socket.gethostname(), "command": self.command,
                  "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        if self.job is not None:
            record["job"] = self.job
        fh.write(json.dumps(record))
        fh.flush()
        self._fh = fh
        return self

    def release(self) -> None:
        if self._fh is None:
            return
        try:
            _unlock(self._fh)
        finally:
            self._fh.close()
            self._fh = None

    @property
    def held(self) -> bool:
        return self._fh is not None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, exc_type: Optional[type[BaseException]], exc: Optional[BaseException], tb: Optional[TracebackType]) -> None:
        self.release()


def check_job_holds(folder: Union[str, Path], job: str) -> None:
    """Raise :class:`RunLockedError` unless the lock of ``folder`` is held, by the job ``job``.

    The other processes of a parallel job call this instead of taking the lock themselves: the
    job's first process holds it for all of them.
    """
    folder = Path(folder)
    path = folder / LOCK_NAME
    held = False
    if path.is_file():
        with open(path, "a+", encoding="utf-8") as fh:
            held = not _try_lock(fh)
            if not held:
                _unlock(fh)
    holder = read_holder(folder)
    if not held or holder.get("job") != job:
        who = f"process {holder.get('pid', '?')} on {holder.get('host', '?')}" if held else "nobody"
        raise RunLockedError(
            f"{folder}'s lock is held by {who}, not by this job ({job}); run every process of the job with the same "
            "--out folder, and no other command on it"
        )

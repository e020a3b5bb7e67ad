"""How long-running steps report progress: the :class:`Progress` protocol, a silent one and rich's bars.

The pipeline and training report to a ``Progress`` they are handed and never draw anything
themselves; the command line (and ``progress=True`` in the Python API) hands them
:func:`rich_progress`, tests and notebooks that want quiet hand them :class:`NoProgress`.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional, Protocol, Union


class Progress(Protocol):
    """Tasks with a total, advanced as work finishes, and log lines above the bars."""

    def add_task(self, description: str, total: Optional[float] = None, completed: float = 0) -> int: ...

    def update(self, task: int, **fields: Any) -> None: ...

    def advance(self, task: int, n: float = 1) -> None: ...

    def log(self, *message: Any) -> None: ...


class NoProgress:
    """A :class:`Progress` that shows nothing."""

    def add_task(self, description: str, total: Optional[float] = None, completed: float = 0) -> int:
        return 0

    def update(self, task: int, **fields: Any) -> None:
        pass

    def advance(self, task: int, n: float = 1) -> None:
        pass

    def log(self, *message: Any) -> None:
        pass


class _RichProgress:
    """rich's ``Progress`` behind the :class:`Progress` protocol (its log goes to the same console)."""

    def __init__(self, prog: Any) -> None:
        self.prog = prog

    def add_task(self, description: str, total: Optional[float] = None, completed: float = 0) -> int:
        return self.prog.add_task(description, total=total, completed=completed)

    def update(self, task: int, **fields: Any) -> None:
        self.prog.update(task, **fields)

    def advance(self, task: int, n: float = 1) -> None:
        self.prog.advance(task, n)

    def log(self, *message: Any) -> None:
        self.prog.console.log(*message)


@contextlib.contextmanager
def rich_progress(console: Any = None) -> Iterator[Progress]:
    """Bars with elapsed and remaining time on ``console`` (default: stderr), for the block's length."""
    from rich.progress import BarColumn, MofNCompleteColumn, SpinnerColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
    from rich.progress import Progress as RichBars

    if console is None:
        from rich.console import Console

        console = Console(stderr=True)
    with RichBars(
        SpinnerColumn(),
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
    ) as prog:
        yield _RichProgress(prog)


@contextlib.contextmanager
def progress_for(progress: Union[bool, Progress, None], console: Any = None) -> Iterator[Progress]:
    """``True``: rich bars on ``console``; ``False``/``None``: silent; a :class:`Progress`: itself."""
    if progress is True:
        with rich_progress(console) as prog:
            yield prog
    elif not progress:
        yield NoProgress()
    else:
        yield progress

"""Drawing a report's figures, side by side in forked processes where the platform forks."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from vitscope.figures.save import save_figure
from vitscope.report.registry import ReportFigure

#: The figure plan the drawing processes read (set just before they are forked; see _draw_all).
_PLAN: list[ReportFigure] = []


def _draw_one(index: int, folder: Path, formats: Sequence[str]) -> None:
    fig = _PLAN[index]
    save_figure(fig.draw(), folder, fig.stem, formats)


def draw_all(plan: list[ReportFigure], folder: Path, formats: Sequence[str], workers: Optional[int]) -> None:
    """Draw every figure of ``plan``, in forked worker processes where the platform forks (the
    figures are independent and drawing is CPU-bound; forked workers inherit the plan and the run
    already open, so nothing is pickled but an index)."""
    import multiprocessing as mp
    import os

    from concurrent.futures import ProcessPoolExecutor

    global _PLAN
    n = min(len(plan), workers if workers is not None else min(4, os.cpu_count() or 1))
    _PLAN = plan
    try:
        if n <= 1 or "fork" not in mp.get_all_start_methods():
            for i in range(len(plan)):
                _draw_one(i, folder, formats)
            return
        with ProcessPoolExecutor(max_workers=n, mp_context=mp.get_context("fork")) as pool:
            for done in [pool.submit(_draw_one, i, folder, formats) for i in range(len(plan))]:
                done.result()  # a figure that fails to draw fails the report, with its own error
    finally:
        _PLAN = []

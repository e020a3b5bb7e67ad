"""`write_report`: one figure per analysis of a run (PNG, SVG on request) and an ``index.html`` that shows them.

Figures follow the papers' views: head importance per metric (layer x head heatmap and the paper's
head-index axis ``layer * H + head`` with 95% bootstrap intervals), metric agreement, cumulative
pruning curves, head entropy by layer, hop profiles, mean attention distance, the attention-pattern
embedding with density contours, the decoded pattern prototypes, the image overview and, for runs
with ``--interactions`` or of a WinfT, the second paper's figures. Which figures a run gets is the
registry's (:mod:`vitscope.report.registry`); the figures themselves live in :mod:`vitscope.figures`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional, Union

from vitscope.report.draw import draw_all
from vitscope.report.html import report_html
from vitscope.report.registry import PROVIDERS, ReportFigure, figure_plan, report_figures

if TYPE_CHECKING:  # pragma: no cover
    from vitscope.store import Run

#: Every format a figure can be written in (SVG only with ``svg=True``).
FORMATS = ("png", "svg")

__all__ = ["FORMATS", "PROVIDERS", "ReportFigure", "figure_plan", "report_figures", "write_report"]


def write_report(run: Union["Run", str, Path], out: Union[str, Path, None] = None, *, svg: bool = False,
                 workers: Optional[int] = None) -> Path:
    """Write every figure as ``<name>.png`` (and ``<name>.svg`` with ``svg``) and ``index.html`` into ``out``.

    ``run`` is a :class:`~vitscope.store.Run` or a run folder; ``out`` defaults to ``RUN/report``.
    Everything is drawn from the run alone (no model, no weights file). SVG files are written only
    on request: drawing each figure a second time for them doubles the report's cost. ``workers``
    processes draw the figures side by side (default: up to 4, one per core; 1 draws in this
    process); the files are the same either way.
    Returns the path of ``index.html``.
    """
    from vitscope.store import Run, open_run

    if not isinstance(run, Run):
        run = open_run(run)
    folder = Path(out) if out is not None else run.path / "report"
    folder.mkdir(parents=True, exist_ok=True)
    formats = FORMATS if svg else ("png",)
    plan = figure_plan(run)
    draw_all(plan, folder, formats, workers)
    index = folder / "index.html"
    index.write_text(report_html(run, plan, svg=svg), encoding="utf-8")
    return index

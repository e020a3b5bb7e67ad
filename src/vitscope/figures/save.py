"""Saving a figure the same way everywhere: PNG and SVG, byte-identical when re-drawn."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    from matplotlib.figure import Figure

#: Formats a figure is saved in by default.
FORMATS = ("png", "svg")


def save_figure(fig: "Figure", folder: Path, stem: str, formats: Sequence[str] = FORMATS, dpi: int = 130) -> list[Path]:
    """Write ``folder/<stem>.<fmt>`` for each format; returns the paths.

    No timestamps, no software tag and fixed SVG ids, so re-running a report gives identical files
    (and a diff of a paper's figures shows only what changed).
    """
    import matplotlib

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    with matplotlib.rc_context({"svg.hashsalt": "vitscope"}):
        for fmt in formats:
            meta = {"Date": None} if fmt == "svg" else {"Software": None}
            path = folder / f"{stem}.{fmt}"
            fig.savefig(path, format=fmt, dpi=dpi if fmt == "png" else None, metadata=meta)
            paths.append(path)
    return paths

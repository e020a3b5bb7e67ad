"""Helpers of the browser tests (imported by conftest.py and the tests): waiting for the views,
changing the selection, screenshots."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Optional

ARTIFACTS = Path(os.environ.get("VITSCOPE_ARTIFACTS", Path(__file__).parent / "artifacts"))
READY_TIMEOUT_MS = 30_000
VIEWS = ["image-overview", "head-importance", "attention-strength", "attention-pattern", "patch-interactions"]


def wait_drawn(pg: Any, since: Optional[float] = None, timeout_ms: int = READY_TIMEOUT_MS) -> None:
    """Wait until the views have settled: two animation frames have passed (every synchronous redraw
    of the last change is done) and no view waits for a live answer or a table. With ``since`` (a
    ``performance.now()`` read in the page), also wait until at least one view redrew after it."""
    pg.evaluate("() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")
    pg.wait_for_function(
        """(since) => {
            const d = window.vitscope && window.vitscope.drawn;
            if (!d || d.pending.size !== 0) return false;
            if (since === null) return true;
            return Object.values(d.last).some(t => t >= since);
        }""",
        arg=since,
        timeout=timeout_ms,
    )


def select(pg: Any, **patch: Any) -> None:
    """Change the shared selection as a click would, and wait until the views have settled."""
    pg.evaluate("(p) => window.vitscope.select(p)", patch)
    wait_drawn(pg)


def shot(pg: Any, name: str, selector: Optional[str] = None) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    if selector:
        pg.locator(selector).screenshot(path=str(path))
    else:
        pg.screenshot(path=str(path))
    return path


def copy_artifact(src: Path, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    dst = ARTIFACTS / name
    shutil.copyfile(src, dst)
    return dst

"""The run folder: what ``vitscope analyze`` writes and :func:`open_run` reads back.

Layout (see docs/run-format.md): ``manifest.json``, tidy Parquet tables (``images``, ``heads``,
``image_heads``, ``agreement``, ``curves``, ``patterns``, ``pattern_clusters``) and a zarr group
``arrays.zarr`` with the large arrays. Every piece is written atomically, which is what makes an
interrupted run resumable.
"""

from vitscope.store.errors import DamagedChunkWarning, NotARunError, RunError, RunLockedError, RunMismatchError, UnfinishedRunError
from vitscope.store.lock import RunLock
from vitscope.store.reader import PATTERN_KINDS, PatternCatalogue, Run, open_run
from vitscope.store.writer import RunStore

__all__ = [
    "DamagedChunkWarning",
    "PATTERN_KINDS",
    "NotARunError",
    "PatternCatalogue",
    "Run",
    "RunError",
    "RunLock",
    "RunLockedError",
    "RunMismatchError",
    "RunStore",
    "UnfinishedRunError",
    "open_run",
]

"""The ``analyze`` pipeline: images -> model + probes -> analyses -> run store.

- :mod:`.analyze`: the entry point (open, resume or refuse a run folder; lock it; drive the stages);
- :mod:`.batch`: every per-image analysis of one batch;
- :mod:`.chunks`: the chunked stage (each chunk published atomically, independent of the others);
- :mod:`.steps`: the final steps, one module each (gather, summaries, curves, patterns, overview,
  interactions, model masks);
- :mod:`.manifest`: what the run records about its model and images.

The run format itself (table names, paths, the manifest's schema) belongs to :mod:`vitscope.store`;
progress display is handed in (:mod:`vitscope.core.progress`).
"""

from vitscope.analysis.settings import AnalyzeSettings
from vitscope.pipeline.analyze import analyze
from vitscope.pipeline.batch import BatchResult, analyze_batch

__all__ = ["AnalyzeSettings", "BatchResult", "analyze", "analyze_batch"]

"""Names inside a run folder (documented in docs/run-format.md)."""

from __future__ import annotations

#: ``manifest.json["format"]`` of every run folder.
FORMAT = "vitscope-run"
#: Bumped when the folder layout or a table's meaning changes incompatibly.
FORMAT_VERSION = 1

MANIFEST = "manifest.json"
ARRAYS = "arrays.zarr"
#: Per-chunk results of an unfinished (or finished, not yet cleaned) run: ``chunks/00000/`` ...
CHUNKS = "chunks"
#: Each chunk's metadata file, written last; it lists the chunk's other files under ``files``
#: (``{relative path: [size, sha256]}``), which a resume checks before trusting the chunk.
CHUNK_META = "chunk.json"
CHUNK_FILES_KEY = "files"
#: Intermediate results of the final steps (autoencoder weights), kept so a resume skips them.
WORK = "work"
#: Default output folder of ``vitscope report``.
REPORT = "report"

#: The final tables, each ``<name>.parquet``.
TABLES = ("images", "heads", "image_heads", "agreement", "curves", "patterns", "pattern_clusters")
#: The tables of the patch-interaction analyses (``analyze --interactions``), each ``<name>.parquet``.
INTERACTION_TABLES = (
    "interaction_layers",
    "field_image_queries",
    "field_image_layers",
    "field_queries",
    "field_layers",
    "window_curve",
    "removal_curve",
    "removal_summary",
    "interaction_agreement",
)
#: The tables of the explanation analyses (``analyze --explain ... --explain-faithfulness``), each
#: ``<name>.parquet``: one row per (image, method) with the faithfulness AUCs.
EXPLAIN_TABLES = ("explain_faithfulness",)
#: The tables of the readout layers (models whose readout attends: CaiT's class attention, attention
#: pooling), each ``<name>.parquet``: one row per (image, readout layer, head) and per (readout layer, head).
READOUT_TABLES = ("readout_image_heads", "readout_heads")
#: Each chunk's own interaction and field statistics (``.npz``), merged over chunks at the end.
INTERACTION_STATE = "interaction_state.npz"

STATUS_RUNNING = "running"
STATUS_COMPLETE = "complete"

"""`open_run`: a finished run folder as pandas DataFrames and arrays, for notebooks and reports."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Union

import numpy as np
import pandas as pd
import zarr

from vitscope.store.errors import NotARunError, UnfinishedRunError
from vitscope.store.layout import FORMAT_VERSION, STATUS_COMPLETE, TABLES
from vitscope.store.writer import RunStore

#: The pattern catalogues a run can hold: patch->patch attention, and CLS attention (models with a CLS token).
PATTERN_KINDS = ("patch", "cls")


@dataclass
class PatternCatalogue:
    """The learned attention-pattern catalogue of one kind of attention (``"patch"`` or ``"cls"``).

    Attributes:
        kind: ``"patch"`` (the patch->patch block) or ``"cls"`` (CLS row and column on the grid).
        input: the map the autoencoder learned (``pattern_inputs/<input>``): ``"offset"`` (relative-
            offset profile + key map) or ``"patch"`` (pooled block) for ``kind="patch"``; ``"cls"``.
        maps: one row per (image, layer, head): ``image_id, layer, head, x, y, cluster``
            (``x, y``: the 2-D projection of the map's latent code).
        clusters: one row per cluster: ``cluster, size, share, name, x, y`` (``name``: a short
            description of the decoded prototype; ``x, y``: the cluster's mean position).
        prototypes: decoded cluster prototypes, ``(K, C, S, S)`` in the same units as the inputs.
        density: density of the embedding on a regular grid, ``(G, G)``, rows along ``y``.
        extent: ``(xmin, xmax, ymin, ymax)`` covered by ``density``.
    """

    kind: str
    input: str
    maps: pd.DataFrame
    clusters: pd.DataFrame
    prototypes: np.ndarray
    density: np.ndarray
    extent: tuple[float, float, float, float]


class Run:
    """A finished ``vitscope analyze`` run. Create with :func:`open_run`.

    Tables are read on first access and cached:

    - ``images``: one row per analysed image (``image_id, path, label, prediction, probability,
      overview_x, overview_y`` and more, see docs/run-format.md);
    - ``heads``: one row per (layer, head) with every importance metric and its 95% bootstrap
      interval, strength summaries and the head's dominant pattern cluster;
    - ``image_heads``: one row per (image, layer, head);
    - ``curves``: cumulative pruning curves ``(metric, k, accuracy)``;
    - ``agreement``: rank correlation between every pair of importance metrics;
    - ``patterns``: ``{"patch": PatternCatalogue, "cls": PatternCatalogue}``.

    Large arrays (pattern inputs, latent codes, mean attention) are zarr arrays: ``run.array(name)``.
    """

    def __init__(self, store: RunStore, manifest: dict[str, Any]) -> None:
        self.store = store
        self.manifest = manifest

    @property
    def path(self) -> Path:
        return self.store.path

    def __repr__(self) -> str:
        m = self.manifest
        model = m.get("model", {})
        return (
            f"Run({str(self.path)!r}, model={model.get('spec')!r}, images={m.get('counts', {}).get('analysed')}, "
            f"failed={len(m.get('failures', []))}, layers x heads={model.get('num_layers')} x {model.get('num_heads')})"
        )

    # ----------------------------------------------------------------- tables
    def _table(self, name: str) -> pd.DataFrame:
        if not self.store.has_table(name):
            raise NotARunError(f"run {self.path} is missing {name}.parquet; the folder is damaged, rerun `vitscope analyze` with --overwrite")
        return self.store.read_table(name)

    def has_table(self, name: str) -> bool:
        """Whether the run holds ``<name>.parquet`` (optional tables such as ``window_curve`` exist only
        for runs made with ``--interactions``)."""
        return self.store.has_table(name)

    def table(self, name: str) -> pd.DataFrame:
        """Any table of the run by name, e.g. ``"interaction_layers"`` or ``"window_curve"`` (read each call)."""
        if not self.store.has_table(name):
            have = sorted(p.stem for p in self.path.glob("*.parquet"))
            hint = " (interaction tables need `vitscope analyze --interactions`)" if name not in TABLES else ""
            raise KeyError(f"run {self.path} has no table {name!r}{hint}; it has: {', '.join(have) or 'none'}")
        return self.store.read_table(name)

    @cached_property
    def images(self) -> pd.DataFrame:
        return self._table("images")

    @cached_property
    def heads(self) -> pd.DataFrame:
        return self._table("heads")

    @cached_property
    def image_heads(self) -> pd.DataFrame:
        return self._table("image_heads")

    @cached_property
    def curves(self) -> pd.DataFrame:
        return self._table("curves")

    @cached_property
    def agreement(self) -> pd.DataFrame:
        return self._table("agreement")

    @cached_property
    def failures(self) -> pd.DataFrame:
        """Images that could not be analysed: ``image_id, path, reason, stage`` (one row each)."""
        return pd.DataFrame(self.manifest.get("failures", []), columns=["image_id", "path", "reason", "stage"])

    @cached_property
    def patterns(self) -> dict[str, PatternCatalogue]:
        maps = self._table("patterns")
        clusters = self._table("pattern_clusters")
        out = {}
        for kind in [k for k in PATTERN_KINDS if k in set(clusters["kind"])]:
            dens = self.array(f"patterns/{kind}/density")
            protos = self.array(f"patterns/{kind}/prototypes")
            out[kind] = PatternCatalogue(
                kind=kind,
                input=str(protos.attrs.get("input", kind)),
                maps=maps[maps["kind"] == kind].drop(columns="kind").reset_index(drop=True),
                clusters=clusters[clusters["kind"] == kind].drop(columns="kind").reset_index(drop=True),
                prototypes=protos[...],
                density=dens[...],
                extent=tuple(float(v) for v in dens.attrs["extent"]),  # type: ignore[arg-type]
            )
        return out

    # ----------------------------------------------------------------- arrays
    def array(self, name: str) -> zarr.Array:
        """Zarr array ``name`` (e.g. ``"pattern_inputs/patch"``, ``"patterns/cls/codes"``); slice it to read."""
        return self.store.array(name)

    def arrays(self) -> list[str]:
        """Names of every array in the run."""
        return self.store.array_names()

    # ---------------------------------------------------------- conveniences
    @property
    def num_layers(self) -> int:
        return int(self.manifest["model"]["num_layers"])

    @property
    def num_heads(self) -> int:
        return int(self.manifest["model"]["num_heads"])

    def head_matrix(self, column: str) -> np.ndarray:
        """``heads[column]`` as a ``(layers, heads)`` matrix (e.g. for a heatmap)."""
        if column not in self.heads.columns:
            raise KeyError(f"heads has no column {column!r}; columns: {', '.join(self.heads.columns)}")
        out = np.full((self.num_layers, self.num_heads), np.nan)
        out[self.heads["layer"].to_numpy(), self.heads["head"].to_numpy()] = self.heads[column].to_numpy(dtype=float)
        return out

    def image_head_array(self, column: str) -> np.ndarray:
        """``image_heads[column]`` as ``(images, layers, heads)`` in ``images`` row order."""
        ih = self.image_heads
        if column not in ih.columns:
            raise KeyError(f"image_heads has no column {column!r}; columns: {', '.join(ih.columns)}")
        pos = pd.Series(np.arange(len(self.images)), index=self.images["image_id"])
        rows = pos.loc[ih["image_id"]].to_numpy()
        out = np.full((len(self.images), self.num_layers, self.num_heads), np.nan)
        out[rows, ih["layer"].to_numpy(), ih["head"].to_numpy()] = ih[column].to_numpy(dtype=float)
        return out


def open_run(path: Union[str, Path]) -> Run:
    """Open the run folder written by ``vitscope analyze --out PATH``.

    Raises :class:`NotARunError` for a folder that is not a run and :class:`UnfinishedRunError`
    for a run that has not finished (rerun the same ``vitscope analyze`` command to resume it).
    """
    store = RunStore(path)
    if not store.path.exists():
        raise NotARunError(f"run folder {store.path} does not exist; create it with `vitscope analyze --out {store.path}`")
    if not store.path.is_dir():
        raise NotARunError(f"{store.path} is a file, not a run folder")
    manifest = store.read_manifest()
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise NotARunError(
            f"run {store.path} has format version {version!r}, newer than this vitscope understands ({FORMAT_VERSION}); upgrade vitscope"
        )
    if manifest.get("status") != STATUS_COMPLETE:
        total = manifest.get("chunks", {}).get("count")
        done = len(store.done_chunks())
        where = f"{done} of {total} image chunks done" if total is not None else "not finished"
        cmd = manifest.get("command") or "vitscope analyze ... --out " + str(store.path)
        raise UnfinishedRunError(f"run {store.path} is unfinished ({where}); rerun the same command to resume it: {cmd}")
    return Run(store, manifest)

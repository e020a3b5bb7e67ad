"""What every step of one ``analyze`` invocation shares: the model, the images, the store, the settings."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional, Sequence

import numpy as np
import pandas as pd
import torch

from vitscope.analysis.settings import AnalyzeSettings
from vitscope.pipeline.batch import Clock
from vitscope.pipeline.distributed import Job
from vitscope.store.writer import RunStore

if TYPE_CHECKING:  # pragma: no cover
    from vitscope.data import Batch, ImageRecord, ImageSet
    from vitscope.models.vit import ViT
    from vitscope.pipeline.readout import RunReadout


@dataclass
class RunContext:
    """One invocation of ``analyze`` on one run folder."""

    vit: "ViT"
    image_set: "ImageSet"
    store: RunStore
    settings: AnalyzeSettings
    manifest: dict[str, Any]
    num_workers: int = 0
    #: This process's place in a parallel (torchrun) job; one process by default.
    job: Job = field(default_factory=Job)
    #: Seconds spent in each part of this invocation (recorded in the manifest as ``timings``).
    timings: dict[str, float] = field(default_factory=dict)
    #: Which model view scores which image (a cross-fitted probe has one per fold); default: ``vit``.
    readout: Optional["RunReadout"] = None

    def __post_init__(self) -> None:
        if self.readout is None:
            from vitscope.pipeline.readout import RunReadout

            self.readout = RunReadout([self.vit])
        self.records: list["ImageRecord"] = list(self.image_set.records)
        self.n_chunks = int(self.manifest["chunks"]["count"])
        self.clock = Clock(self.timings)

    def chunk_records(self, index: int) -> list["ImageRecord"]:
        """The images of chunk ``index`` (always the same ones, whatever happened before)."""
        b = self.settings.batch_size
        return self.records[index * b : (index + 1) * b]

    def decode(self, records: Sequence["ImageRecord"], on_failure: Callable[["ImageRecord", str], None]) -> list["Batch"]:
        """``records`` decoded and preprocessed into batches; unreadable ones go to ``on_failure``."""
        from vitscope.data import VitscopeDataWarning, iter_batches

        with warnings.catch_warnings():
            # Failures are reported through on_failure (logged, and listed in the manifest).
            warnings.simplefilter("ignore", VitscopeDataWarning)
            return list(
                iter_batches(records, self.vit.preprocessing, batch_size=self.settings.batch_size, num_workers=self.num_workers, on_failure=on_failure)
            )

    def target_batches(self, images: pd.DataFrame) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(x, target)`` batches of the analysed ``images`` (rows of the images table), in row order."""
        by_id = {r.image_id: r for r in self.records}
        targets = dict(zip(images["image_id"].astype(int), images["target"].astype(int)))
        for b in self.decode([by_id[int(i)] for i in images["image_id"]], lambda rec, why: None):
            yield b.x, torch.tensor([targets[i] for i in b.image_ids])

    def catalogues(self) -> dict[str, str]:
        """Pattern catalogues of this run (name -> input map kind); ``cls`` only with a CLS token."""
        cats = self.settings.catalogue_inputs()
        if self.vit.layout.cls_index is None:
            cats.pop("cls")
        return cats

    # The image subsets of the curves (seeded, so a resumed run picks the same ones) ------------
    def curve_subset(self, images: pd.DataFrame) -> pd.DataFrame:
        """The seeded random subset of analysed images used for the pruning curves (in image order)."""
        n = self.settings.curve_images
        if n == 0 or n >= len(images):
            return images
        rng = np.random.default_rng(self.settings.seed)
        pick = np.sort(rng.choice(len(images), size=n, replace=False))
        return images.iloc[pick]

    def curve_split(self, images: pd.DataFrame) -> np.ndarray:
        """Each analysed image's part in the pruning curves: ``"evaluate"`` (the curves are measured
        on it) or ``"rank"`` (the heads are ranked on it), in image order.

        Ranking heads on the images a curve is measured on flatters every metric (it is fitted to
        them), so the curves are held out: the evaluation images are the seeded curve subset, at most
        half the images, and the heads are ranked on all the others. With fewer than two images
        there is nothing to hold out and every image is both ranked and evaluated.
        """
        n = len(images)
        role = np.full(n, "rank", dtype=object)
        if n < 2:
            role[:] = "evaluate"
            return role
        size = self.settings.curve_images
        size = n // 2 if size == 0 or size > n // 2 else size
        rng = np.random.default_rng(self.settings.seed)
        role[rng.choice(n, size=size, replace=False)] = "evaluate"
        return role

    def interaction_subsets(self, images: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
        """``(fit, evaluate)`` images of the window and removal curves: the seeded curve subset
        (:meth:`curve_subset`), every second image ranking keys, the others evaluated."""
        subset = self.curve_subset(images)
        return subset.iloc[0::2], subset.iloc[1::2]

"""The class readout of a ``zero-shot`` or ``probe`` run: how a backbone gets class logits.

``zero-shot``: one :class:`~vitscope.models.readouts.ZeroShotReadout` from the model's own text
tower, for every image. ``probe``: the images are dealt into folds (stratified by class, seeded),
one linear probe per fold is fitted on the other folds' unpruned embeddings, and every analysis
scores an image through its own fold's probe. The probes are written into the run
(``readout/probe_weight``, ``readout/probe_bias``, ``readout/probe_fold``) before any chunk, so a
resumed run scores with the same ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

if TYPE_CHECKING:  # pragma: no cover
    from vitscope.analysis.settings import AnalyzeSettings
    from vitscope.data import ImageSet
    from vitscope.models.vit import ViT
    from vitscope.pipeline.distributed import Job
    from vitscope.store.writer import RunStore


@dataclass
class RunReadout:
    """Which model view scores which image: ``models[fold]``, ``fold_of[image_id]`` (one fold, the
    model itself, unless the run cross-fits a probe)."""

    models: list["ViT"]
    fold_of: dict[int, int] = field(default_factory=dict)

    def groups(self, image_ids: Sequence[int]) -> list[tuple["ViT", np.ndarray]]:
        """``(model, row positions)`` for the rows of a batch, one group per fold present, in fold order."""
        if len(self.models) == 1:
            return [(self.models[0], np.arange(len(image_ids)))]
        folds = np.array([self.fold_of[int(i)] for i in image_ids])
        return [(self.models[f], np.flatnonzero(folds == f)) for f in range(len(self.models)) if (folds == f).any()]


def class_prompt_names(names: Sequence[str]) -> list[str]:
    """The name a prompt uses for each class: the first of a comma-separated list of synonyms
    (ImageNet's ``"tench, Tinca tinca"`` -> ``"tench"``)."""
    return [str(n).split(",")[0].strip() or str(n) for n in names]


def run_readout(vit: "ViT", image_set: "ImageSet", settings: "AnalyzeSettings", store: "RunStore", job: "Job",
                *, num_workers: int = 0) -> RunReadout:
    """The model views of a run under ``settings.objective`` (the model itself for label/embedding)."""
    objective = settings.objective
    if objective in ("label", "embedding"):
        return RunReadout([vit])
    names = _class_names(image_set)
    if objective == "zero-shot":
        from vitscope.models.zero_shot import zero_shot_readout

        if not vit.spec.startswith("hf:") or vit.spec == f"hf:{type(vit.module).__name__}":  # (a module object has no source)
            raise ValueError(
                f"--objective zero-shot needs a whole Hugging Face CLIP or SigLIP model loaded by its source (hf:<id or folder>), "
                f"got {vit.spec!r}. For a model object, attach the readout yourself and analyse under the label objective: "
                "vit.with_readout(vitscope.models.zero_shot.zero_shot_readout(whole_model, class_names, tokenizer=...))"
            )
        # (a whole CLIP loads with its projection: its embedding is already in the joint space)
        readout = zero_shot_readout(vit.spec, class_prompt_names(names), [settings.zero_shot_prompt],
                                    project=getattr(vit.module, "visual_projection", None) is None)
        readout.class_names = names
        return RunReadout([vit.with_readout(readout)])
    if objective != "probe":
        raise ValueError(f"unknown objective {objective!r}")
    weight, bias, folds = job.from_main(lambda: _probe_arrays(vit, image_set, settings, store, names, num_workers))
    from vitscope.models.readouts import LinearReadout

    models = [vit.with_readout(LinearReadout(torch.from_numpy(weight[f]), torch.from_numpy(bias[f]), names, what=f"linear probe (fold {f})"))
              for f in range(len(weight))]
    return RunReadout(models, {r.image_id: int(folds[i]) for i, r in enumerate(image_set.records)})


def _class_names(image_set: "ImageSet") -> list[str]:
    labels = [r.label for r in image_set.records]
    missing = [r.location for r in image_set.records if r.label is None]
    if missing:
        raise ValueError(f"the zero-shot and probe objectives need a label for every image; {len(missing)} have none "
                         f"(e.g. {missing[0]}). Give labels (class sub-folders or --labels CSV), or use --objective embedding")
    n = max(labels) + 1
    names = list(image_set.class_names or [])
    if len(names) < n:
        names += [image_set.label_name(i) or str(i) for i in range(len(names), n)]
    return names


def _probe_arrays(vit: "ViT", image_set: "ImageSet", settings: "AnalyzeSettings", store: "RunStore", names: list[str],
                  num_workers: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(weight (K, C, D), bias (K, C), fold per image)``, read from the run or fitted and written."""
    from vitscope.analysis.probe import cross_fitted_probes, probe_folds
    from vitscope.data import iter_batches

    if store.has_array("readout/probe_fold"):
        return (np.asarray(store.array("readout/probe_weight")[...]), np.asarray(store.array("readout/probe_bias")[...]),
                np.asarray(store.array("readout/probe_fold")[...]))
    labels = np.array([r.label for r in image_set.records], dtype=np.int64)
    folds = probe_folds(labels, settings.probe_folds, seed=settings.seed)
    emb: dict[int, np.ndarray] = {}
    for b in iter_batches(image_set.records, vit.preprocessing, batch_size=settings.batch_size, num_workers=num_workers,
                          on_failure=lambda rec, why: None):
        for i, e in zip(b.image_ids, vit.embeddings(b.x).double().cpu().numpy()):
            emb[int(i)] = e
    pos = [i for i, r in enumerate(image_set.records) if r.image_id in emb]  # (unreadable images are skipped later too)
    X = np.stack([emb[image_set.records[i].image_id] for i in pos])
    probes = cross_fitted_probes(X, labels[pos], folds[pos], names)
    weight = np.stack([p.weight.numpy() for p in probes]).astype(np.float32)
    bias = np.stack([p.bias.numpy() for p in probes]).astype(np.float32)
    attrs = {"folds": len(probes), "what": "cross-fitted linear probe per fold (images of fold f are scored by probe f)"}
    store.write_array("readout/probe_weight", weight, attrs={**attrs, "dims": ["fold", "class", "embedding"]})
    store.write_array("readout/probe_bias", bias, attrs={**attrs, "dims": ["fold", "class"]})
    store.write_array("readout/probe_fold", folds.astype(np.int64), attrs={"dims": ["image"], "image_order": "manifest images (image_id)"})
    return weight, bias, folds

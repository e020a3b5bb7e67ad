"""The settings of ``vitscope analyze`` (:class:`AnalyzeSettings`): one typed place for every option
that decides a run's numbers, its defaults included. The command line reads its defaults from
here, and the run's fingerprint is made from it. (No torch here, so ``vitscope --help`` stays fast.)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

#: Settings that are switches (validated as bools, not integers).
_BOOL_SETTINGS = ("interactions", "explain_faithfulness")


@dataclass(frozen=True)
class AnalyzeSettings:
    """Everything that decides a run's numbers besides the model and the images.

    Attributes:
        batch_size: images per chunk (one forward batch; also the unit of resumption).
        seed: seeds the bootstrap, the pruning-curve image subset, the random curve baseline,
            autoencoder training, projection, clustering and the image overview.
        n_boot: bootstrap resamples for the 95% intervals of head importance.
        pattern_size: side of the pooled patch->patch thumbnails (``pattern_inputs/patch``).
        patch_input: which map of the patch->patch block the patch-pattern autoencoder learns:
            ``"offset"`` (relative-offset profile + key map, tells self/neighbour/row/column heads
            apart at one-patch resolution) or ``"patch"`` (the pooled thumbnail).
        latent_dim: size of the autoencoders' latent codes.
        ae_epochs: training epochs of each autoencoder.
        ae_min_steps: at least this many optimiser steps per autoencoder (small image sets get
            more epochs).
        ae_max_maps: at most this many (image, head) maps train each autoencoder (a seeded random
            subset, so the cost does not grow with the image set); every map is still encoded.
            0 = all maps.
        n_clusters: number of pattern clusters per catalogue.
        projection: 2-D projection of the latent codes: ``"umap"``, ``"tsne"`` or ``"pca"``.
        curve_images: images (a seeded random subset, at most half the images) the cumulative
            pruning curves are measured on, which costs about one forward per curve point and
            metric; the heads are ranked on the other images (held out). 0 = half the images.
        curve_points: number of points ``k`` (heads removed) on each pruning curve.
        interactions: also compute Paper 2's patch interactions (first-order edge impacts with
            significance), responsive fields, the window-design curve, the patch-removal curve and
            the estimate-vs-knock-out agreement (about 3 extra forward-equivalents per image, plus
            the curves on at most ``curve_images`` images); see docs/interactions.md.
        explain: explanation methods (of :mod:`vitscope.analysis.explain`) whose map of every
            image is stored as ``explain/<method>`` (image, row, col), e.g. ``("rollout",
            "relevance")``; empty = none. See docs/explanations.md.
        objective: what a pruned head is measured by. ``"label"`` (the default): the classifier's
            probability, loss and accuracy for each image's label (or prediction); ``"embedding"``:
            ``1 - cos`` between the pooled image embedding with the head pruned and the unpruned
            one, defined for every model, backbones without a classifier included (DINOv2, CLIP and
            SigLIP towers, MAE). Its runs have the ``embedding_change`` metric and curves instead of
            the label metrics, no Taylor importance, no patch interactions and only the target-free
            explanations (attention, rollout, random). ``"zero-shot"``: a CLIP / SigLIP model's own
            zero-shot classifier over the image set's class names (the text tower embeds
            ``zero_shot_prompt`` once per class; :mod:`vitscope.models.zero_shot`), then measured as
            under ``"label"``. ``"probe"``: a linear probe fitted on the image set's unpruned
            embeddings, cross-fitted over ``probe_folds`` folds stratified by class (each image is
            scored by the probe fitted on the other folds; :mod:`vitscope.analysis.probe`), then
            measured as under ``"label"``; it needs every image labelled, at least two per class,
            and no patch interactions.
        zero_shot_prompt: the ``"zero-shot"`` objective's prompt; ``{}`` is the class name.
        probe_folds: folds of the ``"probe"`` objective's cross-fitting.
        stream_dtype: the precision of the attention stream that the strength measures, the pattern
            inputs and the mean attention are computed from: ``"float32"`` (the default, exact),
            ``"bfloat16"`` or ``"float16"`` (autocast: matrix products in half precision, softmax
            in float32; faster on GPUs, within the tolerances of docs/precision.md). Head pruning,
            Taylor importance, curves, interactions and explanations always run in float32: their
            small differences between two forwards would drown in half precision's rounding.
        explain_faithfulness: also score every stored map's faithfulness (perturbation curves by
            tokens and by pixels, insertion and deletion; :mod:`vitscope.analysis.faithfulness`)
            into the ``explain_faithfulness`` table. Off by default: it costs about 45 forwards
            per image and method. Needs ``explain``.
    """

    batch_size: int = 32
    seed: int = 0
    n_boot: int = 1000
    pattern_size: int = 16
    patch_input: str = "offset"
    latent_dim: int = 8
    ae_epochs: int = 20
    ae_min_steps: int = 600
    ae_max_maps: int = 10_000
    n_clusters: int = 10
    projection: str = "umap"
    curve_images: int = 100
    curve_points: int = 7
    interactions: bool = False
    explain: tuple[str, ...] = ()
    explain_faithfulness: bool = False
    objective: str = "label"
    stream_dtype: str = "float32"
    zero_shot_prompt: str = "a photo of a {}."
    probe_folds: int = 5

    @property
    def measure(self) -> str:
        """What the analyses measure a pruned model by: ``"embedding"``, or ``"label"`` (through the
        model's classifier, or the zero-shot or probe readout the run puts on it)."""
        return "embedding" if self.objective == "embedding" else "label"

    def validate(self) -> None:
        choices = {"projection": ("umap", "tsne", "pca"), "patch_input": ("offset", "patch"), "objective": OBJECTIVES,
                   "stream_dtype": STREAM_DTYPES}
        if self.objective == "embedding":
            if self.interactions:
                raise ValueError("patch interactions measure each key's impact on the target's loss, which the embedding "
                                 "objective does not have; leave --interactions out or use --objective label")
            needs_target = [m for m in self.explain if m in TARGET_EXPLANATIONS]
            if needs_target:
                raise ValueError(f"explanation method(s) {needs_target} follow the gradient of a class's loss, which the "
                                 "embedding objective does not have; use attention, rollout or random")
        if self.objective == "probe" and self.interactions:
            raise ValueError("the probe objective scores each image with the probe of its own fold, which the window and "
                             "removal curves of --interactions do not follow yet; leave --interactions out, or use "
                             "--objective zero-shot or label")
        if "{}" not in self.zero_shot_prompt:
            raise ValueError(f"zero_shot_prompt needs a '{{}}' where the class name goes, got {self.zero_shot_prompt!r}")
        minimum = {"seed": 0, "probe_folds": 2, "n_boot": 0, "curve_images": 0, "ae_max_maps": 0, "ae_min_steps": 0, "curve_points": 2}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "explain":
                _validate_explain(v)
                continue
            if f.name in _BOOL_SETTINGS:
                if not isinstance(v, bool):
                    raise ValueError(f"{f.name} must be True or False, got {v!r}")
                if f.name == "explain_faithfulness" and v and not self.explain:
                    raise ValueError(
                        "explain_faithfulness scores the stored explanation maps, but no explanation method is asked "
                        "for; pass --explain METHODS (e.g. --explain rollout,relevance) as well"
                    )
                continue
            if f.name == "zero_shot_prompt":
                continue  # (checked above)
            if f.name in choices:
                if v not in choices[f.name]:
                    raise ValueError(f"{f.name} must be one of {', '.join(choices[f.name])}; got {v!r}")
                continue
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"{f.name} must be an integer, got {v!r}")
            if v < minimum.get(f.name, 1):
                raise ValueError(f"{f.name} must be at least {minimum.get(f.name, 1)}, got {v}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        # Without explanations the settings (and so the fingerprint) are those of runs made before
        # the option existed, so they still resume.
        if not d["explain"]:
            del d["explain"]
        else:
            d["explain"] = list(d["explain"])
        if not d["explain_faithfulness"]:
            del d["explain_faithfulness"]  # likewise: runs made before the option keep their fingerprint
        if d["objective"] == "label":
            del d["objective"]  # likewise
        if d["stream_dtype"] == "float32":
            del d["stream_dtype"]  # likewise
        if d.get("objective") != "zero-shot":
            del d["zero_shot_prompt"]  # (only a zero-shot run's numbers depend on it)
        if d.get("objective") != "probe":
            del d["probe_folds"]  # likewise
        return d

    def catalogue_inputs(self) -> dict[str, str]:
        """Pattern catalogue name -> the ``pattern_inputs`` map kind its autoencoder learns."""
        return {"patch": self.patch_input, "cls": "cls"}


#: What a pruned head is measured by: the analyses' own objectives
#: (``vitscope.analysis.importance.OBJECTIVES``) and the two that put a readout on a backbone.
OBJECTIVES: tuple[str, ...] = ("label", "embedding", "zero-shot", "probe")
#: Precisions the attention stream may run in (``AnalyzeSettings.stream_dtype``).
STREAM_DTYPES: tuple[str, ...] = ("float32", "bfloat16", "float16")
#: Explanation methods that follow a class's loss gradient (not defined under the embedding objective).
TARGET_EXPLANATIONS: tuple[str, ...] = ("grad_rollout", "relevance", "interaction")

#: Explanation methods ``analyze`` can store (the names of ``vitscope.analysis.explain.METHODS``;
#: listed here so that validating settings imports no torch).
EXPLAIN_METHODS: tuple[str, ...] = ("attention", "rollout", "grad_rollout", "relevance", "interaction", "random")


def _validate_explain(methods: Any) -> None:
    if isinstance(methods, str) or not isinstance(methods, (tuple, list)):
        raise ValueError(f"explain must be a tuple of method names, got {methods!r}")
    bad = [m for m in methods if m not in EXPLAIN_METHODS]
    if bad:
        raise ValueError(f"unknown explanation method(s) {bad}; choose from {', '.join(EXPLAIN_METHODS)}")
    if len(set(methods)) != len(methods):
        raise ValueError(f"explain lists a method twice: {list(methods)}")

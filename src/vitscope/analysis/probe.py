"""Linear probes on a model's pooled embeddings: class logits for backbones without a classifier.

The ``probe`` objective of ``analyze`` scores a backbone (DINOv2, MAE, a CLIP tower) on a labelled
image set by a multinomial logistic regression on its unpruned embeddings, and then measures every
pruned model through that probe, as it would through a classifier. The probe is cross-fitted: the
images are dealt into ``k`` folds stratified by class, and an image is always scored by the probe
fitted on the other folds, never by one that saw it. Fitting is scikit-learn's
``LogisticRegression`` (L-BFGS, L2, on standardised embeddings folded back into the weights), so the
probe is a :class:`~vitscope.models.readouts.LinearReadout` on the raw embedding.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from vitscope.models.readouts import LinearReadout

#: Folds of the cross-fitted probe unless told otherwise.
DEFAULT_FOLDS = 5


def probe_folds(labels: Sequence[int], k: int = DEFAULT_FOLDS, *, seed: int = 0) -> np.ndarray:
    """Each image's fold ``0..k-1``: per class, its images shuffled (seeded) and dealt in turn,
    so every class is spread over as many folds as it has images.

    Raises ``ValueError`` for a class with a single image (no probe fitted without it could
    predict it) and for fewer than two images in all.
    """
    y = np.asarray(labels, dtype=np.int64)
    if k < 2:
        raise ValueError(f"a cross-fitted probe needs at least 2 folds, got {k}")
    classes, counts = np.unique(y, return_counts=True)
    if len(classes) < 2:
        raise ValueError("a probe needs images of at least two classes; use --objective embedding for a one-class set")
    lone = classes[counts < 2]
    if len(lone):
        raise ValueError(
            f"{len(lone)} class(es) have a single image (class index {', '.join(map(str, lone[:5].tolist()))}"
            f"{' ...' if len(lone) > 5 else ''}): a probe fitted on the other images can never predict them. "
            "Give every class at least two images, drop those, or use --objective embedding."
        )
    rng = np.random.default_rng(seed)
    folds = np.empty(len(y), dtype=np.int64)
    start = 0
    for c in classes:  # consecutive classes continue the deal, so the folds stay balanced
        idx = np.flatnonzero(y == c)
        idx = idx[rng.permutation(len(idx))]
        folds[idx] = (start + np.arange(len(idx))) % k
        start += len(idx)
    return folds


def fit_probe(embeddings: np.ndarray, labels: Sequence[int], class_names: Sequence[str], *, c: float = 1.0,
              max_iter: int = 2000) -> LinearReadout:
    """A multinomial logistic regression on ``embeddings (N, D)``, as logits over every class of
    ``class_names`` (classes absent from ``labels`` get a constant logit far below the others).

    ``c`` is scikit-learn's inverse L2 strength on the standardised embeddings.
    """
    from sklearn.linear_model import LogisticRegression

    X = np.asarray(embeddings, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    if X.ndim != 2 or len(X) != len(y):
        raise ValueError(f"embeddings must be (N, D) with one label each, got {X.shape} and {len(y)} labels")
    if len(np.unique(y)) < 2:
        raise ValueError("a probe needs images of at least two classes")
    mean, std = X.mean(0), X.std(0)
    std[std == 0] = 1.0
    model = LogisticRegression(C=c, max_iter=max_iter).fit((X - mean) / std, y)
    C = len(class_names)
    seen = model.classes_.astype(np.int64)
    if seen.max() >= C or seen.min() < 0:
        raise ValueError(f"labels must be class indices into the {C} class names, got {seen.min()}..{seen.max()}")
    coef = model.coef_ if len(seen) > 2 else np.vstack([-model.coef_[0] / 2, model.coef_[0] / 2])
    icpt = model.intercept_ if len(seen) > 2 else np.array([-model.intercept_[0] / 2, model.intercept_[0] / 2])
    weight = np.zeros((C, X.shape[1]))
    bias = np.full(C, -1e4)  # (an unseen class: never predicted, and its probability is ~0, not NaN)
    weight[seen] = coef / std  # the standardisation folded in: w.(x - m)/s = (w/s).x - (w/s).m
    bias[seen] = icpt - (coef / std) @ mean
    return LinearReadout(torch.from_numpy(weight).float(), torch.from_numpy(bias).float(), class_names, what="linear probe")


def cross_fitted_probes(embeddings: np.ndarray, labels: Sequence[int], folds: np.ndarray, class_names: Sequence[str], *,
                        c: float = 1.0) -> list[LinearReadout]:
    """One probe per fold, each fitted on the images of the other folds (``probes[f]`` scores fold ``f``)."""
    X, y, folds = np.asarray(embeddings), np.asarray(labels, dtype=np.int64), np.asarray(folds)
    return [fit_probe(X[folds != f], y[folds != f], class_names, c=c) for f in range(int(folds.max()) + 1)]

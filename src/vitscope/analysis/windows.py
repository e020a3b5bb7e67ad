"""Checking the interaction indicator in use: attention-window design and patch removal.

Both are inference-time experiments on a trained model (Ma et al. 2022: "Window design" and
"Indiscriminative patch removal"); nothing is retrained.

**Attention windows.** Every patch query may attend only to a set of patch keys, in every layer;
prefix tokens (CLS, distillation, registers) always attend to everything and are always visible
as keys. Keys outside the set are removed *before* the softmax (the row is renormalised over the
allowed keys), as in windowed attention, with :class:`~vitscope.capture.runtime.LayerPlan`
``allowed`` so the fused kernel is kept.

- ``"window"``: the ``k x k`` square around the query (Chebyshev distance ``<= (k - 1) / 2`` on the
  patch grid), clipped at the border; ``k = 1, 3, ..., 2 * max(grid) - 1`` (the last covers the
  whole grid from every query).
- ``"indicator"``: per layer and query, the keys with the largest mean impact in that layer.
- ``"indicator_pooled"``: the same ranking from the impact summed over layers, used in every layer.
- ``"random"``: random keys (a baseline; seeded).
- any name given in ``scores``: per layer and query, the keys with the largest value of that
  ``(L, P, P)`` score, e.g. the mean *absolute* impact (``InteractionAccumulator.summary()
  ["abs_mean"]``) or the per-image field frequency (``FieldAccumulator.summary()["frequency"]``).

For a given ``k`` every method gives each query exactly as many patch keys as the clipped ``k x k``
window does, so all methods have the same key budget (mean keys per query) query by query.
The mean impacts must come from images other than those evaluated (they use the labels).

**Patch removal.** After the embedding, the ``r`` percent of patch tokens with the lowest score are
dropped from the sequence (prefix tokens are kept) and the remaining tokens run through every
block; nothing else changes. Rankings per image:

- ``"impact"``: the image's own first-order key importance
  (:func:`vitscope.analysis.interaction.key_importance` of one forward + backward pass, prefix
  queries included), with the loss of the model's own prediction by default, so no label is used
  at inference;
- ``"impact_dataset"``: one ranking for all images from a dataset-level key importance computed
  on other images;
- ``"cls_attention"``: last-layer CLS -> patch attention, mean over heads;
- ``"random"``: a random order per image, for several seeds.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
import pandas as pd
import torch

from vitscope.analysis.interaction import as_batch, first_order_impact, key_importance, resolve_targets, split_batch
from vitscope.capture.runtime import LayerPlan
from vitscope.core.grid import allowed_from_keys, top_keys, window_keys, window_mask, window_sizes

if TYPE_CHECKING:  # pragma: no cover
    from vitscope.core.layout import TokenLayout
    from vitscope.models.vit import ViT

#: Window methods of :func:`window_curve` (``"random"`` is available but not run by default).
WINDOW_METHODS: tuple[str, ...] = ("window", "indicator", "indicator_pooled")
#: Removal rankings of :func:`removal_curve` (``"impact_dataset"`` needs ``dataset_scores``).
REMOVAL_METHODS: tuple[str, ...] = ("impact", "cls_attention", "random")
#: Default removal rates: 0 %, 10 %, ..., 90 % of the patch tokens.
DEFAULT_RATES: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(10))


# =========================================================================== masks
def window_key_sets(
    layout: "TokenLayout",
    k: int,
    method: str,
    impact_mean: Optional[np.ndarray] = None,
    *,
    num_layers: Optional[int] = None,
    seed: int = 0,
    scores: Optional[Mapping[str, np.ndarray]] = None,
) -> np.ndarray:
    """Patch keys each query may attend to in each layer, ``(L, P, P)`` bool, for one method and ``k``.

    ``impact_mean`` ``(L, P, P)`` (mean first-order impact over a set of images, e.g.
    ``InteractionAccumulator.summary()["mean"]``) is needed by the indicator methods;
    ``num_layers`` by the others when it is not given. A ``method`` named in ``scores`` ranks keys
    per layer by that ``(L, P, P)`` array.
    """
    base = window_keys(layout, k)
    counts = base.sum(-1)
    if scores is not None and method in scores:
        sc = np.asarray(scores[method], dtype=np.float64)
        P = layout.num_patches
        if sc.ndim != 3 or sc.shape[1:] != (P, P):
            raise ValueError(f"scores[{method!r}] must be (L, {P}, {P}), got {sc.shape}")
        return top_keys(sc, counts)
    if impact_mean is not None:
        impact_mean = np.asarray(impact_mean, dtype=np.float64)
        P = layout.num_patches
        if impact_mean.ndim != 3 or impact_mean.shape[1:] != (P, P):
            raise ValueError(f"impact_mean must be (L, {P}, {P}), got {impact_mean.shape}")
    L = impact_mean.shape[0] if impact_mean is not None else num_layers
    if L is None:
        raise ValueError("give num_layers (or impact_mean) to build window key sets")
    if method == "window":
        return np.broadcast_to(base, (L,) + base.shape).copy()
    if method == "random":
        rng = np.random.default_rng(seed)
        return top_keys(rng.random((L,) + base.shape), counts)
    if method in ("indicator", "indicator_pooled"):
        if impact_mean is None:
            raise ValueError(f"method {method!r} needs impact_mean (L, P, P): the mean impacts from images not evaluated")
        if method == "indicator":
            return top_keys(impact_mean, counts)
        pooled = top_keys(impact_mean.sum(0), counts)
        return np.broadcast_to(pooled, (L,) + pooled.shape).copy()
    named = f", 'random' or a name in scores ({', '.join(scores)})" if scores else " or 'random'"
    raise ValueError(f"unknown window method {method!r}; use one of {', '.join(WINDOW_METHODS)}{named}")


# =========================================================================== window curve
def _batches(batches: Iterable[Any]) -> Iterable[tuple[Any, Any]]:
    for b in batches:
        yield split_batch(b)


def _stats(logits: torch.Tensor, target: torch.Tensor, reference: torch.Tensor) -> np.ndarray:
    """Sums over a batch: correct, target probability, target loss, agreement with ``reference`` prediction."""
    logp = logits.double().log_softmax(-1).gather(1, target[:, None]).squeeze(1)
    pred = logits.argmax(-1)
    return np.array(
        [float((pred == target).sum()), float(logp.exp().sum()), float(-logp.sum()), float((pred == reference).sum())]
    )


@torch.no_grad()
def window_curve(
    vit: "ViT",
    batches: Iterable[Any],
    impact_mean: Optional[np.ndarray] = None,
    *,
    ks: Optional[Sequence[int]] = None,
    methods: Optional[Sequence[str]] = None,
    scores: Optional[Mapping[str, np.ndarray]] = None,
    seed: int = 0,
) -> pd.DataFrame:
    """Accuracy against key budget for window-restricted attention in every layer.

    Args:
        batches: iterable of preprocessed batches ``x``, ``(x, targets)`` pairs or
            :class:`vitscope.data.Batch` es (targets ``-1`` or absent: the unrestricted prediction).
        impact_mean: ``(L, P, P)`` mean first-order impact from *other* images (needed by the
            indicator methods).
        ks: odd window sides (default :func:`window_sizes`).
        methods: default ``("window", "indicator", "indicator_pooled")`` when ``impact_mean`` is
            given, else ``("window",)``, followed by every name in ``scores``; ``"random"`` adds a
            random-keys baseline.
        scores: extra key rankings ``{name: (L, P, P)}`` (larger = keep first), from other images.

    Returns one row per (method, k) plus a ``"full"`` row (unrestricted attention): ``method, k,
    keys_per_query`` (mean allowed patch keys per patch query), ``keys_per_query_total`` (with the
    prefix tokens), ``accuracy, mean_prob, mean_loss`` (of the target), ``agreement`` (share of
    images whose prediction is unchanged) and ``n_images``. ``batches`` is iterated once.
    """
    vit._require_head()
    lay, L = vit.layout, vit.num_layers
    ks = window_sizes(lay) if ks is None else [int(k) for k in ks]
    if methods is None:
        methods = list(WINDOW_METHODS if impact_mean is not None else ("window",)) + list(scores or {})
    configs: list[tuple[str, int, float, int]] = []  # method, k, keys per query, index of its mask
    masks: list[Optional[torch.Tensor]] = [None]  # mask 0: unrestricted attention
    seen: dict[bytes, int] = {}
    dev = vit.device
    for method in methods:
        for k in ks:
            keys = window_key_sets(lay, k, method, impact_mean, num_layers=L, seed=seed, scores=scores)
            allowed = allowed_from_keys(keys, lay)
            # Identical key sets (e.g. every method once the window covers the grid) run once.
            key = b"all" if allowed.all() else np.packbits(allowed).tobytes()
            if key not in seen:
                seen[key] = 0 if key == b"all" else len(masks)
                if key != b"all":
                    masks.append(torch.as_tensor(allowed, device=dev))
            configs.append((method, k, float(keys.sum(-1).mean()), seen[key]))
    sums = np.zeros((len(masks), 4))
    n = 0
    for xb, tb in _batches(batches):
        x = as_batch(vit, xb)
        h0 = vit.embed(x)
        base = vit.readout(vit.run_blocks(h0))
        reference = base.argmax(-1)
        target = resolve_targets(tb, reference, base.shape[1])
        n += x.shape[0]
        sums[0] += _stats(base, target, reference)
        for c, allowed in enumerate(masks[1:], start=1):
            plans = {l: LayerPlan(allowed=allowed[l]) for l in range(L)}
            sums[c] += _stats(vit.readout(vit.run_blocks(h0, plans=plans)), target, reference)
    if n == 0:
        raise ValueError("batches yielded no images")
    P, pre = lay.num_patches, lay.num_prefix
    rows = [("full", window_sizes(lay)[-1], float(P), 0)] + configs
    means = sums / n
    out = []
    for method, k, kpq, m in rows:
        s = means[m]
        out.append(
            {
                "method": method,
                "k": k,
                "keys_per_query": kpq,
                "keys_per_query_total": kpq + pre,
                "accuracy": s[0],
                "mean_prob": s[1],
                "mean_loss": s[2],
                "agreement": s[3],
                "n_images": n,
            }
        )
    return pd.DataFrame(out)


# =========================================================================== patch removal
def keep_count(num_patches: int, rate: float) -> int:
    """Patches kept when a fraction ``rate`` is removed: ``P - round(rate * P)``, at least 1 when ``rate < 1``."""
    if not 0.0 <= float(rate) <= 1.0:
        raise ValueError(f"removal rate must be a fraction in [0, 1], got {rate}")
    kept = num_patches - int(round(float(rate) * num_patches))
    return max(kept, 1) if rate < 1 else kept


def drop_patch_tokens(vit: "ViT", h: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Residual stream ``h (B, T, D)`` with only the prefix tokens and the patches ``keep (B, K)`` (patch
    indices, kept in grid order) -> ``(B, num_prefix + K, D)``."""
    pre = vit.layout.num_prefix
    keep, _ = torch.sort(keep.to(h.device), dim=1)
    idx = (keep + pre)[:, :, None].expand(-1, -1, h.shape[-1])
    return torch.cat([h[:, :pre], torch.gather(h, 1, idx)], dim=1)


@torch.no_grad()
def remove_patches(vit: "ViT", x: Any, scores: Any, rate: float) -> torch.Tensor:
    """Logits after dropping the fraction ``rate`` of patch tokens with the lowest ``scores (B, P)``.

    Ties drop the lower patch index first. ``rate = 0`` runs every token (the plain model).
    """
    vit._require_head()
    x = as_batch(vit, x)
    h = vit.embed(x)
    return _removed_logits(vit, h, torch.tensor(np.array(scores, dtype=np.float64)), rate)


def _removed_logits(vit: "ViT", h: torch.Tensor, scores: torch.Tensor, rate: float) -> torch.Tensor:
    P = vit.layout.num_patches
    if scores.shape != (h.shape[0], P):
        raise ValueError(f"scores must be (B, P) = ({h.shape[0]}, {P}), got {tuple(scores.shape)}")
    n_keep = keep_count(P, rate)
    if n_keep == P:
        return vit.readout(vit.run_blocks(h))
    # Ascending stable sort: the lowest scores are removed first, ties by lower patch index.
    asc = torch.sort(scores.cpu(), dim=1, stable=True).indices
    keep = asc[:, P - n_keep :]
    return vit.readout(vit.run_blocks(drop_patch_tokens(vit, h, keep)))


@torch.no_grad()
def cls_attention_scores(vit: "ViT", x: Any, layer: int = -1) -> np.ndarray:
    """CLS -> patch attention of ``layer`` (default the last), mean over heads, ``(B, P)``."""
    cls = vit.layout.cls_index
    if cls is None:
        raise ValueError(f"{vit.name} has no CLS token, so there is no CLS-attention ranking; use 'impact' or 'random'")
    layer = vit.num_layers + layer if layer < 0 else layer
    got: list[torch.Tensor] = []
    plans = {layer: LayerPlan(on_attention=lambda _l, a: got.append(a[:, :, cls, vit.layout.patch_slice].mean(1)))}
    vit.run_blocks(vit.embed(as_batch(vit, x)), 0, layer + 1, plans=plans)
    return got[0].double().cpu().numpy()


def impact_scores(vit: "ViT", x: Any, targets: Any = None) -> np.ndarray:
    """Per-image key importance ``(B, P)`` from one forward + backward (see :func:`key_importance`).

    ``targets`` ``None`` uses the model's own prediction, which is what an inference-time pruner can
    know; pass labels to rank by the loss of the true class instead.
    """
    r = first_order_impact(vit, x, targets)
    return key_importance(r["impact"], r["prefix_impact"])


def removal_curve(
    vit: "ViT",
    batches: Iterable[Any],
    *,
    rates: Sequence[float] = DEFAULT_RATES,
    methods: Optional[Sequence[str]] = None,
    seeds: Sequence[int] = (0, 1, 2),
    dataset_scores: Optional[np.ndarray] = None,
    rank_with_labels: bool = False,
) -> pd.DataFrame:
    """Accuracy as the lowest-ranked patch tokens are dropped, for several rankings.

    Args:
        batches: iterable of ``x``, ``(x, targets)`` or :class:`vitscope.data.Batch` (targets
            ``-1`` or absent: the prediction with every token, which then has accuracy 1).
        rates: removed fractions of the patch tokens.
        methods: rankings (default ``("impact", "cls_attention", "random")``, plus
            ``"impact_dataset"`` when ``dataset_scores`` is given; ``"cls_attention"`` is left out
            for models without CLS).
        seeds: seeds of the ``"random"`` ranking (one curve each).
        dataset_scores: ``(P,)`` dataset-level key importance computed on other images (e.g.
            ``InteractionAccumulator.summary()["key_importance_mean"]``).
        rank_with_labels: rank ``"impact"`` by the loss of each image's label instead of its
            prediction. This uses the label at inference, so it is an upper bound, not a pruner.

    Returns ``method, seed`` (-1 for deterministic rankings), ``rate, n_kept, accuracy, mean_prob,
    mean_loss, agreement`` (share of predictions unchanged) and ``n_images``. ``batches`` is
    iterated once; random orders are drawn image by image in iteration order.
    """
    vit._require_head()
    P = vit.layout.num_patches
    if methods is None:
        methods = [m for m in REMOVAL_METHODS if not (m == "cls_attention" and vit.layout.cls_index is None)]
        if dataset_scores is not None:
            methods.insert(1, "impact_dataset")
    methods = list(methods)
    bad = [m for m in methods if m not in REMOVAL_METHODS + ("impact_dataset",)]
    if bad:
        raise ValueError(f"unknown removal method(s) {bad}; use {', '.join(REMOVAL_METHODS)} or 'impact_dataset'")
    if "impact_dataset" in methods:
        if dataset_scores is None:
            raise ValueError("method 'impact_dataset' needs dataset_scores (P,) computed on other images")
        dataset_scores = np.asarray(dataset_scores, dtype=np.float64)
        if dataset_scores.shape != (P,):
            raise ValueError(f"dataset_scores must have shape ({P},), got {dataset_scores.shape}")
    rates = [float(r) for r in rates]
    for r in rates:
        keep_count(P, r)
    curves: list[tuple[str, int]] = [(m, -1) for m in methods if m != "random"]
    if "random" in methods:
        curves += [("random", int(s)) for s in seeds]
    gens = {s: torch.Generator().manual_seed(int(s)) for m, s in curves if m == "random"}
    sums = np.zeros((len(curves), len(rates), 4))
    n = 0
    for xb, tb in _batches(batches):
        x = as_batch(vit, xb)
        with torch.no_grad():
            h = vit.embed(x)
            base = vit.readout(vit.run_blocks(h))
        reference = base.argmax(-1)
        target = resolve_targets(tb, reference, base.shape[1])
        B = x.shape[0]
        n += B
        for c, (method, seed) in enumerate(curves):
            if method == "impact":
                scores = torch.as_tensor(impact_scores(vit, x, target if rank_with_labels else reference))
            elif method == "impact_dataset":
                scores = torch.tensor(dataset_scores).expand(B, P)
            elif method == "cls_attention":
                scores = torch.as_tensor(cls_attention_scores(vit, x))
            else:
                scores = torch.rand(B, P, generator=gens[seed], dtype=torch.float64)
            with torch.no_grad():
                for r_i, rate in enumerate(rates):
                    logits = base if keep_count(P, rate) == P else _removed_logits(vit, h, scores, rate)
                    sums[c, r_i] += _stats(logits, target, reference)
    if n == 0:
        raise ValueError("batches yielded no images")
    rows = []
    for c, (method, seed) in enumerate(curves):
        for r_i, rate in enumerate(rates):
            s = sums[c, r_i] / n
            rows.append(
                {
                    "method": method,
                    "seed": seed,
                    "rate": rate,
                    "n_kept": keep_count(P, rate),
                    "accuracy": s[0],
                    "mean_prob": s[1],
                    "mean_loss": s[2],
                    "agreement": s[3],
                    "n_images": n,
                }
            )
    return pd.DataFrame(rows)


def removal_summary(curve: pd.DataFrame) -> pd.DataFrame:
    """Per method and rate: mean and standard deviation of accuracy over seeds (one seed: std NaN),
    and the number of seeds. Deterministic rankings have one row per rate with ``n_seeds = 1``."""
    g = curve.groupby(["method", "rate"], sort=False)
    out = pd.DataFrame(
        {
            "accuracy": g["accuracy"].mean(),
            "accuracy_std": g["accuracy"].std(),
            "mean_prob": g["mean_prob"].mean(),
            "agreement": g["agreement"].mean(),
            "n_seeds": g.size(),
            "n_images": g["n_images"].first(),
        }
    )
    return out.reset_index()


def image_batches(images: Any, vit: "ViT", batch_size: int = 32) -> Iterable[Any]:
    """Batches of an image set for the curves: ``vitscope.data.iter_batches`` with the model's preprocessing."""
    from vitscope.data import iter_batches

    return iter_batches(images, vit.preprocessing, batch_size=batch_size)


__all__ = [
    "DEFAULT_RATES",
    "REMOVAL_METHODS",
    "WINDOW_METHODS",
    "allowed_from_keys",
    "cls_attention_scores",
    "drop_patch_tokens",
    "impact_scores",
    "keep_count",
    "remove_patches",
    "removal_curve",
    "removal_summary",
    "top_keys",
    "window_curve",
    "window_key_sets",
    "window_keys",
    "window_mask",
    "window_sizes",
]

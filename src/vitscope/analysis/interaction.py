"""Patch interactions: how much the edge "query patch i attends to key patch j" matters.

Definition (Ma et al. 2022, "Interaction indicator"). For layer ``l``, query patch ``i`` and key
patch ``j`` of one image, the *impact* of the edge ``i -> j`` is

    impact[l, i, j] = loss(edge i -> j removed in every head of layer l) - loss(original),

where ``loss`` is the cross-entropy of the image's target class and "removed" sets the post-softmax
attention cell ``A[h, i, j]`` to 0 in every head ``h`` of layer ``l`` *without renormalising the row*
(the same pruning convention as everywhere in vitscope). A positive impact means the edge helps
the model predict the target; a negative one means it hurts.

Two ways to compute it:

- :func:`knockout_impact` (exact): one masked forward per edge for chosen queries. The layers before
  ``l`` are run once; every (image, query, key) triple then becomes one row of a batched forward
  from layer ``l`` on, with that single cell zeroed in every head.
- :func:`first_order_impact` (estimate, every edge): removing the edge changes ``A[h, i, j]`` by
  ``-A[h, i, j]`` in each head, so to first order

      impact[l, i, j] ~= -sum_h  dloss/dA[h, i, j] * A[h, i, j].

  One forward and one backward pass give ``dloss/dA`` for every layer; the loss is the sum of the
  per-image losses, so each image gets the gradient of its own loss. Cost: about 3 forward passes
  (``benchmarks/bench_interaction.py`` measures it).

Over an image set (:class:`InteractionAccumulator`): the mean, standard deviation and standard
error per layer and edge are accumulated with Welford/Chan updates in float64 (no per-image maps are
kept), and :func:`interaction_summary` adds a significance flag: a one-sided one-sample t-test of
``mean impact > 0`` per edge (``t = mean / sem``, ``n - 1`` degrees of freedom), with the
Benjamini-Hochberg false-discovery-rate procedure at level ``q`` (default 0.05) applied within each
layer over its ``P * P`` patch edges. The t-test relies on the mean of the per-image impacts being
approximately normal, which needs a few dozen images because per-image impacts are heavy-tailed;
with few images treat the flags as descriptive.

Only the patch -> patch block is kept (``(L, P, P)`` per image, ``P`` = number of patches); the
edges from prefix queries (CLS, distillation, registers) to patch keys are kept separately as
``prefix_impact`` ``(L, num_prefix, P)`` because they are what the class token reads.

Patch indices here are positions in the patch grid (row-major, ``0 .. P-1``); patch ``i`` is token
``layout.num_prefix + i`` of the sequence.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Optional, Union

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from vitscope.analysis.inputs import Targets, as_batch, resolve_targets, split_batch  # noqa: F401 - split_batch is public here too
from vitscope.analysis.interaction_tables import agreement_summary, interaction_layer_table  # noqa: F401 - public here too
from vitscope.capture.runtime import LayerPlan
from vitscope.core.indices import check_layer, select_layers
from vitscope.core.stats import Welford, benjamini_hochberg, ttest_pvalues, zero_spread

if TYPE_CHECKING:  # pragma: no cover
    from vitscope.models.vit import ViT

Indices = Union[None, int, Sequence[int], np.ndarray]


# --------------------------------------------------------------------------- helpers
def _layers(vit: "ViT", layers: Optional[Sequence[int]]) -> list[int]:
    return select_layers(layers, vit.num_layers, vit.name, allow_empty=False)


def _patch_indices(values: Indices, num_patches: int, what: str) -> np.ndarray:
    if values is None:
        return np.arange(num_patches)
    idx = np.atleast_1d(np.asarray(values, dtype=np.int64))
    if idx.ndim != 1 or idx.size == 0:
        raise ValueError(f"{what} must be one or more patch indices")
    bad = idx[(idx < 0) | (idx >= num_patches)]
    if bad.size:
        raise ValueError(
            f"{what} {bad.tolist()} are not patch indices: this model has {num_patches} patches (0..{num_patches - 1}, "
            "row-major over the grid; prefix tokens such as CLS are not patches)"
        )
    return idx


# --------------------------------------------------------------------------- first-order estimate
def first_order_impact(
    vit: "ViT", x: Any, targets: Targets = None, *, layers: Optional[Sequence[int]] = None
) -> dict[str, np.ndarray]:
    """First-order impact of every edge in every layer, for each image of a batch.

    Args:
        vit: a loaded model with a classification head.
        x: preprocessed ``(B, C, H, W)`` batch (or images, which are preprocessed first).
        targets: class index per image whose loss is used; ``None`` or ``-1``: the model's prediction.
        layers: layers to report (default: all). The backward pass is the same either way.

    Returns a dict of numpy arrays (``B`` images, ``L'`` reported layers, ``P`` patches):

    - ``impact (B, L', P, P)`` float32: ``-sum_h dloss/dA[h, i, j] * A[h, i, j]`` for query patch
      ``i`` (rows) and key patch ``j`` (columns);
    - ``prefix_impact (B, L', num_prefix, P)`` float32: the same for prefix queries (CLS first);
    - ``layers (L',)``, ``logits (B, C)`` float32, ``prediction (B,)``, ``target (B,)`` and
      ``loss (B,)`` (float64 cross-entropy of the target).

    One forward pass (the explicit attention kernel in every reported layer) and one backward pass
    that computes gradients for the activations only, not for the model's parameters.
    """
    vit._require_head()
    x = as_batch(vit, x)
    sel = _layers(vit, layers)
    lay = vit.layout
    pre, P, ps = lay.num_prefix, lay.num_patches, lay.patch_slice
    B = x.shape[0]
    index = {l: i for i, l in enumerate(sel)}
    impact = torch.empty(B, len(sel), P, P, dtype=torch.float32)
    prefix = torch.empty(B, len(sel), pre, P, dtype=torch.float32)
    seen: set[int] = set()

    def on_gradient(layer: int, attn: torch.Tensor, grad: torch.Tensor) -> None:
        e = (grad * attn).sum(dim=1).neg_()  # (B, T, T): first-order loss change of removing each cell in all heads
        impact[:, index[layer]] = e[:, ps, ps].float().cpu()
        prefix[:, index[layer]] = e[:, :pre, ps].float().cpu()
        seen.add(layer)

    plans = {l: LayerPlan(on_gradient=on_gradient) for l in sel}
    with torch.no_grad():
        h0 = vit.embed(x)
    with torch.enable_grad():
        h0 = h0.detach().requires_grad_(True)
        logits = vit.readout(vit.run_blocks(h0, plans=plans))
        prediction = logits.detach().argmax(-1)
        target = resolve_targets(targets, prediction, logits.shape[1])
        loss = F.cross_entropy(logits, target, reduction="sum")
        # Gradients with respect to the input stream only: autograd then skips every parameter gradient.
        torch.autograd.grad(loss, h0)
    missing = sorted(set(sel) - seen)
    if missing:
        from vitscope.models.vit import CaptureError

        raise CaptureError(f"no attention gradient reached layers {missing}; their attention bypasses vitscope's kernel")
    logits = logits.detach()
    per_image_loss = F.cross_entropy(logits.double(), target, reduction="none")
    return {
        "impact": impact.numpy(),
        "prefix_impact": prefix.numpy(),
        "layers": np.asarray(sel, dtype=np.int64),
        "logits": logits.float().cpu().numpy(),
        "prediction": prediction.cpu().numpy(),
        "target": target.cpu().numpy(),
        "loss": per_image_loss.cpu().numpy(),
    }


def key_importance(impact: np.ndarray, prefix_impact: Optional[np.ndarray] = None) -> np.ndarray:
    """How much each patch matters *as a key*: impacts summed over all queries and layers.

    ``impact`` is ``(..., L, P, P)`` (queries on the second-to-last axis, keys on the last) and
    ``prefix_impact`` optionally ``(..., L, num_prefix, P)``; returns ``(..., P)``. Because the
    first-order estimate is linear in the removed cells, this sum is the first-order estimate of the
    loss change when patch ``j`` is masked out as a key for every query (prefix queries included
    when ``prefix_impact`` is given) in every layer, post-softmax without renormalisation. Large =
    the model relies on the patch; lowest = the most indiscriminative patches.
    """
    impact = np.asarray(impact)
    if impact.ndim < 3 or impact.shape[-1] != impact.shape[-2]:
        raise ValueError(f"impact must be (..., L, P, P) with square patch blocks, got shape {impact.shape}")
    score = impact.sum(axis=(-3, -2), dtype=np.float64)
    if prefix_impact is not None:
        prefix_impact = np.asarray(prefix_impact)
        if prefix_impact.shape[:-2] != impact.shape[:-2] or prefix_impact.shape[-1] != impact.shape[-1]:
            raise ValueError(
                f"prefix_impact {prefix_impact.shape} does not match impact {impact.shape}: expected (..., L, num_prefix, P)"
            )
        score = score + prefix_impact.sum(axis=(-3, -2), dtype=np.float64)
    return score


# --------------------------------------------------------------------------- exact knock-out
@torch.no_grad()
def knockout_impact(
    vit: "ViT",
    x: Any,
    layer: int,
    queries: Indices,
    targets: Targets = None,
    *,
    keys: Indices = None,
    prefix_queries: Sequence[int] = (),
    chunk: int = 128,
) -> dict[str, np.ndarray]:
    """Exact impact of removing single edges ``query -> key`` in every head of ``layer``.

    Args:
        x: preprocessed ``(B, C, H, W)`` batch (or images).
        layer: the layer whose edges are removed.
        queries: query patch indices (``None``: every patch; may be empty when ``prefix_queries``
            is given).
        targets: class per image (``None`` / ``-1``: the unablated prediction).
        keys: key patch indices (``K``; default all ``P`` patches).
        prefix_queries: prefix token positions (``0`` = CLS in timm models) to use as queries too;
            they come first in the output.
        chunk: rows (one removed edge of one image each) run through the model at once.

    Returns ``impact (B, Q, K)`` float64 (loss with the edge removed minus the original loss; ``Q``
    = prefix queries then patch queries), ``query_tokens (Q,)`` (sequence positions of the queries),
    ``base_loss (B,)``, ``target (B,)``, ``queries``, ``prefix_queries`` and ``keys (K,)``.

    The original loss of each image is computed as one more row of the same batched runs with
    nothing removed, so the difference carries no fused-versus-explicit rounding and almost no
    batch-size rounding (a separate run would add a constant of about 1e-7 to every impact in
    float32, about 1e-8 remains). Cost: ``B * (Q * K + 1)``
    forwards of the layers ``layer .. L-1``; use it on a few queries to check
    :func:`first_order_impact`.
    """
    vit._require_head()
    layer = check_layer(layer, vit.num_layers, vit.name)
    if int(chunk) < 1:
        raise ValueError(f"chunk must be a positive number of rows, got {chunk}")
    lay = vit.layout
    pre, T = lay.num_prefix, lay.num_tokens
    q_idx = np.zeros(0, dtype=np.int64) if (queries is not None and np.size(queries) == 0) else _patch_indices(queries, lay.num_patches, "queries")
    p_idx = np.asarray(list(prefix_queries), dtype=np.int64)
    bad = p_idx[(p_idx < 0) | (p_idx >= pre)]
    if bad.size:
        raise ValueError(f"prefix_queries {bad.tolist()} are not prefix positions: this model has {pre} prefix token(s) (0..{pre - 1})")
    query_tokens = np.concatenate([p_idx, q_idx + pre])
    if query_tokens.size == 0:
        raise ValueError("no queries: give patch `queries` and/or `prefix_queries`")
    k_idx = _patch_indices(keys, lay.num_patches, "keys")
    x = as_batch(vit, x)
    h = vit.run_blocks(vit.embed(x), 0, layer)
    B, dev, dtype = h.shape[0], h.device, h.dtype

    Q, K = len(query_tokens), len(k_idx)
    per_image = Q * K + 1  # row 0 of each image is the unablated reference
    rows = B * per_image
    r = torch.arange(rows, device=dev)
    b_all, local = r // per_image, r % per_image
    ablated = local > 0
    qk = (local - 1).clamp(min=0)
    q_tok = torch.as_tensor(query_tokens, device=dev)[qk // K]
    k_tok = torch.as_tensor(k_idx + pre, device=dev)[qk % K]
    # The targets only need the unablated prediction (an argmax, insensitive to rounding).
    ones = torch.ones(1, 1, T, T, dtype=dtype, device=dev)
    base_logits = vit.readout(vit.run_blocks(h, layer, plans={layer: LayerPlan(keep=ones)}))
    target = resolve_targets(targets, base_logits.argmax(-1), base_logits.shape[1])
    loss = torch.empty(rows, dtype=torch.float64, device=dev)
    step = int(chunk)
    for start in range(0, rows, step):
        sl = slice(start, min(start + step, rows))
        n = sl.stop - sl.start
        keep = torch.ones(n, 1, T, T, dtype=dtype, device=dev)
        sel = torch.nonzero(ablated[sl]).squeeze(1)
        keep[sel, 0, q_tok[sl][sel], k_tok[sl][sel]] = 0.0
        b = b_all[sl]
        logits = vit.readout(vit.run_blocks(h[b], layer, plans={layer: LayerPlan(keep=keep)}))
        loss[sl] = F.cross_entropy(logits.double(), target[b], reduction="none")
    loss = loss.view(B, per_image)
    base_loss = loss[:, 0]
    impact = (loss[:, 1:] - base_loss[:, None]).view(B, Q, K).cpu().numpy()
    return {
        "impact": impact,
        "query_tokens": query_tokens,
        "base_loss": base_loss.cpu().numpy(),
        "target": target.cpu().numpy(),
        "queries": q_idx,
        "prefix_queries": p_idx,
        "keys": k_idx,
    }


def knockout_agreement(
    vit: "ViT",
    x: Any,
    targets: Targets = None,
    *,
    layers: Optional[Sequence[int]] = None,
    queries_per_layer: int = 3,
    keys: Union[None, int, Sequence[int]] = None,
    include_cls: bool = True,
    seed: int = 0,
    estimate: Optional[Mapping[str, np.ndarray]] = None,
    chunk: int = 128,
) -> pd.DataFrame:
    """How well the first-order estimate ranks edges, checked against exact knock-outs.

    For each layer, ``queries_per_layer`` query patches are drawn at random (``seed``), plus the
    CLS query when ``include_cls`` and the model has one (in the last layer of a CLS-readout model
    only the CLS query can change the prediction, so patch queries there have zero impact); for
    each image and query the exact impacts of the edges to ``keys`` (default every patch; an int
    draws that many keys per layer at random) are compared with the first-order estimates.

    ``estimate`` may be the output of :func:`first_order_impact` on the same ``x`` and ``targets``
    (computed here otherwise); its targets are used for the knock-outs.

    Returns one row per (layer, image, query) with ``query`` (patch index, ``-1`` for CLS),
    ``query_kind`` (``"patch"`` / ``"cls"``), ``spearman`` and ``pearson`` correlations over the keys
    (NaN where the exact impacts are all equal, e.g. patch queries of a CLS-readout model's last
    layer), ``top10_overlap`` (share of the 10 exactly most positive keys among the estimate's top
    10), ``sign_agreement`` (share of keys where both impacts have the same sign), ``exact_sum``,
    ``estimate_sum``, ``exact_max_abs`` and ``n_keys``. :func:`agreement_summary` condenses it per
    layer.
    """
    from scipy import stats

    sel = _layers(vit, layers)
    P = vit.layout.num_patches
    cls = vit.layout.cls_index
    rng = np.random.default_rng(seed)
    if estimate is None:
        estimate = first_order_impact(vit, x, targets)
    est_layers = [int(l) for l in np.asarray(estimate["layers"])]
    missing = [l for l in sel if l not in est_layers]
    if missing:
        raise ValueError(f"estimate has no layers {missing}; compute first_order_impact with those layers")
    if not 1 <= int(queries_per_layer) <= P:
        raise ValueError(f"queries_per_layer must be in 1..{P}, got {queries_per_layer}")
    prefix_q = [cls] if (include_cls and cls is not None) else []
    rows = []
    for layer in sel:
        queries = np.sort(rng.choice(P, size=int(queries_per_layer), replace=False))
        if keys is None:
            k_idx = np.arange(P)
        elif isinstance(keys, (int, np.integer)):
            if not 2 <= int(keys) <= P:
                raise ValueError(f"keys as a count must be in 2..{P}, got {keys}")
            k_idx = np.sort(rng.choice(P, size=int(keys), replace=False))
        else:
            k_idx = _patch_indices(keys, P, "keys")
        ko = knockout_impact(vit, x, layer, queries, estimate["target"], keys=k_idx, prefix_queries=prefix_q, chunk=chunk)
        exact = ko["impact"]
        li = est_layers.index(layer)
        est_rows = [estimate["prefix_impact"][:, li, p] for p in prefix_q] + [estimate["impact"][:, li, q] for q in queries]
        est = np.stack(est_rows, axis=1)[:, :, k_idx].astype(np.float64)  # (B, Q, K)
        labels = [(-1, "cls")] * len(prefix_q) + [(int(q), "patch") for q in queries]
        k = min(10, len(k_idx))
        for b in range(exact.shape[0]):
            for qi, (q, kind) in enumerate(labels):
                e, a = exact[b, qi], est[b, qi]
                varied = np.ptp(a) > 0 and np.ptp(e) > 0
                top_e = set(np.argsort(-e, kind="stable")[:k].tolist())
                top_a = set(np.argsort(-a, kind="stable")[:k].tolist())
                rows.append(
                    {
                        "layer": layer,
                        "image": b,
                        "query": q,
                        "query_kind": kind,
                        "n_keys": len(k_idx),
                        "spearman": float(stats.spearmanr(a, e).statistic) if varied else np.nan,
                        "pearson": float(stats.pearsonr(a, e).statistic) if varied else np.nan,
                        "top10_overlap": len(top_e & top_a) / k,
                        "sign_agreement": float(np.mean(np.sign(a) == np.sign(e))),
                        "exact_sum": float(e.sum()),
                        "estimate_sum": float(a.sum()),
                        "exact_max_abs": float(np.abs(e).max()),
                    }
                )
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- aggregation
_PARTS = ("impact", "abs_impact", "prefix_impact", "key_importance")


class InteractionAccumulator:
    """Streaming statistics of first-order impacts over an image set.

    Feed it the output of :func:`first_order_impact` batch by batch with :meth:`update`; it keeps
    four :class:`Welford` accumulators (float64): ``impact`` ``(L, P, P)``, ``abs_impact``
    ``(L, P, P)`` (the absolute impacts: how much an edge matters either way), ``prefix_impact``
    ``(L, num_prefix, P)`` and ``key_importance`` ``(P,)`` (see :func:`key_importance`, prefix
    queries included). Memory does not grow with the number of images. :meth:`summary` adds the
    significance test (see :func:`interaction_summary`).
    """

    def __init__(self, num_layers: int, num_patches: int, num_prefix: int) -> None:
        self.impact = Welford((num_layers, num_patches, num_patches))
        self.abs_impact = Welford((num_layers, num_patches, num_patches))
        self.prefix_impact = Welford((num_layers, num_prefix, num_patches))
        self.key_importance = Welford((num_patches,))

    @classmethod
    def for_model(cls, vit: "ViT") -> "InteractionAccumulator":
        return cls(vit.num_layers, vit.layout.num_patches, vit.layout.num_prefix)

    @property
    def count(self) -> int:
        return self.impact.count

    def update(self, result: Mapping[str, np.ndarray]) -> "InteractionAccumulator":
        """Add one batch: a dict with ``impact (B, L, P, P)`` and ``prefix_impact (B, L, num_prefix, P)``
        covering every layer (as :func:`first_order_impact` returns by default)."""
        if "layers" in result and len(np.asarray(result["layers"])) != self.impact.shape[0]:
            raise ValueError(
                f"the batch covers {len(np.asarray(result['layers']))} layers but the accumulator expects all "
                f"{self.impact.shape[0]}; call first_order_impact without `layers`"
            )
        self.impact.update(result["impact"])
        self.abs_impact.update(np.abs(result["impact"]))
        self.prefix_impact.update(result["prefix_impact"])
        self.key_importance.update(key_importance(result["impact"], result["prefix_impact"]))
        return self

    def merge(self, other: "InteractionAccumulator") -> "InteractionAccumulator":
        self.impact.merge(other.impact)
        self.abs_impact.merge(other.abs_impact)
        self.prefix_impact.merge(other.prefix_impact)
        self.key_importance.merge(other.key_importance)
        return self

    def state(self) -> dict[str, np.ndarray]:
        """Flat dict of numpy arrays (names prefixed ``impact.``, ``abs_impact.``, ``prefix_impact.``,
        ``key_importance.``)."""
        out = {}
        for name in _PARTS:
            for k, v in getattr(self, name).state().items():
                out[f"{name}.{k}"] = v
        return out

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> "InteractionAccumulator":
        parts = {
            name: Welford.from_state({k: state[f"{name}.{k}"] for k in ("count", "mean", "m2")})
            for name in _PARTS
        }
        L, P, _ = parts["impact"].shape
        acc = cls(L, P, parts["prefix_impact"].shape[1])
        for name in _PARTS:
            setattr(acc, name, parts[name])
        return acc

    def summary(self, q: float = 0.05, alternative: str = "greater") -> dict[str, np.ndarray]:
        """:func:`interaction_summary` of the patch edges, plus ``abs_mean`` ``(L, P, P)`` (mean
        absolute impact), ``prefix_mean``, ``prefix_std``, ``prefix_sem`` ``(L, num_prefix, P)`` and
        ``key_importance_mean``/``_sem`` ``(P,)``."""
        out = interaction_summary(self.impact, q=q, alternative=alternative)
        out["abs_mean"] = self.abs_impact.mean.copy()
        out["prefix_mean"] = self.prefix_impact.mean.copy()
        out["prefix_std"] = self.prefix_impact.std
        out["prefix_sem"] = self.prefix_impact.sem
        out["key_importance_mean"] = self.key_importance.mean.copy()
        out["key_importance_sem"] = self.key_importance.sem
        return out


def interaction_summary(acc: Welford, q: float = 0.05, alternative: str = "greater") -> dict[str, np.ndarray]:
    """Mean, spread and significance of per-edge impacts accumulated in ``acc`` (shape ``(L, ...)``).

    Returns ``n`` (images), ``mean``, ``std`` (``ddof=1``), ``sem``, ``t``, ``p_value`` (one-sample
    t-test, see :func:`ttest_pvalues`; the sign test where ``zero_spread``), ``zero_spread``,
    ``q_value`` (BH-adjusted within each layer, i.e. over all cells of ``acc.shape[1:]``) and
    ``significant`` (``q_value <= q``), and ``q_value_all`` / ``significant_all`` (BH over every
    cell of every layer at once); all arrays have ``acc.shape``.

    Within-layer control is the default (fields, tables and figures use it) because every claim
    the analyses make is about one layer (its fields, its window, its share of significant edges)
    and layers differ by orders of magnitude in impact, so one family per layer keeps a strongly
    interacting layer from lowering the bar for the others. ``*_all`` controls the false discovery
    rate over the whole model, for claims that span layers ("edges significant anywhere").
    """
    if acc.count < 2:
        raise ValueError(f"significance needs at least 2 images; the accumulator holds {acc.count}")
    sem = acc.sem
    t, p = ttest_pvalues(acc.mean, sem, acc.count, alternative)
    L = acc.shape[0]
    adjusted, rejected = benjamini_hochberg(p.reshape(L, -1), q=q, axis=1)
    adjusted_all, rejected_all = benjamini_hochberg(p.reshape(-1), q=q)
    return {
        "n": np.asarray(acc.count, dtype=np.int64),
        "mean": acc.mean.copy(),
        "std": acc.std,
        "sem": sem,
        "t": t,
        "p_value": p,
        "zero_spread": zero_spread(acc.mean, sem),
        "q_value": adjusted.reshape(acc.shape),
        "significant": rejected.reshape(acc.shape),
        "q_value_all": adjusted_all.reshape(acc.shape),
        "significant_all": rejected_all.reshape(acc.shape),
    }

"""Responsive fields: which key patches each query patch really relies on, layer by layer.

Definition (Ma et al. 2022, "Responsive field"). Over an image set, the responsive field of
query patch ``i`` in layer ``l`` is the set of key patches ``j`` whose edge ``i -> j`` has a
significantly positive mean impact (:func:`vitscope.analysis.interaction.interaction_summary`:
one-sided t-test, Benjamini-Hochberg within the layer); see :func:`responsive_fields`. For one
image, where no test is possible, :func:`image_field_membership` takes the smallest set of keys
carrying a given share (default 50 %) of the row's positive impact.

Edge-level means can stay indistinguishable from zero even when every image has a clear field
(an edge that helps in one image hurts in another), which leaves the set-level fields above empty.
:class:`FieldAccumulator` therefore also summarises the per-image fields over the set: mean size,
mean arrow with a Hotelling T-squared test of its direction, and how often each key belongs to a
query's field.

Geometry of a field, in patch units on the grid (rows grow downwards, columns to the right):

- ``size``: number of keys; ``size_frac``: ``size / P``.
- ``dy, dx``: centroid of the field's key positions minus the query position (the arrow). The
  centroid is unweighted by default (the field as a set); ``weights`` (e.g. the mean impacts)
  gives an impact-weighted centroid.
- ``magnitude = sqrt(dx^2 + dy^2)`` and ``angle`` in degrees counter-clockwise from "right" with
  "up" at 90 (screen convention: up is ``-dy``).
- ``spread``: root-mean-square distance of the field's keys from their centroid (same weights).
- ``extent``: mean distance of the field's keys from the query itself (how far the field reaches).

Empty fields have ``size = 0`` and NaN geometry. Note that significance-based fields grow with the
number of images (smaller effects become detectable); compare layers within one run, or set
``min_impact`` to require a minimum effect size as well.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
import pandas as pd

from vitscope.core.grid import allowed_from_keys, top_keys

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from vitscope.core.layout import TokenLayout

#: Per-query field measures returned by :func:`field_statistics`.
FIELD_MEASURES: tuple[str, ...] = ("size", "size_frac", "dy", "dx", "magnitude", "angle", "spread", "extent")


def field_membership(summary: Mapping[str, np.ndarray], *, min_impact: float = 0.0) -> np.ndarray:
    """Set-level fields ``(L, P, P)`` bool: edges flagged ``significant`` whose mean impact exceeds ``min_impact``.

    ``summary`` is :func:`~vitscope.analysis.interaction.interaction_summary` output (or
    ``InteractionAccumulator.summary()``) computed with ``alternative="greater"``.
    """
    for key in ("significant", "mean"):
        if key not in summary:
            raise ValueError(f"summary has no {key!r}; pass the output of InteractionAccumulator.summary()")
    mean = np.asarray(summary["mean"])
    return np.asarray(summary["significant"], dtype=bool) & (mean > max(float(min_impact), 0.0))


def image_field_membership(impact: Any, mass: float = 0.5) -> np.ndarray:
    """Per-image fields ``(..., P, P)`` bool from one image's impacts ``(..., P, P)``.

    For each query row, the fewest keys (largest impact first) whose positive impacts add up to at
    least ``mass`` of the row's total positive impact; a row with no positive impact has an empty
    field. Scale-free, so layers with small and large impacts are comparable.
    """
    if not 0.0 < float(mass) <= 1.0:
        raise ValueError(f"mass must be a share in (0, 1], got {mass}")
    v = np.clip(np.asarray(impact, dtype=np.float64), 0.0, None)
    order = np.argsort(-v, axis=-1, kind="stable")
    sorted_v = np.take_along_axis(v, order, axis=-1)
    total = sorted_v.sum(-1, keepdims=True)
    before = np.cumsum(sorted_v, axis=-1) - sorted_v  # positive mass of the keys ranked above
    chosen_sorted = (before < float(mass) * total * (1 - 1e-12)) & (sorted_v > 0)
    out = np.zeros(v.shape, dtype=bool)
    np.put_along_axis(out, order, chosen_sorted, axis=-1)
    return out


def field_statistics(membership: Any, layout: "TokenLayout", weights: Optional[Any] = None) -> dict[str, np.ndarray]:
    """Size, centroid offset, spread and extent of every field: arrays ``(..., P)`` per measure.

    ``membership`` is ``(..., P, P)`` bool (query rows, key columns); ``weights`` (same shape,
    optional) weights each member key in the centroid and spread (negative weights are clipped to
    0; a field whose weights are all 0 falls back to equal weights).
    """
    m = np.asarray(membership, dtype=bool)
    P = layout.num_patches
    if m.shape[-2:] != (P, P):
        raise ValueError(f"membership must end in ({P}, {P}) for this model's {P} patches, got {m.shape}")
    pos = layout.patch_grid().astype(np.float64)  # (P, 2) as (row, col)
    w = m.astype(np.float64)
    if weights is not None:
        ww = np.clip(np.broadcast_to(np.asarray(weights, dtype=np.float64), m.shape), 0.0, None) * m
        has = ww.sum(-1, keepdims=True) > 0
        w = np.where(has, ww, w)
    size = m.sum(-1)
    tot = w.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        cy = (w * pos[:, 0]).sum(-1) / tot
        cx = (w * pos[:, 1]).sum(-1) / tot
        d2c = (pos[:, 0] - cy[..., None]) ** 2 + (pos[:, 1] - cx[..., None]) ** 2
        spread = np.sqrt((w * d2c).sum(-1) / tot)
        d_query = np.sqrt((pos[None, :, 0] - pos[:, None, 0]) ** 2 + (pos[None, :, 1] - pos[:, None, 1]) ** 2)  # (P, P)
        extent = (w * d_query).sum(-1) / tot
    dy = cy - pos[:, 0]
    dx = cx - pos[:, 1]
    empty = size == 0
    for a in (dy, dx, spread, extent):
        a[empty] = np.nan
    return {
        "size": size.astype(np.int64),
        "size_frac": size / P,
        "dy": dy,
        "dx": dx,
        "magnitude": np.hypot(dx, dy),
        "angle": np.degrees(np.arctan2(-dy, dx)) % 360.0,
        "spread": spread,
        "extent": extent,
    }


def responsive_fields(
    summary: Mapping[str, np.ndarray], layout: "TokenLayout", *, min_impact: float = 0.0, weighted: bool = False
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Set-level fields and their geometry: ``(membership (L, P, P), statistics {measure: (L, P)})``.

    ``weighted`` weights the centroid and spread by the mean impacts of the member keys.
    """
    member = field_membership(summary, min_impact=min_impact)
    return member, field_statistics(member, layout, np.asarray(summary["mean"]) if weighted else None)


def image_fields(impact: Any, layout: "TokenLayout", mass: float = 0.5) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """One image's fields and their geometry from its impacts ``(L, P, P)`` (e.g.
    ``first_order_impact(...)["impact"][b]``): ``(membership (L, P, P), statistics {measure: (L, P)})``."""
    member = image_field_membership(impact, mass)
    return member, field_statistics(member, layout)


class FieldAccumulator:
    """Per-image responsive fields aggregated over an image set, in streaming form.

    Edge-level means can be indistinguishable from zero even where every image has a clear field:
    the same edge helps in one image and hurts in another, while each image's field still lies in a
    consistent direction. This accumulator therefore summarises the *geometry* of per-image fields
    (:func:`image_field_membership` with share ``mass``), image by image:

    - the mean field size (empty fields count as 0), the mean spread and extent of non-empty fields;
    - the mean arrow ``(dy, dx)`` over the images where the field is non-empty, with a one-sample
      Hotelling T-squared test of "mean arrow = 0" per (layer, query) and Benjamini-Hochberg at
      level ``q`` over the queries of each layer (a significant arrow = a consistent direction);
    - ``frequency (L, P, P)``: the share of images in which key ``j`` belongs to query ``i``'s field.

    Feed it ``impact (B, L, P, P)`` batches from :func:`~vitscope.analysis.interaction.first_order_impact`.
    """

    def __init__(self, num_layers: int, layout: "TokenLayout", mass: float = 0.5) -> None:
        self.layout = layout
        self.mass = float(mass)
        L, P = int(num_layers), layout.num_patches
        self.n_images = 0
        self.count = np.zeros((L, P), dtype=np.int64)  # images with a non-empty field
        self.sums = {k: np.zeros((L, P)) for k in ("size", "dy", "dx", "dyy", "dxx", "dxy", "spread", "extent", "magnitude")}
        self.frequency_counts = np.zeros((L, P, P), dtype=np.int64)

    def update(self, impact: Any) -> "FieldAccumulator":
        """Add a batch of per-image impacts ``(B, L, P, P)``."""
        impact = np.asarray(impact)
        if impact.ndim != 4 or impact.shape[1:] != self.frequency_counts.shape:
            raise ValueError(f"expected impact of shape (B, {', '.join(map(str, self.frequency_counts.shape))}), got {impact.shape}")
        for b in range(impact.shape[0]):
            member = image_field_membership(impact[b], self.mass)
            st = field_statistics(member, self.layout)
            ok = st["size"] > 0
            self.n_images += 1
            self.count += ok
            self.frequency_counts += member
            self.sums["size"] += st["size"]
            dy, dx = np.where(ok, st["dy"], 0.0), np.where(ok, st["dx"], 0.0)
            self.sums["dy"] += dy
            self.sums["dx"] += dx
            self.sums["dyy"] += dy * dy
            self.sums["dxx"] += dx * dx
            self.sums["dxy"] += dx * dy
            for k in ("spread", "extent", "magnitude"):
                self.sums[k] += np.where(ok, st[k], 0.0)
        return self

    def merge(self, other: "FieldAccumulator") -> "FieldAccumulator":
        """Fold in an accumulator over other images (same layers, grid and mass)."""
        if other.count.shape != self.count.shape or other.mass != self.mass:
            raise ValueError(f"cannot merge field accumulators of shapes {self.count.shape}/{other.count.shape} and masses {self.mass}/{other.mass}")
        self.n_images += other.n_images
        self.count += other.count
        self.frequency_counts += other.frequency_counts
        for k in self.sums:
            self.sums[k] += other.sums[k]
        return self

    def state(self) -> dict[str, np.ndarray]:
        out = {f"sums.{k}": v.copy() for k, v in self.sums.items()}
        out.update(n_images=np.asarray(self.n_images), count=self.count.copy(), frequency_counts=self.frequency_counts.copy(), mass=np.asarray(self.mass))
        return out

    @classmethod
    def from_state(cls, state: Mapping[str, Any], layout: "TokenLayout") -> "FieldAccumulator":
        acc = cls(np.asarray(state["count"]).shape[0], layout, float(np.asarray(state["mass"])))
        acc.n_images = int(np.asarray(state["n_images"]))
        acc.count = np.asarray(state["count"], dtype=np.int64).copy()
        acc.frequency_counts = np.asarray(state["frequency_counts"], dtype=np.int64).copy()
        acc.sums = {k: np.asarray(state[f"sums.{k}"], dtype=np.float64).copy() for k in acc.sums}
        return acc

    def summary(self, q: float = 0.05) -> dict[str, np.ndarray]:
        """Set-level field geometry, ``(L, P)`` arrays with the keys of :func:`field_statistics` (so the
        figure and summary functions accept it) plus ``n`` (images with a non-empty field),
        ``offset_mean`` (mean per-image arrow length), ``coherence`` (mean arrow length over
        ``offset_mean``), ``arrow_t2``, ``arrow_p``, ``arrow_q``, ``arrow_significant`` and
        ``frequency (L, P, P)``. ``size`` is the mean size over all images, the other measures are
        means over the images with a non-empty field (NaN where there are none)."""
        from scipy import stats

        from vitscope.core.stats import benjamini_hochberg

        if self.n_images == 0:
            raise ValueError("no images accumulated yet")
        n = self.count.astype(np.float64)
        P = self.layout.num_patches
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = {k: self.sums[k] / n for k in self.sums if k != "size"}
            my, mx = mean["dy"], mean["dx"]
            # Sample covariance of the arrows (ddof = 1).
            syy = (self.sums["dyy"] - n * my * my) / (n - 1)
            sxx = (self.sums["dxx"] - n * mx * mx) / (n - 1)
            sxy = (self.sums["dxy"] - n * mx * my) / (n - 1)
            det = syy * sxx - sxy * sxy
            # T^2 = n m^T S^-1 m for m = (my, mx), S = [[syy, sxy], [sxy, sxx]].
            t2 = n * (my * my * sxx - 2 * my * mx * sxy + mx * mx * syy) / det
            f = (n - 2) / (2 * (n - 1)) * t2
        valid = (n >= 3) & (det > 1e-12 * np.maximum(syy * sxx, 1e-300)) & np.isfinite(f)
        p = np.where(valid, stats.f.sf(np.where(valid, f, 0.0), 2, np.maximum(n - 2, 1)), 1.0)
        adjusted, rejected = benjamini_hochberg(p, q=q, axis=1)
        magnitude = np.hypot(mx, my)
        return {
            "n": self.count.copy(),
            "size": self.sums["size"] / self.n_images,
            "size_frac": self.sums["size"] / self.n_images / P,
            "dy": my,
            "dx": mx,
            "magnitude": magnitude,
            "angle": np.degrees(np.arctan2(-my, mx)) % 360.0,
            "spread": mean["spread"],
            "extent": mean["extent"],
            "offset_mean": mean["magnitude"],
            "coherence": magnitude / mean["magnitude"],
            "arrow_t2": np.where(valid, t2, np.nan),
            "arrow_p": p,
            "arrow_q": adjusted,
            "arrow_significant": rejected,
            "frequency": self.frequency_counts / self.n_images,
        }


def field_frame(stats: Mapping[str, np.ndarray], layout: "TokenLayout") -> pd.DataFrame:
    """Long table of :func:`field_statistics` for ``(L, P)`` arrays: one row per (layer, query patch)
    with ``layer, query, row, col`` and every measure."""
    size = np.asarray(stats["size"])
    if size.ndim != 2:
        raise ValueError(f"expected per-layer statistics of shape (L, P), got {size.shape}")
    L, P = size.shape
    pos = layout.patch_grid()
    df = pd.DataFrame(
        {
            "layer": np.repeat(np.arange(L), P),
            "query": np.tile(np.arange(P), L),
            "row": np.tile(pos[:, 0], L),
            "col": np.tile(pos[:, 1], L),
        }
    )
    for k in FIELD_MEASURES:
        df[k] = np.asarray(stats[k]).reshape(-1)
    return df


def field_layer_summary(stats: Mapping[str, np.ndarray], layout: "TokenLayout") -> pd.DataFrame:
    """How fields grow and where they point, one row per layer (from ``(L, P)`` statistics).

    Columns: ``layer``; ``frac_nonempty`` (queries with a non-empty field); over non-empty fields:
    ``size_mean``, ``size_median``, ``size_frac_mean``, ``spread_mean``, ``extent_mean``,
    ``offset_mean`` (mean arrow length), ``mean_dx``, ``mean_dy`` (mean arrow), ``mean_angle``
    (its direction, degrees, up = 90), ``coherence`` (length of the mean arrow over the mean arrow
    length: 1 = all arrows parallel, 0 = no common direction) and ``toward_centre`` (mean component
    of the arrows along the unit vector from the query to the grid centre, in patches: positive =
    fields lean towards the image centre; queries at the centre are skipped).

    Baselines for a field spread evenly over the whole grid, whose centroid is the grid centre:
    ``extent_uniform`` (mean distance from a query to all patches) and ``offset_uniform`` (mean
    distance from a query to the grid centre), both over the queries with a non-empty field. A
    large field's arrow points to the centre for geometric reasons alone, so read
    ``toward_centre`` against ``offset_uniform`` and ``extent_mean`` against ``extent_uniform``.
    """
    size = np.asarray(stats["size"])
    L, P = size.shape
    pos = layout.patch_grid().astype(np.float64)
    centre = (np.asarray(layout.grid, dtype=np.float64) - 1) / 2
    to_c = centre - pos  # (P, 2) as (drow, dcol)
    norm = np.hypot(to_c[:, 0], to_c[:, 1])
    all_dist = np.hypot(pos[:, None, 0] - pos[None, :, 0], pos[:, None, 1] - pos[None, :, 1]).mean(1)  # (P,)
    rows = []
    for l in range(L):
        ok = size[l] > 0
        dy, dx = np.asarray(stats["dy"])[l][ok], np.asarray(stats["dx"])[l][ok]
        mag = np.asarray(stats["magnitude"])[l][ok]
        mdx, mdy = (float(dx.mean()), float(dy.mean())) if ok.any() else (np.nan, np.nan)
        off = float(mag.mean()) if ok.any() else np.nan
        sel = ok & (norm > 0)
        toward = (
            float(((np.asarray(stats["dy"])[l][sel] * to_c[sel, 0] + np.asarray(stats["dx"])[l][sel] * to_c[sel, 1]) / norm[sel]).mean())
            if sel.any()
            else np.nan
        )
        rows.append(
            {
                "layer": l,
                "frac_nonempty": float(ok.mean()),
                "size_mean": float(size[l][ok].mean()) if ok.any() else 0.0,
                "size_median": float(np.median(size[l][ok])) if ok.any() else 0.0,
                "size_frac_mean": float(size[l][ok].mean() / P) if ok.any() else 0.0,
                "spread_mean": float(np.asarray(stats["spread"])[l][ok].mean()) if ok.any() else np.nan,
                "extent_mean": float(np.asarray(stats["extent"])[l][ok].mean()) if ok.any() else np.nan,
                "offset_mean": off,
                "mean_dx": mdx,
                "mean_dy": mdy,
                "mean_angle": float(np.degrees(np.arctan2(-mdy, mdx)) % 360.0) if ok.any() else np.nan,
                "coherence": float(np.hypot(mdx, mdy) / off) if ok.any() and off > 0 else np.nan,
                "toward_centre": toward,
                "extent_uniform": float(all_dist[ok].mean()) if ok.any() else np.nan,
                "offset_uniform": float(norm[ok].mean()) if ok.any() else np.nan,
            }
        )
    return pd.DataFrame(rows)


def field_attention_mask(membership: Any, layout: "TokenLayout", include_self: bool = True) -> np.ndarray:
    """Allowed-attention masks ``(..., T, T)`` that restrict each patch query to its field.

    Prefix tokens (CLS etc.) attend globally and are visible to every query; ``include_self`` also
    lets each patch attend to itself (so an empty field still leaves the query its own token). Use
    it as ``LayerPlan(allowed=...)`` per layer, e.g. for a window-free transformer whose windows
    come from a reference model's fields.
    """
    m = np.asarray(membership, dtype=bool).copy()
    P = layout.num_patches
    if m.shape[-2:] != (P, P):
        raise ValueError(f"membership must end in ({P}, {P}), got {m.shape}")
    if include_self:
        idx = np.arange(P)
        m[..., idx, idx] = True
    return allowed_from_keys(m, layout)


def winft_masks_from_fields(
    summary: Mapping[str, np.ndarray],
    layout: "TokenLayout",
    *,
    min_impact: float = 0.0,
    top_n: int = 0,
    include_self: bool = True,
) -> "torch.Tensor":
    """WinfT masks ``(L, T, T)`` from a reference model's responsive fields.

    ``summary`` is ``InteractionAccumulator.summary(alternative="greater")`` over *training* images
    (``mean`` and ``significant`` ``(L, P, P)``). Query patch ``i`` of layer ``l`` may attend to:

    - its responsive field: keys ``j`` whose impact is significantly positive and above
      ``min_impact`` (:func:`vitscope.analysis.fields.field_membership`);
    - itself when ``include_self``;
    - at least its ``top_n`` keys by mean impact, so that no field is empty (0: no minimum).

    Prefix tokens (CLS, ...) attend and are attended globally.
    """
    from vitscope.models.winft import WinfTMaskError

    keys = field_membership(summary, min_impact=min_impact)
    P = layout.num_patches
    if keys.ndim != 3 or keys.shape[1:] != (P, P):
        raise WinfTMaskError(f"the field summary is for {keys.shape[1:]} patches per layer but this layout has ({P}, {P})")
    if top_n < 0 or top_n > P:
        raise WinfTMaskError(f"top_n={top_n} must lie in 0..{P}")
    if top_n:
        keys = keys | top_keys(np.asarray(summary["mean"]), top_n)
    if include_self:
        keys = keys | np.eye(P, dtype=bool)[None]
    import torch

    return torch.from_numpy(allowed_from_keys(keys, layout))

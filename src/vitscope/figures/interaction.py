"""Figures for patch interactions: responsive-field arrows and flow colours, impact maps, and the
window-design, patch-removal and estimate-agreement curves.

Every function takes the arrays / DataFrames produced by :mod:`vitscope.analysis.interaction`,
:mod:`vitscope.analysis.fields` and :mod:`vitscope.analysis.windows` and returns a matplotlib
``Figure`` (nothing is shown or saved; call ``fig.savefig(...)``). Grids are drawn in image
orientation: patch row 0 at the top, column 0 at the left, one unit per patch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
import pandas as pd

from vitscope.core.indices import select_layers

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

    from vitscope.core.layout import TokenLayout



def flow_colours(dy: Any, dx: Any, max_magnitude: Optional[float] = None) -> np.ndarray:
    """Flow-colour encoding of arrows: RGB in ``[0, 1]`` with shape ``dy.shape + (3,)``.

    Hue = direction (0 = right/red, 120 = up-left/green, 240 = down-left/blue, counter-clockwise
    with up at 90), saturation = magnitude / ``max_magnitude`` (default: the largest finite
    magnitude; clipped at 1), value = 1. NaN arrows (empty fields) are mid grey.
    """
    dy = np.asarray(dy, dtype=np.float64)
    dx = np.asarray(dx, dtype=np.float64)
    mag = np.hypot(dx, dy)
    finite = np.isfinite(mag)
    top = float(max_magnitude) if max_magnitude is not None else (float(mag[finite].max()) if finite.any() else 0.0)
    hue = (np.degrees(np.arctan2(-dy, dx)) % 360.0) / 360.0
    sat = np.clip(mag / top, 0.0, 1.0) if top > 0 else np.zeros_like(mag)
    hsv = np.stack([np.where(finite, hue, 0.0), np.where(finite, sat, 0.0), np.ones_like(mag)], axis=-1)
    from matplotlib.colors import hsv_to_rgb

    rgb = hsv_to_rgb(hsv)
    rgb[~finite] = 0.5
    return rgb


def _figure(n: int, ncols: int, size: float = 2.6) -> tuple["Figure", np.ndarray]:
    from matplotlib.figure import Figure

    ncols = max(1, min(int(ncols), n))
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(size * ncols, size * nrows + 0.4), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).reshape(-1)
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def _layers(stats_layers: int, layers: Optional[Sequence[int]]) -> list[int]:
    return select_layers(layers, stats_layers, "the statistics")


def _grid_axes(ax: Any, grid: tuple[int, int]) -> None:
    rows, cols = grid
    ax.set_xlim(-0.5, cols - 0.5)
    ax.set_ylim(rows - 0.5, -0.5)  # row 0 at the top, as in the image
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])


def _background(ax: Any, image: Any, grid: tuple[int, int]) -> None:
    if image is None:
        return
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):  # (C, H, W) tensor layout
        arr = np.moveaxis(arr, 0, -1)
    if arr.dtype.kind == "f":
        lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
        arr = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
    rows, cols = grid
    ax.imshow(arr.squeeze(), extent=(-0.5, cols - 0.5, rows - 0.5, -0.5), alpha=0.55, cmap="gray", interpolation="bilinear")


def plot_field_arrows(
    stats: Mapping[str, np.ndarray],
    layout: "TokenLayout",
    layers: Optional[Sequence[int]] = None,
    *,
    image: Any = None,
    ncols: int = 4,
    length: Optional[float] = None,
    title: Optional[str] = None,
) -> "Figure":
    """Responsive-field arrows over the patch grid, one panel per layer.

    ``stats`` is :func:`~vitscope.analysis.fields.field_statistics` (or ``FieldAccumulator.summary()``)
    output with ``(L, P)`` arrays; each patch gets an arrow from its centre towards its field's
    centroid, coloured by field size; crosses mark empty fields. ``length`` multiplies the arrows:
    ``1`` draws them at true length (in patches); the default scales all panels alike so the 95th
    percentile arrow is 1.5 patches long (the factor is shown in the titles), since true-length
    arrows of large fields overlap. ``image`` (an ``(H, W, 3)`` array, PIL image or ``(C, H, W)``
    tensor) is drawn underneath, for per-image fields.
    """
    dy, dx, size = (np.asarray(stats[k], dtype=np.float64) for k in ("dy", "dx", "size"))
    sel = _layers(dy.shape[0], layers)
    pos = layout.patch_grid()
    if length is None:
        mag = np.hypot(dx[sel], dy[sel])
        top = float(np.nanpercentile(mag, 95)) if np.isfinite(mag).any() else 0.0
        length = 1.5 / top if top > 0 else 1.0
    fig, axes = _figure(len(sel), ncols)
    vmax = max(float(np.nanmax(size)), 1.0)
    q = None
    for ax, l in zip(axes, sel):
        _grid_axes(ax, layout.grid)
        _background(ax, image, layout.grid)
        ok = np.isfinite(dx[l]) & np.isfinite(dy[l]) & (size[l] > 0)
        q = ax.quiver(
            pos[ok, 1], pos[ok, 0], length * dx[l][ok], length * dy[l][ok], size[l][ok],
            angles="xy", scale_units="xy", scale=1.0, cmap="viridis", clim=(0, vmax), width=0.008,
        )  # fmt: skip
        ax.plot(pos[~ok, 1], pos[~ok, 0], "x", color="0.6", markersize=3)
        ax.set_title(f"layer {l}" + ("" if length == 1 else f" (arrows x{length:.2g})"), fontsize=9)
    if q is not None:
        fig.colorbar(q, ax=list(axes), shrink=0.6, label="field size (keys)")
    if title:
        fig.suptitle(title)
    return fig


def plot_flow_colours(
    stats: Mapping[str, np.ndarray],
    layout: "TokenLayout",
    layers: Optional[Sequence[int]] = None,
    *,
    ncols: int = 4,
    max_magnitude: Optional[float] = None,
    title: Optional[str] = None,
) -> "Figure":
    """Flow-colour maps of the field arrows, one panel per layer, plus a colour-wheel key.

    Hue = arrow direction, saturation = arrow length relative to ``max_magnitude`` (default: the
    longest arrow over the layers shown, so panels are comparable); grey = empty field.
    """
    dy, dx = np.asarray(stats["dy"]), np.asarray(stats["dx"])
    sel = _layers(dy.shape[0], layers)
    rows, cols = layout.grid
    if max_magnitude is None:
        mag = np.hypot(dx[sel], dy[sel])
        max_magnitude = float(np.nanmax(mag)) if np.isfinite(mag).any() else 1.0
    fig, axes = _figure(len(sel) + 1, ncols)
    for ax, l in zip(axes, sel):
        rgb = flow_colours(dy[l].reshape(rows, cols), dx[l].reshape(rows, cols), max_magnitude)
        ax.imshow(rgb, extent=(-0.5, cols - 0.5, rows - 0.5, -0.5), interpolation="nearest")
        _grid_axes(ax, layout.grid)
        ax.set_title(f"layer {l}", fontsize=9)
    key = axes[-1]
    n = 101
    yy, xx = np.mgrid[-1 : 1 : n * 1j, -1 : 1 : n * 1j]
    wheel = flow_colours(yy * max_magnitude, xx * max_magnitude, max_magnitude)
    wheel[np.hypot(xx, yy) > 1] = 1.0
    key.imshow(wheel, extent=(-1, 1, 1, -1))
    key.set_xticks([])
    key.set_yticks([])
    key.set_title(f"key: direction, length up to {max_magnitude:.2g}", fontsize=8)
    if title:
        fig.suptitle(title)
    return fig


def plot_query_impact(
    mean: np.ndarray,
    layout: "TokenLayout",
    query: int,
    layers: Optional[Sequence[int]] = None,
    *,
    membership: Optional[np.ndarray] = None,
    ncols: int = 4,
) -> "Figure":
    """Impact of each key patch for one query patch, per layer (diverging colours, 0 = white).

    ``mean`` is ``(L, P, P)`` (mean or one image's impacts). The query is marked with a star and,
    with ``membership`` ``(L, P, P)``, the keys of its responsive field with dots.
    """
    mean = np.asarray(mean)
    P = layout.num_patches
    if not 0 <= int(query) < P:
        raise ValueError(f"query {query} is not a patch index (0..{P - 1})")
    sel = _layers(mean.shape[0], layers)
    rows, cols = layout.grid
    fig, axes = _figure(len(sel), ncols)
    qr, qc = divmod(int(query), cols)
    for ax, l in zip(axes, sel):
        m = mean[l, int(query)].reshape(rows, cols)
        lim = float(np.abs(m).max()) or 1.0
        im = ax.imshow(m, cmap="RdBu_r", vmin=-lim, vmax=lim, extent=(-0.5, cols - 0.5, rows - 0.5, -0.5))
        _grid_axes(ax, layout.grid)
        if membership is not None:
            rr, cc = np.nonzero(np.asarray(membership)[l, int(query)].reshape(rows, cols))
            ax.plot(cc, rr, ".", color="k", markersize=2)
        ax.plot([qc], [qr], "*", color="gold", markeredgecolor="k", markersize=9)
        ax.set_title(f"layer {l}", fontsize=9)
        fig.colorbar(im, ax=ax, shrink=0.7)
    return fig


def plot_field_growth(layer_summary: pd.DataFrame) -> "Figure":
    """How fields grow and where they point, per layer (from ``field_layer_summary``).

    Left: mean field size (share of the grid) and share of non-empty fields. Middle: extent,
    spread and arrow length in patches. Right: coherence of the arrow directions and the lean
    towards the image centre.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 3.2), layout="constrained")
    a, b, c = fig.subplots(1, 3)
    x = layer_summary["layer"]
    a.plot(x, layer_summary["size_frac_mean"], "o-", label="mean size / P")
    a.plot(x, layer_summary["frac_nonempty"], "s--", label="non-empty fields")
    a.set_ylim(0, 1.05)
    a.set_title("field size")
    for col, lab in (("extent_mean", "extent"), ("spread_mean", "spread"), ("offset_mean", "arrow length")):
        b.plot(x, layer_summary[col], "o-", label=lab)
    b.set_title("distances (patches)")
    c.plot(x, layer_summary["coherence"], "o-", label="coherence")
    c.plot(x, layer_summary["toward_centre"], "s--", label="toward centre")
    c.axhline(0, color="0.7", lw=0.8)
    c.set_title("direction")
    for ax in (a, b, c):
        ax.set_xlabel("layer")
        ax.legend(fontsize=7)
    return fig


def plot_agreement(summary: pd.DataFrame) -> "Figure":
    """Spearman correlation between first-order and exact impacts per layer (mean +- s.e.), one
    line per query kind (from :func:`~vitscope.analysis.interaction.agreement_summary`)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 3.2), layout="constrained")
    ax = fig.subplots()
    groups = summary.groupby("query_kind") if "query_kind" in summary.columns else [("all", summary)]
    for kind, g in groups:
        ax.errorbar(g["layer"], g["spearman_mean"], yerr=g["spearman_sem"], fmt="o-", capsize=2, label=str(kind))
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel("layer")
    ax.set_ylabel("Spearman (estimate vs exact)")
    ax.legend(fontsize=8)
    return fig


def plot_window_curve(curve: pd.DataFrame) -> "Figure":
    """Accuracy against key budget (mean patch keys per query, log scale) per window method, with the
    unrestricted model as a dashed line (from :func:`~vitscope.analysis.windows.window_curve`)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 3.6), layout="constrained")
    ax = fig.subplots()
    for method, g in curve[curve["method"] != "full"].groupby("method", sort=False):
        g = g.sort_values("keys_per_query")
        ax.plot(g["keys_per_query"], g["accuracy"], "o-", label=method)
    full = curve[curve["method"] == "full"]
    if len(full):
        ax.axhline(float(full["accuracy"].iloc[0]), color="k", ls="--", lw=1, label="full attention")
    ax.set_xscale("log")
    ax.set_xlabel("mean patch keys per query")
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=8)
    return fig


def plot_removal_curve(curve: pd.DataFrame) -> "Figure":
    """Accuracy against the share of patch tokens removed, per ranking; random seeds are drawn as a
    mean line with a min-max band (from :func:`~vitscope.analysis.windows.removal_curve`)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 3.6), layout="constrained")
    ax = fig.subplots()
    for method, g in curve.groupby("method", sort=False):
        agg = g.groupby("rate")["accuracy"].agg(["mean", "min", "max"]).reset_index()
        (line,) = ax.plot(100 * agg["rate"], agg["mean"], "o-", label=method)
        if g["seed"].nunique() > 1:
            ax.fill_between(100 * agg["rate"], agg["min"], agg["max"], color=line.get_color(), alpha=0.2)
    ax.set_xlabel("patch tokens removed (%)")
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=8)
    return fig

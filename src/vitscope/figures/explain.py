"""Explanation figures: maps over their images (a grid of images by methods), the faithfulness
AUCs of a run's ``explain_faithfulness`` table, and the cascading-randomisation sanity check."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
    from matplotlib.figure import Figure


def plot_explanations(
    maps: Mapping[str, np.ndarray],
    images: Sequence[Optional[Any]],
    titles: Sequence[str],
    *,
    alpha: float = 0.55,
) -> "Figure":
    """``maps[method]`` ``(N, rows, cols)`` drawn over ``images`` (PIL images or None) for N images.

    Each map is scaled to its own [min, max] (the methods' units differ; the faithfulness tests
    read only the order of patches) and shown with a colour bar of that relative scale.
    """
    from matplotlib.figure import Figure

    methods = list(maps)
    n = len(images)
    fig = Figure(figsize=(1.9 * len(methods) + 0.8, 1.9 * n + 0.4), layout="constrained")
    axes = np.atleast_2d(fig.subplots(n, len(methods), squeeze=False))
    mappable = None
    for i in range(n):
        for j, method in enumerate(methods):
            ax = axes[i, j]
            m = np.asarray(maps[method][i], dtype=float)
            rows, cols = m.shape
            lo, hi = np.nanmin(m), np.nanmax(m)
            rel = (m - lo) / (hi - lo) if hi > lo else np.zeros_like(m)
            extent = (-0.5, cols - 0.5, rows - 0.5, -0.5)
            if images[i] is not None:
                ax.imshow(np.asarray(images[i].convert("RGB").resize((cols * 16, rows * 16))), extent=extent)
            mappable = ax.imshow(rel, cmap="inferno", alpha=alpha if images[i] is not None else 1.0, vmin=0, vmax=1,
                                 extent=extent, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(method.replace("_", " "), fontsize=9)
            if j == 0:
                ax.set_ylabel(titles[i], fontsize=8)
            if i == n - 1:
                ax.set_xlabel("patch column", fontsize=7)
    if mappable is not None:
        cb = fig.colorbar(mappable, ax=axes, shrink=0.6)
        cb.set_label("relevance (min-max per map)")
    return fig


#: The faithfulness figure's panels: title, metrics (columns of the ``explain_faithfulness`` table).
FAITHFULNESS_PANELS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("target probability AUC (x100)", ("tokens_pos_prob", "tokens_neg_prob", "pixels_pos_prob", "pixels_neg_prob")),
    ("top-1 accuracy AUC (x100)", ("tokens_pos_acc", "tokens_neg_acc", "pixels_pos_acc", "pixels_neg_acc")),
    ("insertion / deletion AUC", ("insertion", "deletion")),
)
_SHORT = {
    "tokens_pos_prob": "tokens\nmost first ↓", "tokens_neg_prob": "tokens\nleast first ↑",
    "pixels_pos_prob": "pixels\nmost first ↓", "pixels_neg_prob": "pixels\nleast first ↑",
    "tokens_pos_acc": "tokens\nmost first ↓", "tokens_neg_acc": "tokens\nleast first ↑",
    "pixels_pos_acc": "pixels\nmost first ↓", "pixels_neg_acc": "pixels\nleast first ↑",
    "insertion": "insertion ↑", "deletion": "deletion ↓",
}


def plot_faithfulness(table: "pd.DataFrame") -> "Figure":
    """Mean AUC of every method (bars, +- standard error over images) for each faithfulness measure
    of an ``explain_faithfulness`` table (one row per image and method; see
    :mod:`vitscope.analysis.faithfulness`). Arrows say which direction is better; measures the
    table holds no values for (e.g. ``tokens`` on a model that cannot drop tokens) are left out."""
    from matplotlib.figure import Figure

    from vitscope.analysis.faithfulness import faithfulness_summary

    summary = faithfulness_summary(table)
    methods = list(summary["method"])
    panels = [(title, [k for k in keys if np.isfinite(summary[f"{k}_mean"]).any()]) for title, keys in FAITHFULNESS_PANELS]
    panels = [(t, k) for t, k in panels if k]
    widths = [max(1, len(k)) for _, k in panels]
    fig = Figure(figsize=(3.0 + 1.5 * sum(widths), 3.6), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(panels), squeeze=False, gridspec_kw={"width_ratios": widths})).reshape(-1)
    width = 0.8 / max(1, len(methods))
    for ax, (title, keys) in zip(axes, panels):
        pos = np.arange(len(keys))
        for i, method in enumerate(methods):
            row = summary.iloc[i]
            mean = np.array([row[f"{k}_mean"] for k in keys], dtype=float)
            sem = np.array([row[f"{k}_sem"] for k in keys], dtype=float)
            ax.bar(pos + (i - (len(methods) - 1) / 2) * width, mean, width, yerr=np.nan_to_num(sem), capsize=2,
                   label=method.replace("_", " "))
        ax.set_xticks(pos, [_SHORT[k] for k in keys], fontsize=7)
        ax.set_title(title, fontsize=9)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="outside right upper")  # outside: bars of any height stay visible
    n = int(summary["n"].max()) if len(summary) else 0
    fig.suptitle(f"Faithfulness of the explanations ({n} images; bars +- s.e.)", fontsize=10)
    return fig


def plot_randomisation(summary: "pd.DataFrame", *, column: str = "spearman", title: Optional[str] = None) -> "Figure":
    """Cascading randomisation (Adebayo et al. 2018): similarity of each method's map to the trained
    model's map against the number of top blocks re-drawn, one line per method with a +- s.e. band
    (``summary`` from :func:`vitscope.analysis.faithfulness.randomisation_summary`). The x axis is
    labelled with the lowest re-drawn layer too, so "3" reads "blocks 9..11 random" in a 12-layer
    model."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.0, 3.8), layout="constrained")
    ax = fig.subplots()
    for method, g in summary.groupby("method", sort=False):
        g = g.sort_values("randomised")
        mean = g[f"{column}_mean"].to_numpy(dtype=float)
        sem = np.nan_to_num(g[f"{column}_sem"].to_numpy(dtype=float))
        (line,) = ax.plot(g["randomised"], mean, "o-", ms=3, label=str(method).replace("_", " "))
        ax.fill_between(g["randomised"], mean - sem, mean + sem, color=line.get_color(), alpha=0.15)
    ks = sorted(summary["randomised"].unique())
    top = int(summary["lowest_layer"].max()) if len(summary) else 0
    ax.set_xticks(ks, [f"{k}\n({'none' if k == 0 else f'{top - k}+'})" for k in ks], fontsize=7)
    ax.set_xlabel("blocks re-drawn from the top (lowest random layer)")
    label = "Spearman correlation" + (" of |map|" if column == "spearman_abs" else "")
    ax.set_ylabel(f"{label} with the trained map")
    ax.axhline(0.0, color="grey", lw=0.6, ls="--")
    ax.set_ylim(-1.0, 1.05)
    ax.legend(fontsize=8, loc="lower left")
    if title:
        ax.set_title(title, fontsize=9)
    return fig

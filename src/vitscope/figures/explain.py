"""Explanation maps over their images: a grid of images (rows) by methods (columns)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
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

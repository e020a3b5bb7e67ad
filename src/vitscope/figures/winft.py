"""WinfT mask figures: which keys each layer's mask lets a few query patches see, and the mean key
budget per layer (for a WinfT, a :class:`vitscope.ViT` wrapping one, a mask or weights file, or a
``(L, T, T)`` tensor)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import nn

from vitscope.core.layout import TokenLayout
from vitscope.figures.save import save_figure
from vitscope.models.winft import WinfT, WinfTMaskError, mask_stats, read_mask_file


def masks_and_layout(source: Any, layout: Optional[TokenLayout] = None) -> tuple[torch.Tensor, TokenLayout]:
    """``(masks (L, T, T), layout)`` from a WinfT, a :class:`vitscope.ViT` wrapping one, a mask or weights
    file, or a tensor (then ``layout`` is needed unless the grid is square with one CLS token)."""
    module = getattr(source, "module", source)
    if isinstance(module, WinfT):
        return module.allowed_masks().cpu(), layout or module.token_layout
    if isinstance(module, nn.Module):
        raise WinfTMaskError(f"{type(module).__name__} is not a WinfT; it has no attention masks to draw")
    meta: dict[str, Any] = {}
    if isinstance(source, (str, Path)):
        masks, meta = read_mask_file(source)
    else:
        masks = torch.as_tensor(np.asarray(source) if isinstance(source, (list, tuple)) else source)
    masks = masks.bool().cpu()
    if layout is None:
        if "grid" in meta:
            cls = meta.get("cls_index", 0 if meta["num_prefix"] else None)
            pre = int(meta["num_prefix"])
            layout = TokenLayout(pre, cls, None, tuple(range(1 if cls is not None else 0, pre)), tuple(meta["grid"]),
                                 tuple(meta.get("patch_size", (1, 1))))  # fmt: skip
        else:
            T = masks.shape[-1]
            g = int(round((T - 1) ** 0.5))
            if g * g != T - 1:
                raise WinfTMaskError(f"cannot tell the patch grid of {T}-token masks; pass layout=vit.layout")
            layout = TokenLayout(1, 0, None, (), (g, g), (1, 1))
    if masks.ndim != 3 or masks.shape[-1] != layout.num_tokens:
        raise WinfTMaskError(f"masks of shape {tuple(masks.shape)} do not fit {layout.describe()}")
    return masks, layout


def default_queries(layout: TokenLayout) -> list[int]:
    """A corner, an edge, an off-centre and the centre patch (patch indices, row-major)."""
    rows, cols = layout.grid
    picks = [(0, 0), (0, cols // 2), (rows // 4, cols // 4), (rows // 2, cols // 2), (rows - 1, cols - 1)]
    out: list[int] = []
    for r, c in picks:
        idx = r * cols + c
        if idx not in out:
            out.append(idx)
    return out


def plot_winft_masks(masks: torch.Tensor, layout: TokenLayout, queries: Optional[Sequence[int]] = None):
    """One row per layer: for each query patch (red outline) the keys it may attend to (dark), then the
    number of allowed patch keys of every query patch on the grid. Returns a matplotlib ``Figure``."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    m = torch.as_tensor(masks).bool().cpu()
    queries = list(queries) if queries is not None else default_queries(layout)
    L, (R, C) = m.shape[0], layout.grid
    P, ps = layout.num_patches, layout.patch_slice
    block = m[:, ps, ps].numpy()
    counts = block.sum(-1).reshape(L, R, C)
    ncols = len(queries) + 1
    fig = Figure(figsize=(1.7 * ncols + 0.6, 1.7 * L + 0.5), layout="constrained")
    axes = np.atleast_2d(fig.subplots(L, ncols, squeeze=False))
    for l in range(L):
        for c, q in enumerate(queries):
            ax = axes[l, c]
            ax.imshow(block[l, q].reshape(R, C), cmap="Greys", vmin=-0.3, vmax=1.0, interpolation="nearest")
            qr, qc = divmod(int(q), C)
            ax.add_patch(Rectangle((qc - 0.5, qr - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=1.5))
            ax.set_xticks([])
            ax.set_yticks([])
            if l == 0:
                ax.set_title(f"query ({qr}, {qc})", fontsize=8)
            if c == 0:
                ax.set_ylabel(f"layer {l}\n{block[l].sum(-1).mean():.1f} keys/query", fontsize=8)
        ax = axes[l, -1]
        im = ax.imshow(counts[l], cmap="viridis", vmin=0, vmax=P, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        if l == 0:
            ax.set_title("keys per query", fontsize=8)
    fig.colorbar(im, ax=axes[:, -1], shrink=0.6, label="allowed patch keys")
    fig.suptitle("Allowed keys per layer (CLS is always global)", fontsize=10)
    return fig


def plot_mask_budget(masks: torch.Tensor, layout: TokenLayout):
    """Mean number of allowed patch keys per patch query, per layer, against the full grid. Returns a ``Figure``."""
    from matplotlib.figure import Figure

    st = mask_stats(masks, layout)
    per_layer = st["keys_per_query_by_layer"]
    fig = Figure(figsize=(4.8, 3.0), layout="constrained")
    ax = fig.subplots()
    ax.bar(range(len(per_layer)), per_layer, color="tab:blue")
    ax.axhline(layout.num_patches, color="grey", linestyle="--", linewidth=1, label=f"global ({layout.num_patches} patches)")
    ax.axhline(st["keys_per_query"], color="tab:orange", linewidth=1, label=f"mean {st['keys_per_query']:.1f} (sparsity {st['sparsity']:.0%})")
    ax.set_xlabel("layer")
    ax.set_ylabel("allowed patch keys per patch query")
    ax.set_xticks(range(len(per_layer)))
    ax.legend(fontsize=8)
    return fig


def draw_winft_masks(model_or_masks: Any, out_dir: Union[str, Path], *, layout: Optional[TokenLayout] = None,
                     queries: Optional[Sequence[int]] = None) -> list[Path]:  # fmt: skip
    """Write ``winft_masks.{png,svg}`` (allowed keys of a few query patches, per layer) and
    ``winft_mask_budget.{png,svg}`` (mean field size per layer) into ``out_dir``; returns the PNG paths.

    ``model_or_masks``: a WinfT, a :class:`vitscope.ViT` wrapping one, a mask or WinfT weights file,
    or a ``(L, T, T)`` tensor.
    """
    masks, layout = masks_and_layout(model_or_masks, layout)
    out = Path(out_dir)
    written = []
    for stem, fig in (("winft_masks", plot_winft_masks(masks, layout, queries)), ("winft_mask_budget", plot_mask_budget(masks, layout))):
        written.append(save_figure(fig, out, stem)[0])
    return written

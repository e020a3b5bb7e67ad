"""The first paper's figures of a run: head importance, metric agreement, pruning curves, attention
strength (entropy, hop profiles, mean distance), the pattern embedding and prototypes, and the
image overview.

Each ``fig_*`` function draws from a :class:`~vitscope.store.Run` alone and returns a matplotlib
``Figure`` (object API: no GUI backend, pyplot's global state left alone).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from vitscope.analysis.metrics import metric_label, ranking_metrics

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

    from vitscope.store import Run


# ------------------------------------------------------------------ helpers
def _new_figure(width: float, height: float) -> "Figure":
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _metrics(heads: pd.DataFrame) -> list[str]:
    """The registered head-ranking metrics the run has, in registration order."""
    return [m for m in ranking_metrics() if m in heads.columns]


def _matrix(heads: pd.DataFrame, column: str, L: int, H: int) -> np.ndarray:
    out = np.full((L, H), np.nan)
    out[heads["layer"].to_numpy(), heads["head"].to_numpy()] = heads[column].to_numpy(dtype=float)
    return out


def _layer_colors(L: int) -> Any:
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    return [cmap(i / max(1, L - 1)) for i in range(L)]


# ------------------------------------------------------------------ figures
def fig_importance(run: "Run", metric: str) -> "Figure":
    """Heatmap (layer x head) of one importance metric, and every head with its 95% interval."""
    heads = run.heads.sort_values(["layer", "head"])
    L, H = run.num_layers, run.num_heads
    label = metric_label(metric)
    fig = _new_figure(11, 4.2)
    ax_map, ax_ci = fig.subplots(1, 2, width_ratios=[1, 2.2])
    mat = _matrix(heads, metric, L, H)
    im = ax_map.imshow(mat, aspect="auto", cmap="magma", origin="upper")
    ax_map.set_xlabel("head")
    ax_map.set_ylabel("layer")
    ax_map.set_xticks(range(H))
    ax_map.set_yticks(range(L))
    ax_map.set_title(f"{label} (mean over images)")
    fig.colorbar(im, ax=ax_map, label=label)
    if L * H <= 48:
        for (l, h), v in np.ndenumerate(mat):
            if np.isfinite(v):
                ax_map.text(h, l, f"{v:.2g}", ha="center", va="center", fontsize=7, color="white" if v < np.nanmax(mat) * 0.6 else "black")

    idx = (heads["layer"] * H + heads["head"]).to_numpy()
    mean = heads[metric].to_numpy(dtype=float)
    lo_col, hi_col = f"{metric}_lo", f"{metric}_hi"
    colors = _layer_colors(L)
    if lo_col in heads and hi_col in heads:
        lo = heads[lo_col].to_numpy(dtype=float)
        hi = heads[hi_col].to_numpy(dtype=float)
        err = np.vstack([np.clip(mean - lo, 0, None), np.clip(hi - mean, 0, None)])
        ax_ci.errorbar(idx, mean, yerr=err, fmt="none", ecolor="0.55", elinewidth=1, capsize=1.5, label="95% bootstrap interval")
    for l in range(L):
        sel = heads["layer"].to_numpy() == l
        ax_ci.scatter(idx[sel], mean[sel], s=14, color=colors[l], zorder=3, label=f"layer {l}" if L <= 12 else None)
    ax_ci.axhline(0, color="0.7", lw=0.8)
    ax_ci.set_xlabel(f"head index (layer x {H} + head)")
    ax_ci.set_ylabel(label)
    ax_ci.set_title(f"{label} per head, {int(heads['n_images'].iloc[0]) if 'n_images' in heads else '?'} images")
    ax_ci.legend(fontsize=7, ncol=2 if L > 6 else 1, loc="best")
    return fig


def fig_agreement(run: "Run") -> "Figure":
    """Spearman rank correlation between every pair of importance metrics."""
    ag = run.agreement
    metrics = list(dict.fromkeys([*ag["metric_a"], *ag["metric_b"]]))
    n = len(metrics)
    mat = np.eye(n)
    pos = {m: i for i, m in enumerate(metrics)}
    for r in ag.itertuples():
        mat[pos[r.metric_a], pos[r.metric_b]] = mat[pos[r.metric_b], pos[r.metric_a]] = r.spearman
    fig = _new_figure(5.6, 4.8)
    ax = fig.subplots()
    im = ax.imshow(mat, vmin=-1, vmax=1, cmap="RdBu_r")
    names = [metric_label(m) for m in metrics]
    ax.set_xticks(range(n), names, rotation=35, ha="right", fontsize=8)
    ax.set_yticks(range(n), names, fontsize=8)
    ax.set_xlabel("metric")
    ax.set_ylabel("metric")
    for (i, j), v in np.ndenumerate(mat):
        ax.text(j, i, "—" if not np.isfinite(v) else f"{v:.2f}", ha="center", va="center", fontsize=8)
    fig.colorbar(im, ax=ax, label="Spearman rank correlation")
    ax.set_title("Do the importance metrics rank heads alike?")
    return fig


def fig_curves(run: "Run") -> "Figure":
    """Accuracy as the most important heads (by each metric) are pruned together."""
    cv = run.curves
    if "ranking" not in cv:  # a run from before held-out curves
        cv = cv.assign(ranking="in_sample")
    held = (cv["ranking"] == "held_out").any()
    # Runs under the embedding objective measure how far pruning moves the embedding instead.
    by_embedding = "mean_embedding_change" in cv and cv["accuracy"].isna().all()
    y = "mean_embedding_change" if by_embedding else "accuracy"
    cv = cv.assign(accuracy=cv[y])
    fig = _new_figure(6.4, 4.4)
    ax = fig.subplots()
    colours = {}
    # Held-out curves (heads ranked on other images) are the result; in-sample ones (ranked on the
    # measured images themselves) are drawn thin and dotted, for comparison only.
    for (ranking, metric), g in cv.groupby(["ranking", "metric"], sort=False):
        g = g.sort_values("k")
        label = metric_label(str(metric))
        if metric == "random":
            if ranking == "in_sample" and held:
                continue  # the same random order in both
            ax.plot(g["k"], g["accuracy"], ls="--", color="0.4", marker="o", ms=3.5, label=label)
        elif ranking == "held_out" or not held:
            (line,) = ax.plot(g["k"], g["accuracy"], marker="o", ms=3.5, label=label)
            colours[metric] = line.get_color()
        else:
            ax.plot(g["k"], g["accuracy"], ls=":", lw=1.0, color=colours.get(metric, "0.6"), label=f"{label} (in-sample)")
    n = int(cv["n_images"].iloc[0]) if "n_images" in cv and len(cv) else None
    ax.set_xlabel("heads pruned (most important first)")
    what = "mean embedding change (1 - cos)" if by_embedding else "accuracy"
    ax.set_ylabel(what + (f" ({n} held-out images)" if n and held else f" ({n} images)" if n else ""))
    ax.set_ylim(-0.02, 1.02 if not by_embedding else max(1e-6, float(np.nanmax(cv["accuracy"]))) * 1.05)
    ax.set_title("Cumulative pruning curves" + (" (heads ranked on other images)" if held else ""))
    ax.legend(title="order by", fontsize=8)
    ax.grid(alpha=0.3)
    return fig


def _strength_columns(heads: pd.DataFrame, measure: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return (
        heads[f"{measure}_mean"].to_numpy(dtype=float),
        heads[f"{measure}_q25"].to_numpy(dtype=float),
        heads[f"{measure}_q75"].to_numpy(dtype=float),
    )


def _strip_by_layer(run: "Run", measure: str, ylabel: str, title: str, reference: "tuple[float, str] | None" = None) -> "Figure":
    """One dot per head at its layer (heads side by side), its mean over images and interquartile
    range; ``reference`` = ``(value, label)`` draws a dashed horizontal line (before the limits are
    fixed, so the line is always in view)."""
    heads = run.heads
    L, H = run.num_layers, run.num_heads
    mean, q25, q75 = _strength_columns(heads, measure)
    layer = heads["layer"].to_numpy()
    jitter = (heads["head"].to_numpy() - (H - 1) / 2) / max(H, 1) * 0.5
    fig = _new_figure(7.5, 4.2)
    ax = fig.subplots()
    ax.vlines(layer + jitter, q25, q75, color="0.7", lw=1, label="interquartile range over images")
    ax.scatter(layer + jitter, mean, s=18, c=[_layer_colors(L)[l] for l in layer], zorder=3, label="head (mean over images)")
    if reference is not None:
        ax.axhline(reference[0], color="C3", ls="--", lw=1, label=reference[1])
    ax.set_xlabel("layer")
    ax.set_ylabel(ylabel)
    ax.set_xticks(range(L))
    ax.set_ylim(bottom=0)
    ax.set_title(title)
    ax.legend(fontsize=8, loc="lower right")
    return fig


def fig_entropy(run: "Run") -> "Figure":
    """Head entropy by layer (the paper's strip plot): low = local/self heads, ln G = distance-agnostic."""
    G = max(run.manifest["model"]["layout"]["grid"])
    return _strip_by_layer(run, "entropy", "hop-distance entropy (nats)", "Attention strength: entropy of every head by layer",
                           reference=(math.log(G), f"uniform over distance (ln {G} = {math.log(G):.2f})"))


def fig_hop_profiles(run: "Run") -> "Figure":
    """Mean attention at each hop distance, one panel per layer, one line per head."""
    heads = run.heads.sort_values(["layer", "head"])
    L, H = run.num_layers, run.num_heads
    cols = min(4, L)
    rows = math.ceil(L / cols)
    fig = _new_figure(3.0 * cols, 2.3 * rows)
    axes = np.atleast_1d(fig.subplots(rows, cols, sharex=True, sharey=True)).reshape(-1)
    from matplotlib import colormaps

    cmap = colormaps["tab20" if H > 10 else "tab10"]
    for l in range(L):
        ax = axes[l]
        for r in heads[heads["layer"] == l].itertuples():
            prof = np.asarray(r.hop_profile_mean, dtype=float)
            ax.plot(np.arange(len(prof)), prof, lw=1.1, color=cmap(int(r.head) % cmap.N), label=f"head {int(r.head)}")
        ax.set_yscale("log")
        ax.set_title(f"layer {l}", fontsize=9)
        ax.set_xlabel("hop distance (patches)", fontsize=8)
        ax.set_ylabel("mean attention", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in axes[L:]:
        ax.set_visible(False)
    axes[0].legend(fontsize=6, ncol=2 if H > 6 else 1)
    fig.suptitle("Hop profiles: mean attention per Chebyshev hop distance (patch tokens only)")
    return fig


def fig_mean_distance(run: "Run") -> "Figure":
    """Mean attention distance in pixels by layer (Dosovitskiy et al. 2021, Fig. 7)."""
    return _strip_by_layer(run, "mean_distance", "mean attention distance (pixels)", "How far each head looks")


def fig_pattern_embedding(run: "Run", kind: str) -> "Figure":
    """2-D embedding of every (image, head) attention map with density contours, coloured by layer."""
    cat = run.patterns[kind]
    maps = cat.maps
    L = run.num_layers
    fig = _new_figure(7.2, 5.8)
    ax = fig.subplots()
    xmin, xmax, ymin, ymax = cat.extent
    dens = np.asarray(cat.density, dtype=float)
    if dens.size and np.nanmax(dens) > 0:
        gx = np.linspace(xmin, xmax, dens.shape[1])
        gy = np.linspace(ymin, ymax, dens.shape[0])
        # Levels as fractions of the peak: automatic levels put a contour at ~0, which traces the grid's edge.
        ax.contour(gx, gy, dens, levels=np.nanmax(dens) * np.array([0.03, 0.1, 0.25, 0.45, 0.7, 0.9]), colors="0.45", linewidths=0.7)
    sc = ax.scatter(maps["x"], maps["y"], c=maps["layer"], cmap="viridis", vmin=0, vmax=max(1, L - 1), s=3, alpha=0.6, linewidths=0, rasterized=True)
    fig.colorbar(sc, ax=ax, label="layer")
    for r in cat.clusters.itertuples():
        ax.annotate(str(int(r.cluster)), (r.x, r.y), fontsize=9, weight="bold", ha="center", va="center",
                    bbox=dict(boxstyle="round,pad=0.15", fc="white", ec="0.3", alpha=0.8))
    from matplotlib.lines import Line2D

    handles = [
        Line2D([], [], color="0.45", lw=0.8, label="density"),
        Line2D([], [], marker="o", ls="", color="0.3", ms=4, label="(image, head) map"),
        Line2D([], [], marker="s", ls="", mfc="white", mec="0.3", ms=7, label="cluster number"),
    ]
    ax.legend(handles=handles, fontsize=8, loc="best")
    what = "patch-to-patch block" if kind == "patch" else "CLS row and column"
    ax.set_xlabel(f"{run.manifest['settings'].get('projection', 'projection')} 1")
    ax.set_ylabel(f"{run.manifest['settings'].get('projection', 'projection')} 2")
    ax.set_title(f"Attention patterns ({what}): autoencoder codes in 2-D")
    return fig


def fig_prototypes(run: "Run", kind: str) -> "Figure":
    """Decoded prototype of every pattern cluster, with its size and a descriptive name."""
    cat = run.patterns[kind]
    protos = np.asarray(cat.prototypes, dtype=float)
    if protos.ndim == 3:
        protos = protos[:, None]
    K, C = protos.shape[:2]
    per_row = (6 if C == 1 else 3) if K > 1 else 1
    cols = min(per_row, K)
    rows = max(1, math.ceil(K / cols))
    fig = _new_figure(2.0 * cols * C + 1.0, 2.35 * rows + 0.5)
    axes = np.asarray(fig.subplots(rows, cols * C, squeeze=False))
    clusters = cat.clusters.set_index("cluster")
    vmax = float(np.nanmax(protos)) if protos.size else 1.0
    im = None
    r_off = (protos.shape[-1] - 1) / 2
    # (title, x label, y label, imshow extent) of each input channel
    channel_info = {
        "offset": [("offset profile", "key column offset", "key row offset", (-r_off - 0.5, r_off + 0.5, r_off + 0.5, -r_off - 0.5)),
                   ("key map", "grid column", "grid row", None)],
        "patch": [("patch block (pooled)", "key patch", "query patch", None)],
        "cls": [("CLS → patch", "grid column", "grid row", None), ("patch → CLS", "grid column", "grid row", None)],
    }.get(cat.input, [(f"channel {c}", "x", "y", None) for c in range(C)])
    for k in range(rows * cols):
        r, c0 = divmod(k, cols)
        for c in range(C):
            ax = axes[r, c0 * C + c]
            if k >= K:
                ax.set_visible(False)
                continue
            title, xlabel, ylabel, extent = channel_info[c] if c < len(channel_info) else (f"channel {c}", "x", "y", None)
            im = ax.imshow(protos[k, c], cmap="viridis", vmin=0, vmax=vmax, extent=extent)
            if extent is None:
                ax.set_xticks([])
                ax.set_yticks([])
            else:
                ax.tick_params(labelsize=6)
            ax.set_xlabel(xlabel, fontsize=7)
            ax.set_ylabel(ylabel, fontsize=7)
            head = ""
            if c == 0 and k in clusters.index:
                row = clusters.loc[k]
                head = f"#{k} {row['name']}"[:34] + f"\n{int(row['size'])} maps ({100 * float(row['share']):.1f}%)\n"
            elif C > 1:
                head = "\n\n"
            ax.set_title(head + (title if C > 1 else ""), fontsize=7, loc="left")
    if im is not None:
        fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.6, label="attention (decoded prototype)")
    what = {"offset": "patch-to-patch attention by relative offset", "patch": "patch-to-patch block, pooled",
            "cls": "CLS row and column on the patch grid"}.get(cat.input, cat.input)
    fig.suptitle(f"Pattern clusters: decoded prototypes ({what})", fontsize=10)
    return fig


def fig_overview(run: "Run") -> "Figure":
    """Every image laid out by its vector of per-head pruned probabilities (embedding changes under
    the embedding objective): by class, and by probability (embedding norm)."""
    im = run.images
    has_label = im["label"].notna()
    by_embedding = "prediction" not in im  # the embedding objective: no classifier output
    fallback = np.full(len(im), -1) if by_embedding else im["prediction"].to_numpy()
    cls = np.where(has_label, im["label"].astype("Float64").fillna(-1).to_numpy(), fallback).astype(int)
    names: dict[int, str] = {}
    for col_id, col_name in (("label", "label_name"), ("prediction", "prediction_name")):
        if col_name in im:
            for a, b in zip(im[col_id], im[col_name]):
                if pd.notna(a) and isinstance(b, str):
                    names.setdefault(int(a), b)
    counts = pd.Series(cls).value_counts(sort=True)
    top = list(counts.index[:10]) if len(counts) > 12 else list(counts.index)
    fig = _new_figure(12.5, 5.2)
    ax, ax_p = fig.subplots(1, 2, width_ratios=[1.35, 1])
    from matplotlib import colormaps

    cmap = colormaps["tab10" if len(top) <= 10 else "tab20"]
    x, y = im["overview_x"].to_numpy(), im["overview_y"].to_numpy()
    other = ~np.isin(cls, top)
    if other.any():
        ax.scatter(x[other], y[other], s=9, color="0.75", label=f"other classes ({len(counts) - len(top)})", linewidths=0)
    for i, c in enumerate(top):
        sel = cls == c
        name = names.get(int(c), str(c))
        ax.scatter(x[sel], y[sel], s=12, color=cmap(i % cmap.N), label=f"{name[:28]} ({int(sel.sum())})", linewidths=0)
    source = "label" if has_label.all() else ("label, else prediction" if has_label.any() and not by_embedding else
                                               "label; -1 = none" if by_embedding else "prediction")  # fmt: skip
    ax.set_xlabel("overview 1")
    ax.set_ylabel("overview 2")
    response = "embedding changes" if by_embedding else "pruned probabilities"
    ax.set_title(f"Images by their per-head {response}: class")
    ax.legend(title=f"class ({source})", fontsize=7, title_fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
    if by_embedding:
        sc = ax_p.scatter(x, y, c=im["embedding_norm"], cmap="viridis", s=12, linewidths=0)
        fig.colorbar(sc, ax=ax_p, label="norm of the unpruned image embedding")
        ax_p.set_title("... and embedding norm")
    else:
        sc = ax_p.scatter(x, y, c=im["base_prob"], cmap="viridis", vmin=0, vmax=1, s=12, linewidths=0)
        fig.colorbar(sc, ax=ax_p, label=f"unpruned probability of the {source}")
        ax_p.set_title("... and probability")
    ax_p.set_xlabel("overview 1")
    ax_p.set_ylabel("overview 2")
    return fig

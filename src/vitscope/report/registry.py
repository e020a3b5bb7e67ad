"""The report's figure registry: every figure family registers a function that lists the figures a
run has data for, each with its file stem, title, caption and a draw function.

A new figure is one entry: draw it in the module of its family under :mod:`vitscope.figures`,
then add a :class:`ReportFigure` for it to the provider of its family here (or register a new
provider with :func:`report_figures`). ``write_report`` draws whatever the providers list, in
registration order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from vitscope.analysis.metrics import metric_label
from vitscope.figures import run as F

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

    from vitscope.store import Run


@dataclass(frozen=True)
class ReportFigure:
    """One figure of a report: ``<stem>.png`` drawn by ``draw()``, shown with ``title`` and ``caption``."""

    stem: str
    title: str
    caption: str
    draw: Callable[[], "Figure"]


#: Figure providers in report order: ``provider(run) -> [ReportFigure, ...]`` (only figures the run has data for).
PROVIDERS: list[Callable[["Run"], list[ReportFigure]]] = []


def report_figures(provider: Callable[["Run"], list[ReportFigure]]) -> Callable[["Run"], list[ReportFigure]]:
    """Register ``provider`` (a decorator); its figures follow those of the providers registered before it."""
    PROVIDERS.append(provider)
    return provider


def figure_plan(run: "Run") -> list[ReportFigure]:
    """Every figure of ``run``'s report, in order."""
    return [fig for provider in PROVIDERS for fig in provider(run)]


def run_layout(run: "Run") -> Any:
    """The model's token layout, rebuilt from the manifest (the figures need the patch grid)."""
    from vitscope.core.layout import TokenLayout

    return TokenLayout.from_dict(run.manifest["model"]["layout"])


# ------------------------------------------------------------------ the first paper
@report_figures
def head_figures(run: "Run") -> list[ReportFigure]:
    """Head importance per metric, metric agreement, pruning curves and attention strength."""
    heads = run.heads
    plan: list[ReportFigure] = []
    for m in F._metrics(heads):
        label = metric_label(m)
        plan.append(ReportFigure(
            f"importance_{m}",
            f"Head importance: {label}",
            f"Left: {label} of every head (mean over images), layer by head. Right: the same "
            "on the paper's head axis (layer x heads + head) with 95% percentile-bootstrap intervals over images.",
            lambda m=m: F.fig_importance(run, m),
        ))
    plan += [
        ReportFigure("agreement", "Metric agreement", "Spearman rank correlation between the head-level importance metrics.",
                     lambda: F.fig_agreement(run)),
        ReportFigure("pruning_curves", "Cumulative pruning", "Accuracy as heads are pruned together, most important first by "
                     "each metric (dashed: a random order). The faster a curve falls, the better its metric ranks heads.",
                     lambda: F.fig_curves(run)),
        ReportFigure("entropy_by_layer", "Attention strength: entropy", "Entropy of each head's hop-distance profile by layer. "
                     "Low values are local or self-attending heads; the dashed line is a head that ignores distance.",
                     lambda: F.fig_entropy(run)),
        ReportFigure("hop_profiles", "Attention strength: hop profiles", "Mean attention between patches at each Chebyshev "
                     "hop distance (log scale), averaged over images.", lambda: F.fig_hop_profiles(run)),
        ReportFigure("mean_distance", "Mean attention distance", "Attention-weighted distance between patch centres, in pixels.",
                     lambda: F.fig_mean_distance(run)),
    ]
    return plan


@report_figures
def pattern_figures(run: "Run") -> list[ReportFigure]:
    """The pattern catalogues (embedding and prototypes per map kind) and the image overview."""
    plan: list[ReportFigure] = []
    for kind in run.patterns:
        what = "patch-to-patch block" if kind == "patch" else "CLS row and column"
        plan.append(ReportFigure(f"patterns_{kind}", f"Attention patterns ({what})", "Every (image, head) attention map as a "
                                 "point: autoencoder latent codes projected to 2-D, coloured by layer, grey density contours, "
                                 "cluster numbers at cluster centres.", lambda kind=kind: F.fig_pattern_embedding(run, kind)))
        plan.append(ReportFigure(f"prototypes_{kind}", f"Pattern prototypes ({what})", "The decoded prototype of each cluster "
                                 "with its size and a generated name.", lambda kind=kind: F.fig_prototypes(run, kind)))
    plan.append(ReportFigure("image_overview", "Image overview", "Images placed by their vectors of per-head pruned "
                             "probabilities; colour is the class.", lambda: F.fig_overview(run)))
    return plan


# ------------------------------------------------------------------ the second paper
def _field_stats(run: "Run") -> dict[str, np.ndarray]:
    """Mean per-image field arrows and sizes ``(L, P)`` from the run's ``field_image_*`` arrays."""
    return {k: np.asarray(run.array(f"field_image_{k}")[...], dtype=float) for k in ("dx", "dy", "size")}


@report_figures
def interaction_figures(run: "Run") -> list[ReportFigure]:
    """Figures of a run analysed with ``--interactions`` (none otherwise), each only when its data exists."""
    from vitscope.figures import interaction as fi

    plan: list[ReportFigure] = []
    names = set(run.arrays())
    if {"field_image_dx", "field_image_dy", "field_image_size"} <= names:
        n = int(run.manifest.get("counts", {}).get("analysed") or 0)
        plan.append(ReportFigure("field_arrows", "Responsive fields: arrows", "For every query patch, an arrow towards the centroid of "
                     f"its responsive field (the keys carrying half of its positive first-order impact), averaged over {n} "
                     "images; colour is the mean field size, crosses mark empty fields. Arrows are scaled alike in all panels.",
                     lambda: fi.plot_field_arrows(_field_stats(run), run_layout(run))))
        plan.append(ReportFigure("field_flow", "Responsive fields: flow colours", "The same mean arrows as colours: hue is the direction, "
                     "saturation the length (key at the end); grey = empty field.",
                     lambda: fi.plot_flow_colours(_field_stats(run), run_layout(run))))
    if run.has_table("field_image_layers"):
        plan.append(ReportFigure("field_growth", "Responsive fields by layer", "Per layer: field size, distances (extent, spread, arrow "
                     "length, in patches) and direction (coherence of the arrows, lean towards the image centre), from "
                     "per-image fields.", lambda: fi.plot_field_growth(run.table("field_image_layers"))))
    if run.has_table("window_curve"):
        plan.append(ReportFigure("window_curve", "Window design", "Accuracy when every layer's attention is restricted to a key budget: "
                     "square windows, and keys ranked by mean first-order impact measured on other images (per layer, "
                     "or pooled over layers). Dashed: unrestricted attention.", lambda: fi.plot_window_curve(run.table("window_curve"))))
    if run.has_table("removal_curve"):
        plan.append(ReportFigure("removal_curve", "Patch-token removal", "Accuracy as the lowest-ranked patch tokens are dropped after "
                     "embedding: ranked by each image's first-order key importance, by the importance averaged over other "
                     "images, by CLS attention, and at random (band: min-max over seeds).",
                     lambda: fi.plot_removal_curve(run.table("removal_curve"))))
    if run.has_table("interaction_agreement"):
        from vitscope.analysis.interaction_tables import agreement_summary

        plan.append(ReportFigure("interaction_agreement", "First-order estimate vs knock-out", "Spearman correlation, per layer, between "
                     "the first-order impacts of a query's edges and the exact loss change of knocking each edge out "
                     "(mean +- s.e. over images and sampled queries).",
                     lambda: fi.plot_agreement(agreement_summary(run.table("interaction_agreement")))))
    return plan


@report_figures
def winft_figures(run: "Run") -> list[ReportFigure]:
    """When the analysed model has attention masks (a WinfT; the run stores ``winft_masks``), draw them."""
    if "winft_masks" not in run.arrays():
        return []
    from vitscope.core.grid import allowed_from_keys
    from vitscope.figures.winft import plot_mask_budget, plot_winft_masks

    def masks() -> Any:
        return allowed_from_keys(np.asarray(run.array("winft_masks")[...], dtype=bool), run_layout(run))

    return [
        ReportFigure("winft_masks", "WinfT attention masks", "Allowed keys (from the reference model's responsive fields) of a "
                     "few query patches, per layer; CLS attends and is attended globally.",
                     lambda: plot_winft_masks(masks(), run_layout(run))),
        ReportFigure("winft_mask_budget", "WinfT key budget by layer", "Mean number of patch keys each query may attend to, "
                     "per layer.", lambda: plot_mask_budget(masks(), run_layout(run))),
    ]


@report_figures
def explanation_figures(run: "Run") -> list[ReportFigure]:
    """A run analysed with ``--explain``: the first images' maps of every stored method, and (with
    ``--explain-faithfulness``) the methods' faithfulness AUCs."""
    methods = [name.split("/", 1)[1] for name in run.arrays() if name.startswith("explain/")]
    if not methods:
        return []
    plan: list[ReportFigure] = []

    def draw() -> "Figure":
        from pathlib import Path

        from vitscope.data import ImageError, ImageRecord
        from vitscope.data.containers import open_record
        from vitscope.figures.explain import plot_explanations

        images = run.images.head(6)
        members = images["member"] if "member" in images else [None] * len(images)
        pictures: list[Any] = []
        for image_id, path, member in zip(images["image_id"], images["path"], members):
            try:  # a file, or an image inside a WebDataset shard / dataset file
                pictures.append(open_record(ImageRecord(int(image_id), Path(path), None, member if isinstance(member, str) else None)))
            except (ImageError, OSError):
                pictures.append(None)  # the image has moved: the maps are drawn alone
        maps = {m: np.asarray(run.array(f"explain/{m}")[: len(images)]) for m in methods}
        names = images["label_name"] if "label_name" in images else images["image_id"]
        titles = [f"{int(i)}: {n}" for i, n in zip(images["image_id"], names)]
        return plot_explanations(maps, pictures, titles)

    plan.append(ReportFigure("explanations", "Explanations", "Each method's map of the first images' target class over the "
                             "patch grid (scaled per map), over the image: " + ", ".join(methods) + ". See docs/explanations.md "
                             "for what each computes and how faithful each is.", draw))
    if run.has_table("explain_faithfulness"):
        from vitscope.store.layout import EXPLAIN_TABLES

        def draw_faithfulness() -> "Figure":
            from vitscope.figures.explain import plot_faithfulness

            return plot_faithfulness(run.table(EXPLAIN_TABLES[0]))

        plan.append(ReportFigure("explain_faithfulness", "Explanations: faithfulness", "Mean area under each perturbation "
                                 "curve over the images (bars: +- standard error), from the run's explain_faithfulness table: "
                                 "patches removed most relevant first (lower is better) or least relevant first (higher is "
                                 "better), as dropped tokens or mean-filled pixels; accuracy against the target and the "
                                 "target's probability; and insertion into a blurred copy (higher is better) and deletion "
                                 "(lower is better). A method must beat random to be faithful.", draw_faithfulness))
    return plan

"""Tables that summarise patch interactions (pandas only, no torch: the report and the server read
them): per-layer edge statistics and the estimate-vs-knock-out agreement summary."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

if TYPE_CHECKING:  # pragma: no cover
    from vitscope.core.layout import TokenLayout


def agreement_summary(agreement: pd.DataFrame, by_kind: bool = True) -> pd.DataFrame:
    """Per layer (and per ``query_kind`` when ``by_kind``): mean, median and standard error of the
    Spearman correlations of :func:`knockout_agreement`, plus mean Pearson, top-10 overlap and sign
    agreement, and the number of (image, query) pairs. NaN correlations (constant exact impacts)
    are left out of the means."""
    if agreement.empty:
        raise ValueError("agreement has no rows")
    keys = ["layer", "query_kind"] if by_kind and "query_kind" in agreement.columns else ["layer"]
    g = agreement.groupby(keys)
    out = pd.DataFrame(
        {
            "spearman_mean": g["spearman"].mean(),
            "spearman_median": g["spearman"].median(),
            "spearman_sem": g["spearman"].sem(),
            "pearson_mean": g["pearson"].mean(),
            "top10_overlap": g["top10_overlap"].mean(),
            "sign_agreement": g["sign_agreement"].mean(),
            "n_pairs": g.size(),
            "n_defined": g["spearman"].count(),
        }
    )
    return out.reset_index()


def interaction_layer_table(summary: Mapping[str, np.ndarray], layout: "TokenLayout") -> pd.DataFrame:
    """One row per layer describing its patch edges.

    Columns: ``layer``, ``n_images``, ``n_edges``, ``n_significant`` (significantly positive),
    ``frac_significant``, ``n_significant_all`` (significant under BH over every layer at once; -1
    when ``summary`` lacks it), ``n_zero_spread`` (edges that did not vary over the images),
    ``mean_impact`` (over all edges), ``mean_abs_impact`` (mean over edges of
    the mean absolute impact; needs ``abs_mean`` in ``summary``, NaN otherwise),
    ``self_impact`` (mean over the ``i -> i`` edges), ``max_impact``, ``significant_distance``
    (mean Euclidean distance in patches of the significant edges; NaN if none) and
    ``impact_distance`` (positive-impact-weighted mean distance of all edges).
    """
    mean = np.asarray(summary["mean"])
    sig = np.asarray(summary["significant"], dtype=bool)
    pos = layout.patch_grid().astype(np.float64)
    dist = np.sqrt(((pos[:, None, :] - pos[None, :, :]) ** 2).sum(-1))
    rows = []
    for l in range(mean.shape[0]):
        m, s = mean[l], sig[l]
        w = np.clip(m, 0, None)
        rows.append(
            {
                "layer": l,
                "n_images": int(np.asarray(summary["n"])),
                "n_edges": m.size,
                "n_significant": int(s.sum()),
                "frac_significant": float(s.mean()),
                "n_significant_all": int(np.asarray(summary["significant_all"], dtype=bool)[l].sum()) if "significant_all" in summary else -1,
                "n_zero_spread": int(np.asarray(summary["zero_spread"], dtype=bool)[l].sum()) if "zero_spread" in summary else -1,
                "mean_impact": float(m.mean()),
                "mean_abs_impact": float(np.asarray(summary["abs_mean"])[l].mean()) if "abs_mean" in summary else np.nan,
                "self_impact": float(np.diagonal(m).mean()),
                "max_impact": float(m.max()),
                "significant_distance": float(dist[s].mean()) if s.any() else np.nan,
                "impact_distance": float((w * dist).sum() / w.sum()) if w.sum() > 0 else np.nan,
            }
        )
    return pd.DataFrame(rows)

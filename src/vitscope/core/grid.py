"""Patch-grid geometry every layer shares: windows of keys around a query, key sets as full attention
masks, and the top keys of a score. Pure numpy on a :class:`~vitscope.core.layout.TokenLayout`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from vitscope.core.layout import TokenLayout


def window_sizes(layout: "TokenLayout") -> list[int]:
    """Odd window sides ``1, 3, ..., 2 * max(grid) - 1``; the last one lets every query see the whole grid."""
    return list(range(1, 2 * max(layout.grid), 2))


def window_keys(layout: "TokenLayout", k: int) -> np.ndarray:
    """Boolean ``(P, P)``: key patch ``j`` lies in the ``k x k`` window centred on query patch ``i``.

    ``k`` must be odd (the window is centred on the query); the window is clipped at the grid
    border, so border queries get fewer keys.
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1 or k % 2 == 0:
        raise ValueError(f"window side k must be an odd positive integer (1, 3, 5, ...), got {k!r}")
    pos = layout.patch_grid()
    cheb = np.abs(pos[:, None, :] - pos[None, :, :]).max(-1)
    return cheb <= (int(k) - 1) // 2


def allowed_from_keys(keys: Any, layout: "TokenLayout") -> np.ndarray:
    """Patch-block key sets ``(..., P, P)`` -> full ``(..., T, T)`` allowed masks.

    Prefix rows (CLS etc.) may attend to every token and every query may attend to the prefix
    tokens; inside the patch block ``keys`` decides. Every row keeps at least one key.
    """
    keys = np.asarray(keys, dtype=bool)
    P, pre, T = layout.num_patches, layout.num_prefix, layout.num_tokens
    if keys.shape[-2:] != (P, P):
        raise ValueError(f"keys must end in ({P}, {P}) for this model's {P} patches, got {keys.shape}")
    out = np.ones(keys.shape[:-2] + (T, T), dtype=bool)
    out[..., pre:, pre:] = keys
    if pre == 0 and not keys.any(axis=-1).all():
        raise ValueError("every query needs at least one allowed key; this model has no prefix token to fall back on")
    return out


def window_mask(layout: "TokenLayout", k: int) -> np.ndarray:
    """Allowed ``(T, T)`` mask of the ``k x k`` window (prefix rows and columns always allowed)."""
    return allowed_from_keys(window_keys(layout, k), layout)


def top_keys(score: Any, counts: Any) -> np.ndarray:
    """Per query row, the ``counts[i]`` keys with the highest ``score`` (ties: lower key index first).

    ``score`` is ``(..., P, P)`` (query rows, key columns) and ``counts`` broadcastable to
    ``(..., P)``. Returns a boolean array shaped like ``score``.
    """
    score = np.asarray(score, dtype=np.float64)
    P = score.shape[-1]
    counts = np.broadcast_to(np.asarray(counts, dtype=np.int64), score.shape[:-1])
    if (counts < 0).any() or (counts > P).any():
        raise ValueError(f"counts must lie in 0..{P}")
    order = np.argsort(-score, axis=-1, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(P), axis=-1)
    return rank < counts[..., None]


def matching_window(layout: "TokenLayout", keys_per_query: float) -> tuple[int, float]:
    """The odd window side ``k`` whose mean patch keys per patch query is nearest ``keys_per_query``.

    Returns ``(k, its keys per query)``; border clipping is counted, so the budget is the real one.
    """
    best = min(((abs(float(window_keys(layout, k).sum(-1).mean()) - keys_per_query), k) for k in window_sizes(layout)))
    k = best[1]
    return k, float(window_keys(layout, k).sum(-1).mean())

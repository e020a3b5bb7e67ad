"""Attention strength: how much each head attends to patches at each spatial distance.

Definitions (Li et al. 2023, "How Does Attention Work in Vision Transformers? A Visual Analytics
Attempt", section "attention strength"):

- Only the patch -> patch block of a head's post-softmax attention ``A`` is used (CLS, distillation
  and register tokens are excluded).
- The hop distance between patches ``i`` and ``j`` is the Chebyshev distance on the patch grid,
  ``d(i, j) = max(|row_i - row_j|, |col_i - col_j|)``, so ``0 .. max(rows, cols) - 1``.
- The strength at hop ``n`` is the *mean* of ``A[i, j]`` over all patch pairs with ``d(i, j) = n``
  (a mean, not a sum, so a uniform head gives ``1/T`` in every bin).
- The head entropy is ``E = -sum_n p_n ln p_n`` with ``p_n = S_n / sum_m S_m`` and ``0 ln 0 = 0``;
  it lies in ``[0, ln G]`` where ``G`` is the number of hop bins. Low entropy = a local/self head,
  ``ln G`` = a distance-agnostic head.

Added measures:

- ``mean_distance``: the "mean attention distance" of Dosovitskiy et al. 2021 (ViT paper, Fig. 7)
  and Raghu et al. 2021, in pixels. For each patch query ``i`` it is
  ``sum_j A[i, j] * dist(i, j) / sum_j A[i, j]`` over patch keys ``j``, where ``dist`` is the Euclidean
  distance between patch centres in pixels; the result is averaged over patch queries. The
  division by the row's patch mass makes the value a distance (it does not shrink when a head sends
  most of its mass to CLS); :func:`mean_attention_distance` with ``normalize=False`` gives the
  unnormalised variant used by some public notebooks, which mixes distance with CLS mass. Queries
  whose patch mass is exactly 0 (a pruned head) are skipped; the value is NaN if all are.
- ``cls_self`` = ``A[cls, cls]``, ``cls_to_patch`` = ``sum_j A[cls, patch j]`` and ``patch_to_cls`` =
  mean over patch queries of ``A[i, cls]``; NaN for models without a CLS token.

All functions take one layer's attention ``(B, H, T, T)`` (a torch tensor on any device, or a numpy
array) and return numpy arrays, so a driver can call them batch by batch from
``ViT.stream(x, on_attention=...)``.
"""

from __future__ import annotations

import functools
import math
from typing import Optional, Sequence, Union

import numpy as np
import pandas as pd
import torch

from vitscope.core.layout import TokenLayout

ArrayLike = Union[torch.Tensor, np.ndarray]

#: Per-head scalar measures returned by :func:`attention_strength` (besides ``hop_profile``).
SCALAR_MEASURES: tuple[str, ...] = ("entropy", "mean_distance", "cls_self", "cls_to_patch", "patch_to_cls")


# ---------------------------------------------------------------------------------------- geometry
def hop_distance_matrix(layout: TokenLayout) -> torch.Tensor:
    """Chebyshev hop distance ``max(|drow|, |dcol|)`` between every pair of patch tokens, ``(P, P)`` long.

    Patch tokens only, in sequence order (row-major over ``layout.grid``); prefix tokens are not
    included, so entry ``[i, j]`` belongs to tokens ``num_prefix + i`` and ``num_prefix + j``.
    """
    pos = layout.patch_positions()
    diff = (pos[:, None, :] - pos[None, :, :]).abs()
    return diff.max(dim=-1).values


def num_hop_bins(layout: TokenLayout) -> int:
    """Number of hop bins ``G = max hop + 1 = max(rows, cols)`` (the grid side for square grids)."""
    return max(layout.grid)


def patch_center_distances(layout: TokenLayout) -> torch.Tensor:
    """Euclidean distance in pixels between the centres of every pair of patches, ``(P, P)`` float64."""
    pos = layout.patch_positions().to(torch.float64)
    scale = torch.tensor(layout.patch_size, dtype=torch.float64)
    xy = pos * scale  # centres share the same half-patch offset, which cancels in differences
    return torch.cdist(xy, xy)


@functools.lru_cache(maxsize=16)
def _geometry(layout: TokenLayout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flat hop index ``(P*P,)``, pair count per hop ``(G,)`` and pixel distances ``(P, P)`` (CPU)."""
    hop = hop_distance_matrix(layout).reshape(-1)
    counts = torch.bincount(hop, minlength=num_hop_bins(layout)).to(torch.float64)
    return hop, counts, patch_center_distances(layout).to(torch.float32)


# ------------------------------------------------------------------------------------ input checks
def as_attention(attn: ArrayLike, layout: TokenLayout) -> torch.Tensor:
    """Check one layer's attention against ``layout`` and return it as a float32 ``(B, H, T, T)`` tensor."""
    a = torch.from_numpy(np.asarray(attn)) if not isinstance(attn, torch.Tensor) else attn
    if a.ndim != 4 or a.shape[-1] != a.shape[-2]:
        raise ValueError(
            f"attention must be one layer's maps of shape (B, H, T, T), got {tuple(a.shape)}; "
            "index a (B, L, H, T, T) capture by layer first, e.g. attn[:, layer]"
        )
    if a.shape[-1] != layout.num_tokens:
        raise ValueError(
            f"attention has {a.shape[-1]} tokens but the layout has {layout.num_tokens} "
            f"({layout.describe()}); pass the layout of the model that produced the attention"
        )
    return a.detach().to(torch.float32)


# ------------------------------------------------------------------------------------------ measures
def hop_profile(attn: ArrayLike, layout: TokenLayout) -> np.ndarray:
    """Mean attention per hop distance ``S_n``, ``(B, H, G)`` float32 (patch -> patch block only)."""
    a = as_attention(attn, layout)
    return _hop_profile(_patch_block(a, layout), layout).cpu().numpy().astype(np.float32)


def _patch_block(a: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """The patch -> patch block ``(B, H, P, P)``, contiguous so later reductions read it once."""
    return a[:, :, layout.patch_slice, layout.patch_slice].contiguous()


def _hop_profile(app: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    b, h, p, _ = app.shape
    hop, counts, _ = _geometry(layout)
    flat = app.reshape(b * h, p * p)
    sums = torch.zeros(b * h, counts.numel(), dtype=flat.dtype, device=flat.device)
    sums.index_add_(1, hop.to(flat.device), flat)
    return (sums.to(torch.float64) / counts.to(flat.device)).reshape(b, h, -1)


def entropy_from_profile(profile: ArrayLike) -> np.ndarray:
    """Entropy of hop profiles ``(..., G) -> (...)``: ``-sum p_n ln p_n`` with ``p = S / sum S``.

    ``0 ln 0`` counts as 0. A profile whose total is 0 (a fully pruned head) has no distribution
    and gives NaN. Computed in float64.
    """
    s = np.asarray(profile.cpu() if isinstance(profile, torch.Tensor) else profile, dtype=np.float64)
    if s.ndim == 0:
        raise ValueError("profile must have a last axis of hop bins, got a scalar")
    if np.any(s < 0):
        raise ValueError("hop profile has negative entries; attention strengths are means of probabilities (>= 0)")
    total = s.sum(axis=-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = s / total
        terms = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
    ent = -terms.sum(axis=-1)
    return np.where(total[..., 0] > 0, ent, np.nan)


def mean_attention_distance(attn: ArrayLike, layout: TokenLayout, normalize: bool = True) -> np.ndarray:
    """Attention-weighted distance in pixels between patch centres, ``(B, H)`` float32.

    ``normalize=True`` (default) divides each query's ``sum_j A[i, j] dist(i, j)`` by its patch mass
    ``sum_j A[i, j]`` before averaging over queries (see the module docstring for why);
    ``normalize=False`` averages the raw weighted sums.
    """
    a = as_attention(attn, layout)
    return _mean_distance(_patch_block(a, layout), layout, normalize).cpu().numpy().astype(np.float32)


def _mean_distance(app: torch.Tensor, layout: TokenLayout, normalize: bool) -> torch.Tensor:
    _, _, dist = _geometry(layout)
    weighted = (app * dist.to(app.device)).sum(dim=-1)
    if not normalize:
        return weighted.mean(dim=-1)
    mass = app.sum(dim=-1)
    per_query = torch.where(mass > 0, weighted / mass.clamp_min(torch.finfo(mass.dtype).tiny), torch.nan)
    return torch.nanmean(per_query, dim=-1)


def attention_strength(attn: ArrayLike, layout: TokenLayout) -> dict[str, np.ndarray]:
    """All strength measures for one layer's attention ``(B, H, T, T)``.

    Returns numpy arrays: ``hop_profile (B, H, G)``, and ``entropy``, ``mean_distance``,
    ``cls_self``, ``cls_to_patch``, ``patch_to_cls`` of shape ``(B, H)`` (float32). The ``cls_*``
    entries are NaN when the model has no CLS token. See the module docstring for the definitions.
    """
    a = as_attention(attn, layout)
    app = _patch_block(a, layout)
    profile = _hop_profile(app, layout)
    b, h = a.shape[:2]
    out: dict[str, np.ndarray] = {
        "hop_profile": profile.cpu().numpy().astype(np.float32),
        "entropy": entropy_from_profile(profile).astype(np.float32),
        "mean_distance": _mean_distance(app, layout, normalize=True).cpu().numpy().astype(np.float32),
    }
    c = layout.cls_index
    if c is None:
        nan = np.full((b, h), np.nan, dtype=np.float32)
        out.update(cls_self=nan, cls_to_patch=nan.copy(), patch_to_cls=nan.copy())
    else:
        ps = layout.patch_slice
        out["cls_self"] = a[:, :, c, c].cpu().numpy().astype(np.float32)
        out["cls_to_patch"] = a[:, :, c, ps].sum(dim=-1).cpu().numpy().astype(np.float32)
        out["patch_to_cls"] = a[:, :, ps, c].mean(dim=-1).cpu().numpy().astype(np.float32)
    return out


# ------------------------------------------------------------------------------------------- tables
def strength_frame(
    strength: dict[str, np.ndarray], layer: int, image_ids: Optional[Sequence] = None
) -> pd.DataFrame:
    """One row per (image, head) of one layer from :func:`attention_strength`'s output.

    Columns: ``image`` (``image_ids`` or 0..B-1), ``layer``, ``head``, the scalar measures and
    ``hop_profile`` (a list per row). This is the input :func:`summarize_strength` expects, and it
    writes to Parquet as is.
    """
    ent = np.asarray(strength["entropy"])
    b, h = ent.shape
    if image_ids is None:
        image_ids = range(b)
    image_ids = list(image_ids)
    if len(image_ids) != b:
        raise ValueError(f"got {len(image_ids)} image ids for a batch of {b} images")
    frame = pd.DataFrame(
        {
            "image": np.repeat(np.asarray(image_ids, dtype=object), h),
            "layer": np.full(b * h, int(layer), dtype=np.int32),
            "head": np.tile(np.arange(h, dtype=np.int32), b),
        }
    )
    frame["image"] = frame["image"].infer_objects()
    for name in SCALAR_MEASURES:
        if name in strength:
            frame[name] = np.asarray(strength[name], dtype=np.float32).reshape(-1)
    if "hop_profile" in strength:
        prof = np.asarray(strength["hop_profile"], dtype=np.float32)
        frame["hop_profile"] = list(prof.reshape(b * h, -1))
    return frame


def summarize_strength(image_heads: pd.DataFrame) -> pd.DataFrame:
    """Distribution of each strength measure over images, one row per (layer, head).

    ``image_heads`` has one row per (image, layer, head) with columns ``layer``, ``head``, any of
    ``entropy``, ``mean_distance``, ``cls_self``, ``cls_to_patch``, ``patch_to_cls`` and optionally
    ``hop_profile`` (a sequence per row, e.g. from :func:`strength_frame`). For every measure present
    the result has ``{measure}_mean``, ``_q25``, ``_median`` and ``_q75`` (NaN values are skipped),
    plus ``n_images`` and ``hop_profile_mean`` (the element-wise mean profile, a list) when profiles
    are given. Sorted by layer, head.
    """
    missing = [c for c in ("layer", "head") if c not in image_heads.columns]
    if missing:
        raise ValueError(f"image_heads needs columns 'layer' and 'head' (missing {missing}); build it with strength_frame")
    measures = [m for m in SCALAR_MEASURES if m in image_heads.columns]
    if not measures and "hop_profile" not in image_heads.columns:
        raise ValueError(f"image_heads has none of the measures {list(SCALAR_MEASURES) + ['hop_profile']}")
    groups = image_heads.groupby(["layer", "head"], sort=True)
    out = groups.size().rename("n_images").to_frame()
    for m in measures:
        g = groups[m]
        out[f"{m}_mean"] = g.mean()
        out[f"{m}_q25"] = g.quantile(0.25)
        out[f"{m}_median"] = g.median()
        out[f"{m}_q75"] = g.quantile(0.75)
    if "hop_profile" in image_heads.columns:
        out["hop_profile_mean"] = groups["hop_profile"].apply(
            lambda s: np.nanmean(np.stack([np.asarray(v, dtype=np.float64) for v in s]), axis=0).tolist()
        )
    return out.reset_index()


def uniform_entropy(layout: TokenLayout) -> float:
    """Entropy of a distance-agnostic head, ``ln G`` (the maximum of the head entropy)."""
    return math.log(num_hop_bins(layout))

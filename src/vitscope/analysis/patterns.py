"""Attention patterns: a catalogue of what individual heads learn, built with a small autoencoder.

Li et al. 2023 summarise "all possible attention patterns that individual heads could learn" with an
autoencoder, analyse CLS attention and patch attention separately, and show the latent space as a 2-D
embedding with density contours. The paper does not give the input, the architecture, the latent
size or the projection; this module's choices are:

Inputs (:func:`pattern_inputs`), one map per (image, head), values in ``[0, 1]``, float16:

- ``"offset"`` ``(B, H, 2, K, K)``, ``K = 2 * radius + 1`` (default 15) — the default input for the
  patch-pattern catalogue. Channel 0 is the *relative-offset profile*: the mean attention from a
  patch query to the key displaced by ``(drow, dcol)`` patches, averaged over every query for which
  that key lies on the grid, for displacements up to ``radius`` (larger ones are cropped; displacements
  that do not exist on a small grid are 0). Channel 1 is the *key map*: the mean attention each key
  patch receives from all patch queries, on the grid, rolled circularly so that its largest cell is
  at the centre, and resized to ``K x K``. Each channel is divided by its maximum. Why:
  position-based heads (self, fixed-offset neighbour, local window, row, column, uniform) are
  defined by displacement, which channel 0 shows at one-patch resolution for any grid size, while
  content heads (every query attends to the same object patches) show up in channel 1 as a blob.
  The blob's position depends on the image, not on the head, so it is centred, which keeps the
  autoencoder from spending its codes on where objects are. (Channel 0 of a content head still
  shifts with the object's position, so content heads may spread over more than one cluster.)
- ``"patch"`` ``(B, H, 1, size, size)`` — the raw patch -> patch block ``(P, P)`` adaptively
  average-pooled to ``size x size`` and divided by its maximum: a thumbnail of the matrix as the
  paper's matrix view shows it. Pooling a 196 x 196 block to 16 x 16 merges ~12 neighbouring
  queries and keys, so it cannot tell self from left/right-neighbour heads; prefer ``"offset"`` for
  the catalogue.
- ``"cls"`` ``(B, H, 2, cls_size, cls_size)`` (only for models with a CLS token). Channel 0 is the
  CLS row (CLS -> each patch) on the grid, divided by its maximum (it sums to at most 1 over all
  patches, so only its shape is informative). Channel 1 is the CLS column (each patch -> CLS) on the
  grid, kept in probability units: its level is the information (a CLS-sink head sends most of every
  patch's mass to CLS), and dividing by the maximum would erase it. Both are resized bilinearly
  (antialiased) so that models with different grids share one input size.

Autoencoder (:func:`train_autoencoder`): two stride-2 convolutions and a linear layer to a small
latent code, a two-layer perceptron decoder with a linear output, MSE loss, Adam. It trains on a
seeded subsample (``max_train``) and then encodes every map, so 100k+ maps take well under a
minute on two CPU cores. Training is seeded and runs with a private RNG state, so the same seed
gives the same codes on the same machine.

Catalogue (:func:`catalogue_patterns`): KMeans on the latent codes (seeded), a 2-D projection of the
codes (UMAP by default, t-SNE or PCA on request), decoded prototypes (the decoder applied to the
cluster centroids) with heuristic names (:func:`describe_prototype`), a name per cluster voted by
its own maps, and a smoothed 2-D density grid for contour lines. :func:`dominant_cluster` gives
each head's usual family over the images; :func:`image_overview` lays images out by their
per-head pruned probabilities.
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Sequence, Union

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from vitscope.analysis.strength import ArrayLike, as_attention
from vitscope.core.layout import TokenLayout

MapKind = Literal["offset", "patch", "cls"]
Projection = Literal["umap", "tsne", "pca"]

#: Names :func:`describe_prototype` can return.
PATTERN_NAMES: tuple[str, ...] = (
    "self/diagonal",
    "neighbour left",
    "neighbour right",
    "neighbour up",
    "neighbour down",
    "local window",
    "row",
    "column",
    "uniform/global",
    "CLS-sink",
    "content",
)


# =========================================================================================== inputs
@functools.lru_cache(maxsize=16)
def _offset_bins(layout: TokenLayout, radius: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bin of every (query, key) patch pair by displacement ``(drow, dcol)`` cropped to ``radius``.

    Returns the flat bin index ``(P*P,)`` (``K*K`` collects pairs outside the crop) and the number
    of pairs per displacement ``(K*K,)`` (0 where the displacement does not exist on the grid).
    """
    k = 2 * radius + 1
    pos = layout.patch_positions()
    d = pos[None, :, :] - pos[:, None, :]  # [i, j] = position of key j minus position of query i
    dr, dc = d[..., 0].reshape(-1), d[..., 1].reshape(-1)
    inside = (dr.abs() <= radius) & (dc.abs() <= radius)
    idx = torch.where(inside, (dr + radius) * k + (dc + radius), torch.full_like(dr, k * k))
    counts = torch.bincount(idx, minlength=k * k + 1)[: k * k].to(torch.float32)
    return idx, counts


def offset_profile(app: torch.Tensor, layout: TokenLayout, radius: int = 7) -> torch.Tensor:
    """Mean attention per displacement, ``(B, H, P, P) -> (B, H, K, K)`` with ``K = 2*radius+1``.

    Entry ``[r + radius, c + radius]`` is the mean of ``A[i, j]`` over patch pairs where key ``j`` sits
    ``r`` rows and ``c`` columns from query ``i`` (negative = up / left); 0 where no such pair exists.
    """
    if app.ndim != 4 or app.shape[-1] != app.shape[-2] or app.shape[-1] != layout.num_patches:
        raise ValueError(
            f"offset_profile needs the patch -> patch block (B, H, {layout.num_patches}, {layout.num_patches}) "
            f"for {layout.describe()}, got {tuple(app.shape)}; slice attn[:, :, layout.patch_slice, layout.patch_slice]"
        )
    b, h, p, _ = app.shape
    k = 2 * radius + 1
    idx, counts = _offset_bins(layout, radius)
    sums = torch.zeros(b * h, k * k + 1, dtype=app.dtype, device=app.device)
    sums.index_add_(1, idx.to(app.device), app.reshape(b * h, p * p))
    counts = counts.to(app.device)
    mean = torch.where(counts > 0, sums[:, : k * k] / counts.clamp_min(1.0), torch.zeros((), device=app.device))
    return mean.reshape(b, h, k, k)


def _max_normalise(x: torch.Tensor) -> torch.Tensor:
    """Divide each map (last two axes, per channel) by its maximum; all-zero maps stay zero."""
    peak = x.amax(dim=(-2, -1), keepdim=True)
    return torch.where(peak > 0, x / peak.clamp_min(torch.finfo(x.dtype).tiny), torch.zeros_like(x))


def _centre_on_peak(values: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Roll each ``(N, P)`` grid map circularly so that its largest cell sits at the grid centre.

    Circular, so a flat map stays flat; a blob keeps its shape and size but loses its position.
    """
    n = values.shape[0]
    rows, cols = grid
    peak = values.argmax(dim=-1)
    shift_r = rows // 2 - torch.div(peak, cols, rounding_mode="floor")
    shift_c = cols // 2 - peak % cols
    r = (torch.arange(rows, device=values.device)[None, :] - shift_r[:, None]) % rows  # source row per target row
    c = (torch.arange(cols, device=values.device)[None, :] - shift_c[:, None]) % cols
    src = (r[:, :, None] * cols + c[:, None, :]).reshape(n, rows * cols)
    return values.gather(1, src)


def _on_grid(values: torch.Tensor, grid: tuple[int, int], size: int) -> torch.Tensor:
    """``(N, P)`` per-patch values -> ``(N, size, size)`` image, bilinear and antialiased."""
    n = values.shape[0]
    img = values.reshape(n, 1, grid[0], grid[1])
    if grid != (size, size):
        img = F.interpolate(img, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return img[:, 0]


def pattern_inputs(
    attn: ArrayLike, layout: TokenLayout, size: int = 16, radius: int = 7, cls_size: int = 14
) -> dict[str, np.ndarray]:
    """Autoencoder inputs for every (image, head) of one layer's attention ``(B, H, T, T)``.

    Returns float16 arrays ``"offset" (B, H, 2, 2*radius+1, 2*radius+1)``, ``"patch" (B, H, 1, size,
    size)`` and, for models with a CLS token, ``"cls" (B, H, 2, cls_size, cls_size)``. The module
    docstring defines each map and its normalisation. Sizes do not depend on the model's grid, so
    maps from models with different grids can share one autoencoder.
    """
    if size < 1 or radius < 1 or cls_size < 1:
        raise ValueError(f"size, radius and cls_size must be positive, got {size}, {radius}, {cls_size}")
    a = as_attention(attn, layout)
    b, h = a.shape[:2]
    p = layout.num_patches
    ps = layout.patch_slice
    app = a[:, :, ps, ps].contiguous()
    k = 2 * radius + 1

    offset = offset_profile(app, layout, radius)
    keys = _on_grid(_centre_on_peak(app.mean(dim=-2).reshape(b * h, p), layout.grid), layout.grid, k).reshape(b, h, k, k)
    out = {"offset": _max_normalise(torch.stack([offset, keys], dim=2))}

    pooled = F.adaptive_avg_pool2d(app.reshape(b * h, 1, p, p), size).reshape(b, h, 1, size, size)
    out["patch"] = _max_normalise(pooled)

    c = layout.cls_index
    if c is not None:
        row = _on_grid(a[:, :, c, ps].reshape(b * h, p), layout.grid, cls_size).reshape(b, h, cls_size, cls_size)
        col = _on_grid(a[:, :, ps, c].reshape(b * h, p), layout.grid, cls_size).reshape(b, h, cls_size, cls_size)
        out["cls"] = torch.stack([_max_normalise(row), col.clamp(0.0, 1.0)], dim=2)
    return {name: v.cpu().numpy().astype(np.float16) for name, v in out.items()}


# ====================================================================================== autoencoder
class ConvAutoencoder(nn.Module):
    """Small autoencoder for ``(C, S, S)`` maps with values in ``[0, 1]``.

    Encoder: two 3x3 stride-2 convolutions (``width``, ``2*width`` channels) and a linear layer to
    the latent code. Decoder: a two-layer perceptron with a linear output, clipped to ``[0, 1]``
    outside training; on maps this small a convolutional decoder made each training step several
    times slower on a CPU. A sigmoid output saturates on sparse maps: on the built-in model's CLS
    maps (mean value 0.07) it collapsed to zero within one epoch and reconstructed worse than the
    per-pixel mean (relative error 1.38), where the linear output reaches 0.13.
    """

    def __init__(self, in_channels: int, size: int, latent_dim: int = 8, width: int = 16, hidden: int = 256) -> None:
        super().__init__()
        self.in_channels, self.size, self.latent_dim, self.width, self.hidden = in_channels, size, latent_dim, width, hidden
        quarter = ((size + 1) // 2 + 1) // 2
        self.encoder = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(2 * width * quarter * quarter, latent_dim),
        )
        self.decoder = nn.Sequential(
            nn.Linear(latent_dim, hidden),
            nn.ReLU(),
            nn.Linear(hidden, in_channels * size * size),
        )

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        out = self.decoder(z).reshape(-1, self.in_channels, self.size, self.size)
        # Maps live in [0, 1]; clipping outside training can only bring a reconstruction closer.
        return out if self.training else out.clamp(0.0, 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))


def _as_maps(maps: Union[np.ndarray, torch.Tensor], what: str = "maps") -> torch.Tensor:
    x = maps if isinstance(maps, torch.Tensor) else torch.from_numpy(np.asarray(maps))
    if x.ndim != 4 or x.shape[-1] != x.shape[-2]:
        raise ValueError(
            f"{what} must be (N, C, S, S) square maps, got {tuple(x.shape)}; flatten (B, H, C, S, S) from "
            "pattern_inputs with maps.reshape(-1, *maps.shape[-3:])"
        )
    x = x.detach().to(torch.float32)
    bad = int((~torch.isfinite(x)).sum())
    if bad:
        raise ValueError(f"{what} contain {bad} non-finite values; drop those maps (e.g. pruned heads) before training")
    return x


@dataclass
class AutoencoderResult:
    """A trained pattern autoencoder and the codes of the maps it was trained for.

    Attributes:
        model: the trained :class:`ConvAutoencoder` (eval mode, CPU).
        codes: latent code of every input map, ``(N, latent_dim)`` float32.
        reconstruction_error: mean squared error of every map's reconstruction, ``(N,)``.
        loss_history: mean training loss per epoch.
        train_indices: which maps were used for training (a seeded subsample when N > max_train).
        config: constructor and training settings (enough to rebuild the model from ``state_dict``).
    """

    model: ConvAutoencoder
    codes: np.ndarray
    reconstruction_error: np.ndarray
    loss_history: list[float] = field(default_factory=list)
    train_indices: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    config: dict[str, Any] = field(default_factory=dict)

    @torch.no_grad()
    def encode(self, maps: Union[np.ndarray, torch.Tensor], batch_size: int = 4096) -> np.ndarray:
        """Latent codes ``(N, latent_dim)`` of maps ``(N, C, S, S)``."""
        x = self._check(_as_maps(maps))
        out = [self.model.encode(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]
        return torch.cat(out).numpy() if out else np.zeros((0, self.model.latent_dim), np.float32)

    @torch.no_grad()
    def decode(self, codes: Union[np.ndarray, torch.Tensor], batch_size: int = 4096) -> np.ndarray:
        """Maps ``(N, C, S, S)`` decoded from latent codes ``(N, latent_dim)`` (e.g. cluster centroids)."""
        z = torch.as_tensor(np.asarray(codes), dtype=torch.float32)
        if z.ndim != 2 or z.shape[1] != self.model.latent_dim:
            raise ValueError(f"codes must be (N, {self.model.latent_dim}), got {tuple(z.shape)}")
        out = [self.model.decode(z[i : i + batch_size]) for i in range(0, len(z), batch_size)]
        m = self.model
        return torch.cat(out).numpy() if out else np.zeros((0, m.in_channels, m.size, m.size), np.float32)

    @torch.no_grad()
    def errors(self, maps: Union[np.ndarray, torch.Tensor], batch_size: int = 4096) -> np.ndarray:
        """Per-map mean squared reconstruction error ``(N,)``."""
        x = self._check(_as_maps(maps))
        out = [
            ((self.model(x[i : i + batch_size]) - x[i : i + batch_size]) ** 2).mean(dim=(1, 2, 3))
            for i in range(0, len(x), batch_size)
        ]
        return torch.cat(out).numpy() if out else np.zeros(0, np.float32)

    def state_dict(self) -> dict[str, Any]:
        """``{"config": ..., "weights": ...}``; rebuild with :meth:`from_state_dict`."""
        return {"config": dict(self.config), "weights": {k: v.clone() for k, v in self.model.state_dict().items()}}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], maps: Optional[np.ndarray] = None) -> "AutoencoderResult":
        """Rebuild a trained autoencoder; ``maps`` (optional) are encoded into ``codes``."""
        cfg = state["config"]
        model = ConvAutoencoder(cfg["in_channels"], cfg["size"], cfg["latent_dim"], cfg["width"], cfg["hidden"])
        model.load_state_dict(state["weights"])
        model.eval()
        res = cls(model=model, codes=np.zeros((0, cfg["latent_dim"]), np.float32), reconstruction_error=np.zeros(0, np.float32), config=dict(cfg))
        if maps is not None:
            res.codes, res.reconstruction_error = res.encode(maps), res.errors(maps)
        return res

    def _check(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        if tuple(x.shape[1:]) != (m.in_channels, m.size, m.size):
            raise ValueError(f"maps are {tuple(x.shape[1:])} but the autoencoder was trained on {(m.in_channels, m.size, m.size)}")
        return x


def train_autoencoder(
    maps: Union[np.ndarray, torch.Tensor],
    latent_dim: int = 8,
    epochs: int = 20,
    seed: int = 0,
    batch_size: int = 256,
    *,
    max_train: int = 10_000,
    min_steps: int = 600,
    width: int = 16,
    hidden: int = 256,
    lr: float = 6e-3,
    num_threads: Optional[int] = 1,
) -> AutoencoderResult:
    """Train a :class:`ConvAutoencoder` on maps ``(N, C, S, S)`` and encode all of them.

    At most ``max_train`` maps (a seeded random subsample) are used for training, so the cost does
    not grow with the image set; every map is encoded afterwards. Small sets would see too few
    optimiser steps in ``epochs`` passes, so training runs at least ``min_steps`` steps (more epochs
    when needed; the epochs actually run are in ``config["epochs_run"]``). Adam with a cosine learning-rate
    decay, MSE loss. The global torch RNG is left untouched: initialisation and shuffling use their
    own seeded generators, so the same ``seed`` gives identical codes on the same machine.

    ``num_threads`` sets torch's CPU threads while training (restored afterwards; ``None`` keeps the
    current setting). The steps are small, so extra threads gain little and, on a busy machine, wait
    on each other: on a shared two-core machine, training with two threads was ten times slower than
    with one.
    """
    x = _as_maps(maps)
    n, c, s, _ = x.shape
    if n == 0:
        raise ValueError("no maps to train on")
    if latent_dim < 1 or epochs < 1 or batch_size < 1:
        raise ValueError(f"latent_dim, epochs and batch_size must be positive, got {latent_dim}, {epochs}, {batch_size}")
    saved_threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        return _train(x, latent_dim, epochs, seed, batch_size, max_train, min_steps, width, hidden, lr)
    finally:
        torch.set_num_threads(saved_threads)


def _train(
    x: torch.Tensor,
    latent_dim: int,
    epochs: int,
    seed: int,
    batch_size: int,
    max_train: int,
    min_steps: int,
    width: int,
    hidden: int,
    lr: float,
) -> AutoencoderResult:
    n, c, s, _ = x.shape
    gen = torch.Generator().manual_seed(seed)
    train_idx = torch.randperm(n, generator=gen)[:max_train].sort().values if n > max_train else torch.arange(n)
    xt = x[train_idx]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ConvAutoencoder(c, s, latent_dim, width, hidden)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    per_epoch = math.ceil(len(xt) / batch_size)
    epochs_run = max(epochs, math.ceil(min_steps / per_epoch))
    steps = epochs_run * per_epoch
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1))
    history: list[float] = []
    model.train()
    for _ in range(epochs_run):
        perm = torch.randperm(len(xt), generator=gen)
        total = 0.0
        for i in range(0, len(xt), batch_size):
            batch = xt[perm[i : i + batch_size]]
            loss = F.mse_loss(model(batch), batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(batch)
        history.append(total / len(xt))
    model.eval()
    config = dict(in_channels=c, size=s, latent_dim=latent_dim, width=width, hidden=hidden, epochs=epochs, seed=seed,
                  batch_size=batch_size, max_train=max_train, min_steps=min_steps, lr=lr, n_maps=n, n_train=len(xt), epochs_run=epochs_run)
    res = AutoencoderResult(model=model, codes=np.zeros((0, latent_dim), np.float32), reconstruction_error=np.zeros(0, np.float32),
                            loss_history=history, train_indices=train_idx.numpy(), config=config)
    res.codes = res.encode(x)
    res.reconstruction_error = res.errors(x)
    return res


# ======================================================================================= catalogue
@dataclass
class PatternCatalogue:
    """Clusters of attention-pattern codes, their 2-D layout and prototypes.

    Attributes:
        embedding: 2-D position of every code, ``(N, 2)``.
        labels: cluster of every code, ``(N,)``.
        centroids: cluster centres in latent space, ``(k, latent_dim)``.
        sizes: number of codes per cluster, ``(k,)``.
        centroid_embedding: mean 2-D position of each cluster's members, ``(k, 2)`` (for labels on a plot).
        prototypes: decoded centroids ``(k, C, S, S)`` when an autoencoder was given, else ``None``.
        names: heuristic name of each prototype (:func:`describe_prototype`) when ``kind`` was given.
        member_names: most common name among (a sample of) each cluster's own maps, when ``maps``
            and ``kind`` were given. More trustworthy than ``names`` for families whose maps vary in
            position (content, CLS rows): a decoded centroid is an average and looks blurred.
        member_name_share: fraction of the sampled members that carry ``member_names``.
        density: smoothed density of the embedding on a grid, ``(gy, gx)``, integrating to 1.
        grid_x, grid_y: centres of the density grid's columns and rows.
        projection: the method used for ``embedding``.
    """

    embedding: np.ndarray
    labels: np.ndarray
    centroids: np.ndarray
    sizes: np.ndarray
    centroid_embedding: np.ndarray
    density: np.ndarray
    grid_x: np.ndarray
    grid_y: np.ndarray
    projection: str
    seed: int
    prototypes: Optional[np.ndarray] = None
    names: Optional[list[str]] = None
    member_names: Optional[list[str]] = None
    member_name_share: Optional[np.ndarray] = None


def _thread_limit(num_threads: Optional[int]) -> contextlib.AbstractContextManager:
    """Limit the OpenMP/BLAS threads of scikit-learn and numpy inside the block (``None``: no limit).

    On a busy machine OpenMP threads spin while waiting for each other: a 60-point t-SNE took 35 s
    with the default threads and 0.35 s with one on a loaded two-core machine.
    """
    if num_threads is None:
        return contextlib.nullcontext()
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=num_threads)


def project_2d(
    points: np.ndarray,
    projection: Projection = "umap",
    seed: int = 0,
    max_fit_points: int = 5000,
    num_threads: Optional[int] = 1,
) -> np.ndarray:
    """Seeded 2-D projection of ``(N, D)`` points.

    ``"pca"`` projects every point exactly. ``"umap"`` (umap-learn, ``random_state=seed``) and
    ``"tsne"`` (scikit-learn) are fitted on at most ``max_fit_points`` points (a seeded subsample);
    the others are placed at the distance-weighted mean position of their 5 nearest fitted
    neighbours in the input space, which keeps large sets fast and deterministic. UMAP needs at
    least 10 points; with fewer, PCA is used (with a warning). ``num_threads`` limits the
    OpenMP/BLAS threads (``None``: the libraries' defaults).
    """
    with _thread_limit(num_threads):
        return _project_2d(points, projection, seed, max_fit_points)


def _project_2d(points: np.ndarray, projection: str, seed: int, max_fit_points: int) -> np.ndarray:
    x = np.asarray(points, dtype=np.float32)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"points must be a non-empty (N, D) array, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("points contain NaN or inf; drop or impute them before projecting")
    if projection not in ("umap", "tsne", "pca"):
        raise ValueError(f"unknown projection {projection!r}; use 'umap', 'tsne' or 'pca'")
    n = len(x)
    if projection == "umap" and n < 10:
        warnings.warn(f"UMAP needs at least 10 points, got {n}; using PCA", stacklevel=3)
        projection = "pca"
    if projection == "pca":
        return _pca_2d(x)
    rng = np.random.default_rng(seed)
    fit_idx = np.sort(rng.choice(n, size=max_fit_points, replace=False)) if n > max_fit_points else np.arange(n)
    xf = x[fit_idx]
    if projection == "umap":
        umap = _umap()
        from sklearn.neighbors import NearestNeighbors

        # Exact neighbours from scikit-learn instead of UMAP's own approximate search: at these
        # sizes (<= max_fit_points) they cost a fraction of a second, while pynndescent's numba
        # kernels take about a minute to compile in every new process.
        k = min(15, len(xf) - 1)
        dist, idx = NearestNeighbors(n_neighbors=k).fit(xf).kneighbors(xf)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*n_jobs.*")
            warnings.filterwarnings("ignore", message=".*knn_search_index.*")
            reducer = umap.UMAP(n_components=2, n_neighbors=k, random_state=seed, precomputed_knn=(idx, dist))
            emb_fit = reducer.fit_transform(xf)
    else:
        from sklearn.manifold import TSNE

        perplexity = float(min(30.0, max(2.0, (len(xf) - 1) / 3)))
        emb_fit = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(xf)
    emb = np.empty((n, 2), dtype=np.float32)
    emb[fit_idx] = emb_fit
    rest = np.setdiff1d(np.arange(n), fit_idx)
    if len(rest):
        from sklearn.neighbors import KNeighborsRegressor

        knn = KNeighborsRegressor(n_neighbors=min(5, len(xf)), weights="distance").fit(xf, emb_fit)
        emb[rest] = knn.predict(x[rest])
    return emb


#: umap-learn's numba kernels that it compiles without numba's on-disk cache: about 8 s of
#: compiling in every new process (every ``analyze``, every rank of a parallel one), against under
#: a second to load them once cached. Caching changes no result: it stores the same machine code.
_UMAP_UNCACHED_KERNELS = {
    "umap.utils": ("tau_rand_int", "tau_rand"),
    "umap.layouts": ("tau_rand_int", "clip", "_nb_optimize_layout_euclidean_single_epoch"),
    "umap.umap_": ("smooth_knn_dist", "compute_membership_strengths"),
}


@functools.cache
def _umap() -> Any:
    """umap-learn, with :data:`_UMAP_UNCACHED_KERNELS` given numba's on-disk cache (once per
    process; a kernel a newer umap-learn renamed is left alone)."""
    import importlib

    import umap

    for module_name, names in _UMAP_UNCACHED_KERNELS.items():
        module = importlib.import_module(module_name)
        for name in names:
            kernel = getattr(module, name, None)
            enable = getattr(kernel, "enable_caching", None)
            if enable is not None:
                try:
                    enable()
                except Exception:  # an unwritable cache location: numba compiles as before
                    pass
    return umap


def _pca_2d(x: np.ndarray) -> np.ndarray:
    from sklearn.decomposition import PCA

    n, d = x.shape
    k = min(2, n, d)
    emb = np.zeros((n, 2), dtype=np.float32)
    if k > 0 and n > 1:
        emb[:, :k] = PCA(n_components=k, svd_solver="full").fit_transform(x)
    return emb


def density_grid(embedding: np.ndarray, size: int = 64, pad: float = 0.05) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Smoothed density of 2-D points: ``(density (size, size) indexed [y, x], grid_x, grid_y)``.

    A 2-D histogram smoothed with a Gaussian whose width is Scott's rule (``std * N**(-1/6)`` per
    axis) — the same bandwidth ``scipy.stats.gaussian_kde`` uses, at a cost linear in N. Normalised so
    that ``density.sum() * cell_area == 1``.
    """
    from scipy.ndimage import gaussian_filter

    e = np.asarray(embedding, dtype=np.float64)
    lo, hi = e.min(axis=0), e.max(axis=0)
    span = np.where(hi - lo > 0, hi - lo, 1.0)
    lo, hi = lo - pad * span, hi + pad * span
    hist, xe, ye = np.histogram2d(e[:, 0], e[:, 1], bins=size, range=[[lo[0], hi[0]], [lo[1], hi[1]]])
    cell = (hi - lo) / size
    std = e.std(axis=0)
    bandwidth = np.where(std > 0, std, span / 10) * len(e) ** (-1 / 6)
    smooth = gaussian_filter(hist.T, sigma=(bandwidth[1] / cell[1], bandwidth[0] / cell[0]), mode="constant")
    total = smooth.sum() * cell[0] * cell[1]
    density = smooth / total if total > 0 else smooth
    return density, (xe[:-1] + xe[1:]) / 2, (ye[:-1] + ye[1:]) / 2


def catalogue_patterns(
    codes: np.ndarray,
    n_clusters: int = 8,
    seed: int = 0,
    projection: Projection = "umap",
    *,
    autoencoder: Optional[AutoencoderResult] = None,
    kind: Optional[MapKind] = None,
    density_size: int = 64,
    max_fit_points: int = 5000,
    maps: Optional[np.ndarray] = None,
    name_sample: int = 200,
    num_threads: Optional[int] = 1,
) -> PatternCatalogue:
    """Cluster latent codes ``(N, latent_dim)`` into pattern families and lay them out in 2-D.

    KMeans (``random_state=seed``, 10 restarts) runs in the latent space, not on the 2-D projection,
    so the clusters do not depend on the projection. With ``autoencoder`` the centroids are decoded
    into prototype maps, and with ``kind`` (the map kind the autoencoder was trained on) each
    prototype gets a heuristic name; with ``maps`` (the maps the codes came from, in the same order)
    and ``kind``, each cluster is also named by a vote over up to ``name_sample`` of its members.
    See :func:`project_2d` for the projection and ``num_threads``.
    """
    from sklearn.cluster import KMeans

    z = np.asarray(codes, dtype=np.float32)
    if z.ndim != 2:
        raise ValueError(f"codes must be (N, latent_dim), got shape {z.shape}")
    if not 1 <= n_clusters <= len(z):
        raise ValueError(f"n_clusters must be between 1 and the number of codes ({len(z)}), got {n_clusters}")
    with _thread_limit(num_threads):
        km = KMeans(n_clusters=n_clusters, n_init=10, random_state=seed).fit(z)
    labels = km.labels_.astype(np.int32)
    emb = project_2d(z, projection, seed=seed, max_fit_points=max_fit_points, num_threads=num_threads)
    sizes = np.bincount(labels, minlength=n_clusters)
    cemb = np.stack([emb[labels == k].mean(axis=0) if sizes[k] else np.full(2, np.nan) for k in range(n_clusters)])
    density, gx, gy = density_grid(emb, size=density_size)
    prototypes = names = None
    if autoencoder is not None:
        prototypes = autoencoder.decode(km.cluster_centers_.astype(np.float32))
        if kind is not None:
            names = [describe_prototype(p, kind=kind) for p in prototypes]
    member_names = member_share = None
    if maps is not None and kind is not None:
        if len(maps) != len(z):
            raise ValueError(f"got {len(maps)} maps for {len(z)} codes; pass the maps the codes were computed from")
        member_names, shares = [], []
        rng = np.random.default_rng(seed)
        for k in range(n_clusters):
            members = np.flatnonzero(labels == k)
            sample = np.sort(rng.choice(members, size=min(len(members), name_sample), replace=False))
            votes = Counter(describe_prototype(np.asarray(maps[i], dtype=np.float32), kind=kind) for i in sample)
            name, count = min(votes.items(), key=lambda kv: (-kv[1], kv[0]))
            member_names.append(name)
            shares.append(count / len(sample))
        member_share = np.asarray(shares)
    return PatternCatalogue(
        embedding=emb, labels=labels, centroids=km.cluster_centers_.astype(np.float32), sizes=sizes,
        centroid_embedding=cemb.astype(np.float32), density=density, grid_x=gx, grid_y=gy,
        projection=projection, seed=seed, prototypes=prototypes, names=names,
        member_names=member_names, member_name_share=member_share,
    )


def dominant_cluster(labels: Union[np.ndarray, pd.DataFrame], column: str = "cluster") -> pd.DataFrame:
    """Most frequent cluster of every (layer, head) over images, and its share.

    ``labels`` is either an integer array ``(N_images, L, H)`` or a DataFrame with one row per
    (image, layer, head) and columns ``layer``, ``head`` and ``column``. Returns one row per
    (layer, head): ``cluster`` (ties go to the smallest id), ``share`` (its fraction of the head's
    images) and ``n_images``.
    """
    if isinstance(labels, pd.DataFrame):
        missing = [c for c in ("layer", "head", column) if c not in labels.columns]
        if missing:
            raise ValueError(f"labels frame lacks columns {missing}; it needs one row per (image, layer, head)")
        frame = labels[["layer", "head", column]].rename(columns={column: "cluster"})
    else:
        arr = np.asarray(labels)
        if arr.ndim != 3:
            raise ValueError(f"labels array must be (N_images, L, H), got shape {arr.shape}")
        n, l, h = arr.shape
        frame = pd.DataFrame(
            {"layer": np.tile(np.repeat(np.arange(l), h), n), "head": np.tile(np.arange(h), n * l), "cluster": arr.reshape(-1)}
        )
    counts = frame.groupby(["layer", "head", "cluster"], sort=True).size().rename("count").reset_index()
    totals = counts.groupby(["layer", "head"])["count"].transform("sum")
    counts["share"] = counts["count"] / totals
    counts["n_images"] = totals
    best = counts.sort_values(["layer", "head", "count", "cluster"], ascending=[True, True, False, True])
    best = best.drop_duplicates(["layer", "head"], keep="first")
    return best[["layer", "head", "cluster", "share", "n_images"]].reset_index(drop=True)


# ========================================================================================== naming
def describe_prototype(
    proto_map: Union[np.ndarray, torch.Tensor], kind: MapKind = "offset", grid: Optional[tuple[int, int]] = None
) -> str:
    """Heuristic family name of one pattern map (a decoded prototype or a single head's map).

    ``kind`` says which map it is (see :func:`pattern_inputs`); the result is one of
    :data:`PATTERN_NAMES` (a fixed-offset neighbour further than one patch gets a suffix, e.g.
    ``"neighbour left x2"``; a map with no mass is ``"empty"``).

    Rules for ``"offset"`` maps (``(2, K, K)``, ``(1, K, K)`` or ``(K, K)``). Channel 0 is divided by
    its max; the *mass* of a displacement is its mean attention times the number of (query, key)
    pairs with that displacement on the grid, so shares below are shares of the head's attention:

    1. sharp peak — the peak cell holds >= 50 % of its 3 x 3 neighbourhood and >= 20 % of the
       mass: at the centre -> ``"self/diagonal"``; elsewhere -> ``"neighbour left/right/up/down"``
       (left = the key is in the column to the query's left; a diagonal displacement is named by
       its larger component).
    2. the centre row holds >= 50 % of the mass and >= 5 of its cells are >= 0.5 -> ``"row"``;
       the same for the centre column -> ``"column"``.
    3. the 5 x 5 window around the centre holds >= 50 % of the mass and the peak is within one
       patch of the centre -> ``"local window"``.
    4. flat — over the displacements that exist on the grid, the 10th percentile is >= 30 % of
       the 90th and the top 10 % of cells hold < 30 % of the summed values -> ``"uniform/global"``
       (a faint self peak on a flat background is uniform: it carries little mass); but if
       channel 1 (the key map) is given and not flat by the same test, every query looks at the
       same few keys -> ``"content"``.
    5. otherwise ``"content"`` (attention that depends on what is where, not on displacement;
       channel 1, the key map, shows how concentrated).

    The grid (which displacements exist, and how many pairs each has) is ``grid`` when given;
    otherwise it is read off the map's empty border (see ``_infer_grid``), so prototypes decoded
    from maps of one model are named correctly without it.

    ``"cls"`` maps (``(2, S, S)``: CLS row, CLS column in probability units): mean CLS column >= 0.5
    -> ``"CLS-sink"``; flat CLS row (rule 4) -> ``"uniform/global"``; otherwise ``"content"``.

    ``"patch"`` maps (pooled ``P x P`` blocks): if ``grid`` is given and the map is unpooled
    (``S == P``) it is converted to an offset map and named by the offset rules. Otherwise pooling has
    merged neighbouring tokens, so only these are told apart: >= 50 % of the mass on the (pooled)
    diagonal -> ``"self/diagonal"``; flat -> ``"uniform/global"``; otherwise ``"content"``.
    """
    m = np.asarray(proto_map.detach().cpu() if isinstance(proto_map, torch.Tensor) else proto_map, dtype=np.float64)
    if m.ndim == 2:
        m = m[None]
    if m.ndim != 3 or m.shape[-1] != m.shape[-2]:
        raise ValueError(f"a pattern map must be (C, S, S) or (S, S), got shape {m.shape}")
    if not np.isfinite(m).all():
        raise ValueError("pattern map contains NaN or inf")
    if kind == "cls":
        if m.shape[0] != 2:
            raise ValueError(f"a 'cls' map has 2 channels (CLS row, CLS column), got {m.shape[0]}")
        if m[1].mean() >= 0.5:
            return "CLS-sink"
        row = np.clip(m[0], 0, None)
        if row.max() <= 0:
            return "empty"
        return "uniform/global" if _is_flat(row / row.max()) else "content"
    if kind == "patch":
        block = np.clip(m[0], 0, None)
        if block.max() <= 0:
            return "empty"
        if grid is not None and block.shape[0] == grid[0] * grid[1]:
            lay = TokenLayout(0, None, None, (), tuple(grid), (1, 1))
            off = offset_profile(torch.from_numpy(block)[None, None].float(), lay, max(grid) - 1)[0, 0].numpy()
            return _describe_offset(off, tuple(grid))
        block = block / block.max()
        s = block.shape[0]
        diag = np.abs(np.arange(s)[:, None] - np.arange(s)[None, :]) <= 1
        if block[diag].sum() >= 0.5 * block.sum() and not _is_flat(block):
            return "self/diagonal"
        return "uniform/global" if _is_flat(block) else "content"
    if kind != "offset":
        raise ValueError(f"unknown map kind {kind!r}; use 'offset', 'patch' or 'cls'")
    grid = tuple(grid) if grid is not None else _infer_grid(np.clip(m[0], 0, None))
    return _describe_offset(m[0], grid, keys=m[1] if m.shape[0] > 1 else None)


def _valid_offsets(radius: int, grid: Sequence[int]) -> np.ndarray:
    d = np.arange(-radius, radius + 1)
    return (np.abs(d)[:, None] < grid[0]) & (np.abs(d)[None, :] < grid[1])


def _infer_grid(m: np.ndarray, eps: float = 0.02) -> tuple[int, int]:
    """Grid of an offset map from its empty border: symmetric outer rows / columns that are ~0.

    A displacement ``d`` exists exactly when ``-d`` does, so the displacements a grid has form a
    centred rectangle, and a grid with ``g <= radius`` rows leaves the outer rows of the map at 0.
    A map with no empty border is taken to come from a ``2 * radius``-patch side (14 for the default
    radius 7, the grid of a 224 px / 16 px model).
    """
    k = m.shape[0]
    c = k // 2
    low = m <= eps * m.max()
    sides = []
    for empty in (low.all(axis=1), low.all(axis=0)):
        r = c
        while r > 0 and empty[c - r] and empty[c + r]:
            r -= 1
        sides.append(r + 1 if r < c else 2 * c)
    return sides[0], sides[1]


def _is_flat(m: np.ndarray, valid: Optional[np.ndarray] = None) -> bool:
    """No structure: the 10th percentile is >= 30 % of the 90th (robust to single noisy cells) and
    the top 10 % of cells hold < 30 % of the mass (no small hot spot that quantiles would miss)."""
    v = np.sort(m[valid] if valid is not None else m.reshape(-1))
    hi = np.quantile(v, 0.9)
    top = v[-max(1, int(round(0.1 * len(v)))) :].sum()
    return bool(hi > 0 and np.quantile(v, 0.1) >= 0.3 * hi and top < 0.3 * v.sum())


def _describe_offset(m: np.ndarray, grid: tuple[int, int], keys: Optional[np.ndarray] = None) -> str:
    k = m.shape[0]
    c = k // 2
    valid = _valid_offsets(c, grid)
    m = np.where(valid, np.clip(m, 0, None), 0.0)
    if m.max() <= 0:
        return "empty"
    m = m / m.max()
    # Attention mass per displacement: the mean times the number of (query, key) pairs with it.
    d = np.abs(np.arange(-c, c + 1))
    pairs = np.clip(grid[0] - d, 0, None)[:, None] * np.clip(grid[1] - d, 0, None)[None, :]
    mass = m * pairs
    total = mass.sum()
    pr, pc = np.unravel_index(int(np.argmax(m)), m.shape)
    near = m[max(pr - 1, 0) : pr + 2, max(pc - 1, 0) : pc + 2].sum()
    # 1. one sharp displacement that carries a real share of the attention
    if m[pr, pc] >= 0.5 * near and mass[pr, pc] >= 0.2 * total:
        dr, dc = int(pr - c), int(pc - c)
        if dr == 0 and dc == 0:
            return "self/diagonal"
        if abs(dc) >= abs(dr):
            name, steps = ("neighbour left" if dc < 0 else "neighbour right"), abs(dc)
        else:
            name, steps = ("neighbour up" if dr < 0 else "neighbour down"), abs(dr)
        return name if steps == 1 else f"{name} x{steps}"
    # 2. a line through the query
    if mass[c, :].sum() >= 0.5 * total and (m[c, :] >= 0.5).sum() >= 5:
        return "row"
    if mass[:, c].sum() >= 0.5 * total and (m[:, c] >= 0.5).sum() >= 5:
        return "column"
    # 3. a compact neighbourhood
    if mass[max(c - 2, 0) : c + 3, max(c - 2, 0) : c + 3].sum() >= 0.5 * total and max(abs(pr - c), abs(pc - c)) <= 1:
        return "local window"
    # 4. distance-agnostic: uniform, unless every query looks at the same few keys (content)
    if _is_flat(m, valid):
        if keys is not None and np.clip(keys, 0, None).max() > 0 and not _is_flat(np.clip(keys, 0, None)):
            return "content"
        return "uniform/global"
    return "content"


# ==================================================================================== image overview
def image_overview(pruned_prob: np.ndarray, seed: int = 0, num_threads: Optional[int] = 1) -> np.ndarray:
    """2-D layout of images by their per-head pruned-probability vectors ``(N_images, L*H) -> (N, 2)``.

    UMAP (``random_state=seed``) on the raw probabilities; PCA for fewer than 10 images. This is the
    paper's image overview, where images spread along an arc from low to high probability.
    """
    x = np.asarray(pruned_prob, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"pruned_prob must be (N_images, L*H), got shape {x.shape}")
    return project_2d(x, "pca" if len(x) < 10 else "umap", seed=seed, max_fit_points=max(len(x), 1), num_threads=num_threads)

"""How faithful an explanation map is, and whether it depends on the model at all.

Faithfulness (does removing the patches a map ranks highest change the model's answer?):

- **Perturbation curves** (Chefer, Gur & Wolf, CVPR 2021 and ICCV 2021): remove 0, 10, ..., 90 %
  of the patches, *positive* = most relevant first (a faithful map makes the model fail fast: lower
  is better), *negative* = least relevant first (higher is better). Two forms of removal:
  ``tokens`` drops the patches' tokens (the model runs on the prefix tokens and the kept patch
  tokens only: embed, then index the sequence), ``pixels`` fills the patches' pixels with the
  image's per-channel mean. Curves of top-1 accuracy (against ``label``) and of the explained
  class's probability; area under the curve over the removed fraction 0..0.9 (trapezoid), x 100,
  as in Chefer et al.'s evaluation.
- **Insertion / deletion** (Petsiuk, Das & Saenko, "RISE", BMVC 2018): the explained class's
  probability as patches (most relevant first, 10 % at a time, 0..100 %) are inserted into a
  Gaussian-blurred copy of the image (kernel 11, sigma 5, as in RISE's code) or deleted to the
  per-image mean; area under the curve over 0..1 (insertion: higher is better, deletion: lower).

Removal is by whole patches (the unit every map scores): step ``k`` removes ``P * k // 10`` of the
``P`` patches, ties in a map broken by patch order (a stable sort). One image costs about 45
forwards per method (18 on shortened token sequences, 27 on whole images), so these are
benchmark- and run-level measures, not something to compute on every call.

Sanity check (Adebayo et al., "Sanity Checks for Saliency Maps", NeurIPS 2018): *cascading
randomisation* re-draws the model's blocks from the top layer down, one more at a time, on a copy
of the model, and measures how similar each method's map stays to the map of the trained model
(Spearman rank correlation over the patches, of the maps and of their absolute values). A map that
stays the same while the weights it is meant to explain are destroyed does not explain the model.

Everything here is a pure function of the model, the images, the targets and the maps: the
model's weights are never changed (:func:`randomisation_check` works on a copy).
"""

from __future__ import annotations

import copy
import hashlib
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from vitscope.models.vit import ViT

# torch is imported inside the functions that run the model: the tables' metric names and
# summaries (what `vitscope report` reads) must not cost a torch import.

#: Perturbation steps of Chefer et al.'s curves: 0, 10, ..., 90 % of the patches removed.
CHEFER_STEPS = 10
#: Steps of Petsiuk et al.'s insertion and deletion curves: 0, 10, ..., 100 %.
RISE_STEPS = 11
#: The two forms of removal of the perturbation curves.
REMOVAL_FORMS: tuple[str, ...] = ("tokens", "pixels")

#: metric -> (description, which direction is better). Each is one AUC per image and method.
METRICS: dict[str, tuple[str, str]] = {
    "tokens_pos_acc": ("drop tokens, most relevant first: top-1 accuracy AUC", "lower"),
    "tokens_neg_acc": ("drop tokens, least relevant first: top-1 accuracy AUC", "higher"),
    "tokens_pos_prob": ("drop tokens, most relevant first: target probability AUC", "lower"),
    "tokens_neg_prob": ("drop tokens, least relevant first: target probability AUC", "higher"),
    "pixels_pos_acc": ("mean-fill pixels, most relevant first: top-1 accuracy AUC", "lower"),
    "pixels_neg_acc": ("mean-fill pixels, least relevant first: top-1 accuracy AUC", "higher"),
    "pixels_pos_prob": ("mean-fill pixels, most relevant first: target probability AUC", "lower"),
    "pixels_neg_prob": ("mean-fill pixels, least relevant first: target probability AUC", "higher"),
    "insertion": ("insertion into the blurred image: target probability AUC (RISE)", "higher"),
    "deletion": ("deletion to the mean: target probability AUC (RISE)", "lower"),
}
#: The metrics of each removal form (insertion and deletion change pixels).
FORM_METRICS: dict[str, tuple[str, ...]] = {
    "tokens": tuple(m for m in METRICS if m.startswith("tokens_")),
    "pixels": tuple(m for m in METRICS if not m.startswith("tokens_")),
}


# --------------------------------------------------------------------------- removal
def gaussian_blur(x: torch.Tensor, size: int = 11, sigma: float = 5.0) -> torch.Tensor:
    """Separable Gaussian blur per channel, reflect-padded (so it commutes with the per-channel
    normalisation: blurring the normalised input equals normalising the blurred photo)."""
    import torch
    import torch.nn.functional as F

    r = torch.arange(size, dtype=x.dtype, device=x.device) - (size - 1) / 2
    k = torch.exp(-(r**2) / (2 * sigma**2))
    k = k / k.sum()
    C = x.shape[1]
    pad = size // 2
    y = F.conv2d(F.pad(x, (pad, pad, 0, 0), mode="reflect"), k.view(1, 1, 1, size).expand(C, 1, 1, size), groups=C)
    return F.conv2d(F.pad(y, (0, 0, pad, pad), mode="reflect"), k.view(1, 1, size, 1).expand(C, 1, size, 1), groups=C)


def removal_counts(num_patches: int) -> list[int]:
    """Patches removed at each step: ``P * k // 10`` for ``k = 0..10``."""
    return [num_patches * k // 10 for k in range(RISE_STEPS)]


def supports_token_dropping(vit: "ViT") -> bool:
    """Whether the model runs its blocks on a shortened token sequence (the ``tokens`` removal form).

    Families whose attention carries a bias made for the full grid (BEiT, Data2Vec-Vision) or whose
    attention masks are ``(T, T)`` buffers refuse it; they are scored by ``pixels`` only.
    """
    import torch

    lay = vit.layout
    c, h, w = vit.preprocessing.input_size
    with torch.no_grad():
        seq = vit.embed(torch.zeros(1, c, h, w, device=vit.device, dtype=vit.dtype))
        short = torch.cat([seq[:, : lay.num_prefix], seq[:, lay.patch_slice][:, :1]], dim=1)
        try:
            vit.readout(vit.run_blocks(short))
        except (ValueError, RuntimeError):
            return False
    return True


class _Forwards:
    """The forward passes the curves need, in chunks of at most ``chunk`` rows."""

    def __init__(self, vit: "ViT", chunk: int) -> None:
        import torch

        self.torch = torch
        self.vit = vit
        self.chunk = int(chunk)
        if self.chunk < 1:
            raise ValueError(f"chunk must be a positive number of rows, got {chunk}")

    def probs(self, x: "torch.Tensor") -> "torch.Tensor":
        torch = self.torch
        with torch.no_grad():
            return torch.cat([self.vit.logits(x[i : i + self.chunk]).softmax(-1) for i in range(0, x.shape[0], self.chunk)])

    def probs_rows(self, n: int, make: Any) -> "torch.Tensor":
        """Probabilities of ``n`` input rows built chunk by chunk by ``make(start, stop)``, so the
        perturbed images of a whole curve never sit in memory at once."""
        torch = self.torch
        with torch.no_grad():
            return torch.cat([self.vit.logits(make(i, min(i + self.chunk, n))).softmax(-1) for i in range(0, n, self.chunk)])

    def probs_tokens(self, h: "torch.Tensor") -> "torch.Tensor":
        """Run the blocks and the head on token sequences ``h`` (already embedded)."""
        torch, vit = self.torch, self.vit
        with torch.no_grad():
            return torch.cat(
                [vit.readout(vit.run_blocks(h[i : i + self.chunk])).softmax(-1) for i in range(0, h.shape[0], self.chunk)]
            )


def perturbation_curves(
    vit: "ViT",
    x: torch.Tensor,
    maps: Mapping[str, torch.Tensor],
    target: Any,
    label: Any = None,
    *,
    forms: Sequence[str] = REMOVAL_FORMS,
    chunk: int = 256,
) -> dict[str, dict[str, np.ndarray]]:
    """Every faithfulness curve of every map: ``{method: {metric: (B, steps)}}``.

    Args:
        vit: a model with a classification head.
        x: a preprocessed ``(B, C, H, W)`` batch.
        maps: ``{method: (B, rows, cols)}`` maps over the patch grid (larger = more relevant).
        target: the explained class of each image, ``(B,)``: the probability curves read it.
        label: the class each image's accuracy is measured against, ``(B,)`` (default ``target``).
        forms: ``"tokens"`` and/or ``"pixels"`` (which also gives insertion and deletion).
        chunk: largest batch of one forward pass.

    Accuracy curves hold 0/1 per image and step; the curves' metric names are :data:`METRICS`'
    (``tokens_*`` ten steps 0..90 %, ``pixels_*`` ten steps, insertion and deletion eleven 0..100 %).
    """
    import torch

    vit._require_head()
    forms = _check_forms(forms)
    x = x.to(vit.device, dtype=vit.dtype)
    B = x.shape[0]
    layout = vit.layout
    target = _as_classes(target, B, "target", vit).to(vit.device)
    label = target if label is None else _as_classes(label, B, "label", vit).to(vit.device)
    for method, m in maps.items():
        if tuple(m.shape) != (B, *layout.grid):
            raise ValueError(f"map {method!r} has shape {tuple(m.shape)}; expected (B, rows, cols) = {(B, *layout.grid)}")
    if "tokens" in forms and not supports_token_dropping(vit):
        raise ValueError(
            f"{vit.name} cannot run on a shortened token sequence, which the 'tokens' removal needs; "
            "score it with forms=('pixels',)"
        )
    run = _Forwards(vit, chunk)
    with torch.no_grad():
        h = vit.embed(x)
        p_orig = run.probs_tokens(h)
        mean_img = x.mean(dim=(2, 3), keepdim=True).expand_as(x)
        blurred = gaussian_blur(x) if "pixels" in forms else x
        p_mean = run.probs(mean_img.contiguous()) if "pixels" in forms else p_orig
        p_blur = run.probs(blurred) if "pixels" in forms else p_orig
    return {
        method: _curves(run, x, h, maps[method].to(x.device), target, label, mean_img, blurred, p_orig, p_mean, p_blur, forms)
        for method in maps
    }


def _curves(run: _Forwards, x, h, maps, target, label, mean_img, blurred, p_orig, p_mean, p_blur, forms) -> dict[str, np.ndarray]:
    """Every curve of one method for one batch: ``{name: (B, steps)}`` (accuracy as 0/1)."""
    torch = run.torch
    vit = run.vit
    layout = vit.layout
    B = x.shape[0]
    P = layout.num_patches
    rows, cols = layout.grid
    ph, pw = layout.patch_size
    order = torch.argsort(maps.reshape(B, P), dim=1, descending=True, stable=True)  # most relevant first
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(P, device=order.device).expand(B, P))
    ar = torch.arange(B, device=x.device)

    def at_target(p: torch.Tensor) -> torch.Tensor:  # (S*B, C) -> (S, B) probability of the target
        return p.view(-1, B, p.shape[-1])[:, ar, target]

    def correct(p: torch.Tensor) -> torch.Tensor:
        return (p.view(-1, B, p.shape[-1]).argmax(-1) == label).float()

    n = removal_counts(P)
    p0, a0 = at_target(p_orig)[0], correct(p_orig)[0]
    out: dict[str, torch.Tensor] = {}
    if "tokens" in forms:
        # per step one sequence length, positive and negative in one batch
        prefix = h[:, : layout.num_prefix]
        patches = h[:, layout.patch_slice]
        tok_prob = {"pos": [p0], "neg": [p0]}
        tok_acc = {"pos": [a0], "neg": [a0]}
        for k in range(1, CHEFER_STEPS):
            keep_pos = order[:, n[k] :]  # most relevant removed
            keep_neg = order[:, : P - n[k]]  # least relevant removed
            seqs = []
            for keep in (keep_pos, keep_neg):
                kept = torch.gather(patches, 1, keep[:, :, None].expand(-1, -1, patches.shape[-1]))
                seqs.append(torch.cat([prefix, kept], dim=1))
            p = run.probs_tokens(torch.cat(seqs))
            for j, side in enumerate(("pos", "neg")):
                tok_prob[side].append(at_target(p)[j])
                tok_acc[side].append(correct(p)[j])
        out["tokens_pos_acc"] = torch.stack(tok_acc["pos"], 1)
        out["tokens_neg_acc"] = torch.stack(tok_acc["neg"], 1)
        out["tokens_pos_prob"] = torch.stack(tok_prob["pos"], 1)
        out["tokens_neg_prob"] = torch.stack(tok_prob["neg"], 1)
    if "pixels" in forms:
        # positive and negative mean-fill, then insertion: S steps each, one row per (step, image)
        S = CHEFER_STEPS - 1
        masks = [rank < n[k] for k in range(1, CHEFER_STEPS)] + [rank >= P - n[k] for k in range(1, CHEFER_STEPS)]
        m = torch.stack(masks).view(-1, B, rows, cols)  # (2S, B, rows, cols) True = removed (insertion: inserted)
        total = 3 * S * B

        def make(start: int, stop: int) -> torch.Tensor:
            r = torch.arange(start, stop, device=x.device)
            step, b = r // B, r % B
            filling = step < 2 * S
            cell = m[torch.where(filling, step, step - 2 * S), b]  # the positive masks serve insertion
            pix = cell.repeat_interleave(ph, dim=1).repeat_interleave(pw, dim=2)[:, None]  # (n, 1, H, W)
            removed = torch.where(pix, mean_img[b], x[b])  # removed -> mean
            inserted = torch.where(pix, x[b], blurred[b])  # most relevant inserted into the blurred copy
            return torch.where(filling[:, None, None, None], removed, inserted)

        p = run.probs_rows(total, make)
        prob, acc = at_target(p), correct(p)
        out["pixels_pos_acc"] = torch.cat([a0[:, None], acc[:S].T], 1)
        out["pixels_neg_acc"] = torch.cat([a0[:, None], acc[S : 2 * S].T], 1)
        out["pixels_pos_prob"] = torch.cat([p0[:, None], prob[:S].T], 1)
        out["pixels_neg_prob"] = torch.cat([p0[:, None], prob[S : 2 * S].T], 1)
        # RISE: 0..100 %; deletion shares the positive mean-fill passes
        out["insertion"] = torch.cat([at_target(p_blur)[0][:, None], prob[2 * S : 3 * S].T, p0[:, None]], 1)
        out["deletion"] = torch.cat([p0[:, None], prob[:S].T, at_target(p_mean)[0][:, None]], 1)
    return {k: out[k].double().cpu().numpy() for k in METRICS if k in out}


def curve_auc(curves: np.ndarray, metric: str) -> np.ndarray:
    """Per-image area under ``(N, steps)`` curves of ``metric``: Chefer's x 100 over 0..0.9 (ten
    steps of 0.1), RISE's (``insertion``, ``deletion``) over 0..1 (eleven steps); trapezoid rule."""
    if metric not in METRICS:
        raise ValueError(f"unknown faithfulness metric {metric!r}; metrics are {', '.join(METRICS)}")
    curves = np.asarray(curves, dtype=np.float64)
    if metric in ("insertion", "deletion"):
        return np.trapezoid(curves, dx=1.0 / (RISE_STEPS - 1), axis=1)
    return 100.0 * np.trapezoid(curves, dx=0.1, axis=1)


def faithfulness_aucs(
    vit: "ViT",
    x: torch.Tensor,
    maps: Mapping[str, torch.Tensor],
    target: Any,
    label: Any = None,
    *,
    forms: Sequence[str] = REMOVAL_FORMS,
    chunk: int = 256,
) -> dict[str, dict[str, np.ndarray]]:
    """Per-image AUCs: ``{method: {metric: (B,) float64}}`` (see :func:`perturbation_curves`)."""
    curves = perturbation_curves(vit, x, maps, target, label, forms=forms, chunk=chunk)
    return {method: {k: curve_auc(c, k) for k, c in per.items()} for method, per in curves.items()}


def faithfulness_table(image_ids: Sequence[int], aucs: Mapping[str, Mapping[str, np.ndarray]]) -> pd.DataFrame:
    """One row per (image, method): ``image_id``, ``method`` and one float64 column per metric of
    :data:`METRICS` (NaN for a removal form that was not scored), images in the given order and,
    within an image, methods in ``aucs``' order."""
    ids = np.asarray(list(image_ids), dtype=np.int64)
    methods = list(aucs)
    frame: dict[str, Any] = {
        "image_id": np.repeat(ids, len(methods)),
        "method": np.tile(np.asarray(methods, dtype=object), len(ids)),
    }
    for k in METRICS:
        cols = []
        for m in methods:
            v = aucs[m].get(k)
            cols.append(np.full(len(ids), np.nan) if v is None else np.asarray(v, dtype=np.float64))
            if len(cols[-1]) != len(ids):
                raise ValueError(f"{m}'s {k} has {len(cols[-1])} values for {len(ids)} images")
        frame[k] = np.stack(cols, axis=1).reshape(-1) if methods else np.zeros(0)
    return pd.DataFrame(frame)


def faithfulness_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Mean, standard error and image count of every metric per method, in order of first
    appearance: columns ``method``, ``n``, ``<metric>_mean``, ``<metric>_sem``."""
    rows = []
    for method, part in table.groupby("method", sort=False):
        row: dict[str, Any] = {"method": method, "n": int(len(part))}
        for k in METRICS:
            v = part[k].to_numpy(dtype=np.float64) if k in part else np.zeros(0)
            v = v[np.isfinite(v)]
            row[f"{k}_mean"] = float(v.mean()) if v.size else np.nan
            row[f"{k}_sem"] = float(v.std(ddof=1) / np.sqrt(v.size)) if v.size > 1 else np.nan
        rows.append(row)
    return pd.DataFrame(rows)


def _check_forms(forms: Sequence[str]) -> tuple[str, ...]:
    forms = (forms,) if isinstance(forms, str) else tuple(forms)
    bad = [f for f in forms if f not in REMOVAL_FORMS]
    if bad or not forms:
        raise ValueError(f"forms must be one or both of {', '.join(REMOVAL_FORMS)}, got {list(forms)}")
    return forms


def _as_classes(values: Any, B: int, what: str, vit: "ViT") -> "torch.Tensor":
    from vitscope.analysis.inputs import class_indices  # here: the module imports no torch at load

    return class_indices(values, B, vit.num_classes, what)


# --------------------------------------------------------------------------- cascading randomisation
def copy_model(vit: "ViT") -> "ViT":
    """An independent copy of ``vit`` (weights, attention capture and all) to change freely.

    The backend is deep-copied with its module; the copy gets its own attention runtime (its
    attention is installed afresh, so it never reports to the original's).
    """
    from vitscope.models.vit import ViT

    twin = ViT(
        copy.deepcopy(vit.backend),
        name=vit.name,
        spec=vit.spec,
        layout=vit.layout,
        preprocessing=vit.preprocessing,
        class_names=vit.class_names,
        weights_sha256=None,  # its weights are about to differ from any file
        library=vit.library,
    )
    return twin


def randomise_block(vit: "ViT", layer: int, seed: int = 0) -> None:
    """Re-draw every parameter of block ``layer`` of ``vit`` in place (use it on a :func:`copy_model`).

    Each parameter tensor is replaced by draws from a normal distribution with that tensor's own
    mean and standard deviation (a tensor of one value: its absolute value as the spread). The
    learned values are gone; their scale stays, so activations keep their size and every map stays
    well defined. The generator is seeded by ``seed``, the layer and the parameter's name, so a
    check is reproducible and independent of the order layers are randomised in.
    """
    import torch

    from vitscope.core.indices import check_layer

    layer = check_layer(layer, vit.num_layers, vit.name)
    block = vit.backend.blocks[layer]
    with torch.no_grad():
        for name, p in block.named_parameters():
            digest = hashlib.sha256(f"{int(seed)}|{layer}|{name}".encode()).digest()
            g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
            v = p.detach().to("cpu", torch.float64)
            mean = float(v.mean())
            std = float(v.std()) if v.numel() > 1 else abs(float(v.reshape(-1)[0]))
            draw = torch.randn(p.shape, generator=g, dtype=torch.float64) * std + mean
            p.copy_(draw.to(p.device, p.dtype))


def spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman rank correlation of each row pair of ``a`` and ``b`` ``(N, P)`` (ties: mean ranks);
    NaN where a row is constant."""
    from scipy.stats import rankdata

    ra = rankdata(np.asarray(a, dtype=np.float64), axis=1)
    rb = rankdata(np.asarray(b, dtype=np.float64), axis=1)
    ra = ra - ra.mean(1, keepdims=True)
    rb = rb - rb.mean(1, keepdims=True)
    den = np.sqrt((ra**2).sum(1) * (rb**2).sum(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (ra * rb).sum(1) / np.where(den > 0, den, 1.0), np.nan)


#: The methods :func:`randomisation_check` compares by default (``random`` ignores the model, so
#: its maps never change; ask for it to see that line).
RANDOMISATION_METHODS: tuple[str, ...] = ("attention", "rollout", "grad_rollout", "relevance", "interaction")


def randomisation_check(
    vit: "ViT",
    x: Any,
    methods: Iterable[str] = RANDOMISATION_METHODS,
    target: Any = None,
    *,
    seed: int = 0,
    **options: Any,
) -> pd.DataFrame:
    """Adebayo et al.'s cascading randomisation of ``vit``'s blocks, top layer first.

    Args:
        vit: the model; it is not changed (the blocks of a :func:`copy_model` are randomised).
        x: a preprocessed ``(B, C, H, W)`` batch (or images).
        methods: explanation methods of :mod:`vitscope.analysis.explain`.
        target: the class explained, as in :func:`~vitscope.analysis.explain.explain`; ``None``:
            the trained model's prediction. The same class is explained at every step, so a map
            changes only because the weights did.
        seed: seeds the re-drawn weights (:func:`randomise_block`).
        **options: explanation options (``head_fusion``, ``discard_ratio``, ...).

    Returns one row per (step, method, image): ``randomised`` (number of top blocks re-drawn,
    ``0..L``; 0 is the trained model, similarity 1), ``lowest_layer`` (the lowest re-drawn layer,
    ``L - randomised``; ``L`` when none is), ``method``, ``image`` (position in the batch),
    ``spearman`` (rank correlation over the patches with the trained model's map) and
    ``spearman_abs`` (the same for the absolute values, which ignores a sign flip).
    """
    import torch

    from vitscope.analysis.explain import _as_batch, explain_all

    methods = list(dict.fromkeys([methods] if isinstance(methods, str) else methods))
    x = _as_batch(vit, x)
    B = x.shape[0]
    if target is None:
        with torch.no_grad():
            target = vit.logits(x).argmax(-1)
    base = {m: v.reshape(B, -1).detach().cpu().numpy() for m, v in explain_all(vit, x, methods, target, **options).items()}
    twin = copy_model(vit)
    L = vit.num_layers
    rows: list[dict[str, Any]] = []

    def record(k: int, maps: Mapping[str, np.ndarray]) -> None:
        for m in methods:
            rho = spearman(base[m], maps[m])
            rho_abs = spearman(np.abs(base[m]), np.abs(maps[m]))
            for b in range(B):
                rows.append({"randomised": k, "lowest_layer": L - k, "method": m, "image": b,
                             "spearman": float(rho[b]), "spearman_abs": float(rho_abs[b])})

    record(0, base)
    for k in range(1, L + 1):
        randomise_block(twin, L - k, seed)
        maps = explain_all(twin, x, methods, target, **options)
        record(k, {m: v.reshape(B, -1).detach().cpu().numpy() for m, v in maps.items()})
    return pd.DataFrame(rows)


def randomisation_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Mean and standard error over images of :func:`randomisation_check`'s similarities: one row
    per (method, randomised) with ``n``, ``spearman_mean``, ``spearman_sem``, ``spearman_abs_mean``,
    ``spearman_abs_sem``."""
    out = []
    for (method, k), part in table.groupby(["method", "randomised"], sort=False):
        row: dict[str, Any] = {"method": method, "randomised": int(k), "lowest_layer": int(part["lowest_layer"].iloc[0])}
        for col in ("spearman", "spearman_abs"):
            v = part[col].to_numpy(dtype=np.float64)
            v = v[np.isfinite(v)]
            row["n"] = int(v.size)
            row[f"{col}_mean"] = float(v.mean()) if v.size else np.nan
            row[f"{col}_sem"] = float(v.std(ddof=1) / np.sqrt(v.size)) if v.size > 1 else np.nan
        out.append(row)
    return pd.DataFrame(out)

"""The per-chunk step of ``analyze``: every per-image analysis of one batch of images.

One forward with :meth:`ViT.stream` hands every layer's attention to the strength measures and
the pattern-input pooling (only one layer's attention is alive at a time); :func:`head_sweep`
prunes every head; :func:`taylor_importance` adds the mask-gradient importance.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator, Optional, Sequence

import numpy as np
import pandas as pd
import torch

from vitscope.analysis import importance as imp
from vitscope.analysis import strength as stg

if TYPE_CHECKING:  # pragma: no cover
    from vitscope.models.vit import ViT


@dataclass
class BatchResult:
    """What one chunk of images contributes to a run."""

    images: pd.DataFrame
    image_heads: pd.DataFrame
    arrays: dict[str, np.ndarray]
    #: Further per-image tables (each with the same number of rows per image, in image order):
    #: ``readout_image_heads`` for a model whose readout attends.
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)


def patterns_module() -> Any:
    from vitscope.analysis import patterns

    return patterns


def analyze_batch(
    vit: "ViT",
    x: torch.Tensor,
    labels: torch.Tensor,
    image_ids: Sequence[int],
    *,
    pattern_size: int = 16,
    explain: Sequence[str] = (),
    objective: str = "label",
    stream_dtype: str = "float32",
    timings: Optional[dict[str, float]] = None,
) -> BatchResult:
    """Every per-image analysis of one batch.

    Args:
        x: preprocessed ``(B, C, H, W)`` images; ``labels``: class per image, ``-1`` = unknown (the
            model's own prediction then plays the label's part).
        image_ids: the images' ids, in batch order.
        objective: ``"label"``, or ``"embedding"``: then ``images`` has ``image_id, target (the
            label or -1), embedding_norm`` and ``image_heads`` has ``embedding_change`` instead of
            the label columns and Taylor (see :func:`~vitscope.analysis.importance.head_sweep`).
        stream_dtype: precision of the attention stream (strength, pattern inputs, attention sum):
            ``"float32"``, or ``"bfloat16"`` / ``"float16"`` under autocast; every pruning
            measure runs in the model's own precision regardless.

    Returns rows of ``images`` (``image_id, prediction, probability, target, base_prob,
    base_loss, correct``), rows of ``image_heads`` (one per image, layer, head) and arrays:
    ``pattern_inputs/<kind> (B, L, H, C, S, S)`` for every map kind of
    :func:`~vitscope.analysis.patterns.pattern_inputs` (``offset``, ``patch`` and, with a CLS
    token, ``cls``), ``attention_sum (L, H, T, T)`` (float64 sum of the maps over the batch; only
    where :func:`keeps_mean_attention`) and,
    for each method in ``explain``, ``explain/<method> (B, rows, cols)`` float32: the explanation of
    each image's target (:func:`~vitscope.analysis.explain.explain_all`; their faithfulness is
    scored from these stored maps in the final steps, when the settings ask for it).
    """
    patterns = patterns_module()
    L, H, T = vit.num_layers, vit.num_heads, vit.num_tokens
    B = int(x.shape[0])
    layout = vit.layout
    per_layer: list[Optional[dict[str, np.ndarray]]] = [None] * L
    pat: dict[str, list[Optional[np.ndarray]]] = {}
    # The mean attention matrix is L x H x T x T per run: kept for the web app where it is small,
    # left out for long sequences (a DINOv2-L at 518 px would need 5.8 GB), whose matrices the app
    # computes live; the stream itself holds one layer's maps at a time either way.
    attn_sum = torch.zeros(L, H, T, T, dtype=torch.float64) if keeps_mean_attention(L, H, T) else None

    def on_attention(layer: int, attn: torch.Tensor) -> None:
        # Everything that needs the full maps is computed here, so no layer's maps outlive its block.
        per_layer[layer] = stg.attention_strength(attn, layout)
        for kind, maps in patterns.pattern_inputs(attn, layout, size=pattern_size).items():
            pat.setdefault(kind, [None] * L)[layer] = to_numpy(maps)
        if attn_sum is not None:
            attn_sum[layer] = attn.detach().to(torch.float64).sum(dim=0).cpu()

    clock = Clock(timings)
    with clock("stream"), torch.no_grad(), stream_precision(x.device, stream_dtype):
        vit.stream(x, on_attention=on_attention, maps="softmax")  # distributions over keys (CaiT: before its heads are mixed)
    by_embedding = objective == "embedding"
    with clock("head_sweep"):
        sweep = imp.head_sweep(vit, x, labels, objective=objective)
    ids = np.asarray(list(image_ids), dtype=np.int64)

    def flat(a: np.ndarray) -> np.ndarray:  # (B, L, H) -> (B*L*H,) in (image, layer, head) order
        return np.asarray(a).reshape(B * L * H)

    keys = {
        "image_id": np.repeat(ids, L * H),
        "layer": np.tile(np.repeat(np.arange(L, dtype=np.int64), H), B),
        "head": np.tile(np.arange(H, dtype=np.int64), B * L),
    }
    if by_embedding:
        target = to_numpy(labels).astype(np.int64)
        images = pd.DataFrame({"image_id": ids, "target": target, "embedding_norm": sweep["base_embedding_norm"]})
        ih = pd.DataFrame({**keys, "embedding_change": flat(sweep["embedding_change"]),
                           "layer_change": flat(sweep["layer_change"]), "layer_rel_l2": flat(sweep["layer_rel_l2"])})  # fmt: skip
    else:
        with clock("taylor"):
            taylor = imp.taylor_importance(vit, x, torch.as_tensor(sweep["target"]))
        logits = torch.as_tensor(sweep["base_logits"]).double()
        prediction = np.asarray(sweep["prediction"], dtype=np.int64)
        probability = logits.softmax(-1).numpy()[np.arange(B), prediction]
        target = np.asarray(sweep["target"], dtype=np.int64)
        images = pd.DataFrame(
            {
                "image_id": ids,
                "prediction": prediction,
                "probability": probability,
                "target": target,
                "base_prob": np.asarray(sweep["base_prob"], dtype=np.float64),
                "base_loss": np.asarray(sweep["base_loss"], dtype=np.float64),
                "correct": prediction == target,
            }
        )
        ih = pd.DataFrame(
            {
                **keys,
                "pruned_prob": flat(sweep["pruned_prob"]),
                "pruned_loss": flat(sweep["pruned_loss"]),
                "pruned_correct": flat(sweep["pruned_correct"]).astype(bool),
                "layer_change": flat(sweep["layer_change"]),
                "layer_rel_l2": flat(sweep["layer_rel_l2"]),
                "taylor": flat(taylor).astype(np.float64),
            }
        )

    strength = {k: np.stack([per_layer[l][k] for l in range(L)], axis=1) for k in per_layer[0]}  # type: ignore[index]
    for name in stg.SCALAR_MEASURES:
        ih[name] = flat(strength[name])
    G = strength["hop_profile"].shape[-1]
    ih["hop_profile"] = list(strength["hop_profile"].reshape(B * L * H, G))
    arrays = {f"pattern_inputs/{k}": np.stack(v, axis=1) for k, v in pat.items()}  # type: ignore[arg-type]
    if attn_sum is not None:
        arrays["attention_sum"] = attn_sum.numpy()
    if explain:
        from vitscope.analysis.explain import explain_all

        with clock("explain"):
            # Under the embedding objective only the target-free methods are allowed (settings).
            maps = explain_all(vit, x, list(explain), target=None if by_embedding else torch.as_tensor(target))
        for method, m in maps.items():
            arrays[f"explain/{method}"] = to_numpy(m).astype(np.float32)
    tables = {}
    if not by_embedding and vit.readout_layers:
        with clock("readout_sweep"):
            tables["readout_image_heads"], attention = readout_rows(vit, x, torch.as_tensor(target), ids)
        if attention is not None:
            arrays["readout_attention"] = attention.astype(np.float16)
    return BatchResult(images=images, image_heads=ih, arrays=arrays, tables=tables)


def readout_rows(vit: "ViT", x: torch.Tensor, target: torch.Tensor, ids: np.ndarray) -> tuple[pd.DataFrame, Optional[np.ndarray]]:
    """The readout layers' head sweep as ``readout_image_heads`` rows (image, readout layer, head),
    and their maps ``(B, R, H, Q, K)``."""
    r = imp.readout_head_sweep(vit, x, target)
    B, R, H = r["pruned_prob"].shape
    rows = pd.DataFrame({
        "image_id": np.repeat(ids, R * H),
        "readout_layer": np.tile(np.repeat(np.arange(R, dtype=np.int64), H), B),
        "head": np.tile(np.arange(H, dtype=np.int64), B * R),
        "pruned_prob": r["pruned_prob"].reshape(-1),
        "pruned_loss": r["pruned_loss"].reshape(-1),
        "pruned_correct": r["pruned_correct"].reshape(-1),
    })  # fmt: skip
    return rows, r["attention"]


def merge_batch_results(parts: Sequence[tuple[np.ndarray, BatchResult]]) -> BatchResult:
    """The results of a batch's row groups (each ``(row positions, result)``; e.g. one group per
    probe fold) as one result in the batch's row order; ``attention_sum`` is added up."""
    if len(parts) == 1:
        return parts[0][1]
    order = np.argsort(np.concatenate([p for p, _ in parts]), kind="stable")
    n_images = len(order)

    def in_row_order(frames: list[pd.DataFrame]) -> pd.DataFrame:  # the same number of rows per image in each frame
        t = pd.concat(frames, ignore_index=True)
        per = len(t) // n_images
        return t.iloc[(order[:, None] * per + np.arange(per)).reshape(-1)].reset_index(drop=True)

    images = in_row_order([r.images for _, r in parts])
    ih = in_row_order([r.image_heads for _, r in parts])
    tables = {name: in_row_order([r.tables[name] for _, r in parts]) for name in parts[0][1].tables}
    arrays = {}
    for name in parts[0][1].arrays:
        values = [r.arrays[name] for _, r in parts]
        arrays[name] = np.sum(values, axis=0) if name == "attention_sum" else np.concatenate(values)[order]
    return BatchResult(images=images, image_heads=ih, arrays=arrays, tables=tables)


#: Largest ``L * H * T * T`` for which a run stores the mean attention matrix (512 MiB in float64).
MEAN_ATTENTION_MAX_CELLS = 1 << 26


def keeps_mean_attention(num_layers: int, num_heads: int, num_tokens: int) -> bool:
    """Whether a run of this model stores ``attention_mean`` (see :data:`MEAN_ATTENTION_MAX_CELLS`)."""
    return num_layers * num_heads * num_tokens * num_tokens <= MEAN_ATTENTION_MAX_CELLS


def stream_precision(device: torch.device, dtype: str) -> Any:
    """Autocast to ``dtype`` (``"bfloat16"``/``"float16"``) for the attention stream, or nothing for
    ``"float32"``. Autocast keeps the softmax in float32 and runs the products in half precision."""
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=getattr(torch, dtype))


class Clock:
    """Adds the wall time of ``with clock(name):`` blocks to ``timings[name]`` (no-op without a dict)."""

    def __init__(self, timings: Optional[dict[str, float]]) -> None:
        self.timings = timings

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.timings is not None:
                self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start


def to_numpy(a: Any) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        return a.detach().cpu().numpy()
    return np.asarray(a)

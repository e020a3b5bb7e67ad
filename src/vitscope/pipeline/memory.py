"""How many images a batch of ``analyze`` may hold within a memory budget (``--max-memory``).

The per-batch analyses never hold more than one layer's attention maps per image at a time (the
stream hands each layer's maps on and drops them; the head sweep runs one layer's pruned rows at a
time; Taylor importance recomputes blocks in its backward pass once the maps of every layer would
not fit, :func:`~vitscope.analysis.importance.taylor_keeps_maps`). What grows with the batch is
therefore about one layer's maps and a few copies of the residual stream per image. The estimate
below counts those buffers with factors measured on ViT-B/16, ViT-L/14 and a DINOv2-L at 518 px
(``benchmarks/bench_big_models.py``; BENCHMARKS.md), rounded up, so that a batch it admits fits.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Union

if TYPE_CHECKING:  # pragma: no cover
    from vitscope.models.vit import ViT

#: Float32 buffers alive at the peak, in units of one layer's maps (H x T x T) per image: the scores,
#: the softmax and its copies in the strength and pattern measures, or the backward's gradients.
MAP_COPIES = 5.0
#: ... and in units of one residual stream (T x D) per image per layer: the sweep's recorded
#: streams and contexts, Taylor's checkpointed block inputs, the MLP's hidden activations.
STREAM_COPIES_PER_LAYER = 3.0
#: The MLP's hidden activations (T x 4D) and their gradients in the block being run.
MLP_COPIES = 4.0

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "m": 1 << 20, "mb": 1 << 20, "g": 1 << 30, "gb": 1 << 30,
          "t": 1 << 40, "tb": 1 << 40, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


def parse_size(text: Union[str, int]) -> int:
    """``"8G"``, ``"512MB"``, ``"1.5GiB"`` or a number of bytes -> bytes (powers of 1024)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot read {text!r} as a memory size; write e.g. 8G, 512M or 1.5GiB")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def _gb(n: float) -> str:
    return f"{n / (1 << 30):.2f} GiB"


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak bytes of one batch of ``analyze``: the model's weights plus ``per_image`` per image."""

    weights: int
    per_image: int

    def batch(self, n: int) -> int:
        return self.weights + n * self.per_image


def estimate_memory(vit: "ViT") -> MemoryEstimate:
    """The peak memory of ``analyze``'s per-batch work for ``vit`` (float32), see the module text."""
    from vitscope.analysis.importance import taylor_keeps_maps

    L, H, T = vit.num_layers, vit.num_heads, vit.num_tokens
    D = int(getattr(vit.module, "embed_dim", 0) or getattr(getattr(vit.module, "config", None), "hidden_size", 0) or 768)
    one_map = H * T * T * 4
    per_image = MAP_COPIES * one_map + STREAM_COPIES_PER_LAYER * (L + 1) * T * D * 4 + MLP_COPIES * T * 4 * D * 4
    if taylor_keeps_maps(vit, 1):  # short sequences: Taylor's backward keeps every layer's maps
        per_image = max(per_image, 3 * L * one_map + 2 * (L + 1) * T * D * 4 * 4)
    weights = sum(p.numel() * p.element_size() for p in vit.module.parameters())
    return MemoryEstimate(int(weights), int(per_image))


def fit_batch_size(vit: "ViT", batch_size: int, max_memory: Union[str, int]) -> int:
    """The largest batch up to ``batch_size`` whose estimated peak fits ``max_memory``; a clear error
    when not even one image fits."""
    budget = parse_size(max_memory)
    est = estimate_memory(vit)
    fits = (budget - est.weights) // est.per_image if budget > est.weights else 0
    if fits < 1:
        raise ValueError(
            f"{vit.name} ({vit.num_layers} layers x {vit.num_heads} heads, {vit.num_tokens} tokens) needs about "
            f"{_gb(est.batch(1))} for one image ({_gb(est.weights)} of weights, {_gb(est.per_image)} per image), more than "
            f"--max-memory {_gb(budget)}. Raise --max-memory, use a smaller input size, or analyse on a machine with more memory."
        )
    return int(min(batch_size, fits))

"""Checking layer and head indices the same way everywhere, with messages that name the model."""

from __future__ import annotations

from typing import Optional, Sequence


def select_layers(layers: Optional[Sequence[int]], num_layers: int, owner: str = "the model", *, allow_empty: bool = True) -> list[int]:
    """``layers`` (None = all) as sorted unique indices, each checked against ``num_layers``."""
    if layers is None:
        return list(range(num_layers))
    sel = sorted({int(l) for l in layers})
    bad = [l for l in sel if not 0 <= l < num_layers]
    if bad:
        raise ValueError(f"layers {bad} out of range: {owner} has layers 0..{num_layers - 1}")
    if not sel and not allow_empty:
        raise ValueError("layers is empty; pass None for every layer")
    return sel


def check_layer(layer: int, num_layers: int, owner: str = "the model") -> int:
    if not 0 <= int(layer) < num_layers:
        raise ValueError(f"layer {layer} out of range: {owner} has layers 0..{num_layers - 1}")
    return int(layer)


def check_head(layer: int, head: int, num_layers: int, num_heads: int, owner: str = "the model") -> tuple[int, int]:
    check_layer(layer, num_layers, owner)
    if not 0 <= int(head) < num_heads:
        raise ValueError(f"head {head} out of range: {owner} has heads 0..{num_heads - 1} in every layer")
    return int(layer), int(head)

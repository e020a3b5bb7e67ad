"""Pruning masks: named regions of a head's attention matrix and their normalisation.

A mask multiplies the post-softmax attention; pruned cells become 0 and rows are *not*
renormalised (Li et al. 2023, "Pruning"). Users describe masks as ``{(layer, head): region}`` where
``head=None`` means every head of the layer; this module turns that into per-layer
:class:`~vitscope.capture.runtime.LayerPlan` pieces. Whole-head pruning is expressed as a head gate
so it keeps the fused kernel; every other region needs the explicit matrix.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, Optional, Union

import torch

if TYPE_CHECKING:  # pragma: no cover
    from vitscope.core.layout import TokenLayout

#: Region names, in the order of the paper's partial-pruning modes 2..6 (mode 1 is "none").
REGIONS: tuple[str, ...] = ("all", "cls", "patch", "cls_cross", "cls_self")

Region = Union[str, torch.Tensor]
MaskSpec = Mapping[tuple[int, Optional[int]], Region]


def regions_for(layout: "TokenLayout") -> tuple[str, ...]:
    """The regions that exist for ``layout``, in :data:`REGIONS` order: all five with a CLS token;
    ``"all"`` and ``"patch"`` for a model without one (SigLIP-style models that pool patches)."""
    return REGIONS if layout.cls_index is not None else tuple(r for r in REGIONS if not r.startswith("cls"))


def region_matrix(region: str, layout: "TokenLayout") -> torch.Tensor:
    """Boolean ``(T, T)`` matrix, True where ``region`` prunes (rows: queries, columns: keys).

    - ``"all"``: every cell.
    - ``"cls"``: the CLS row and the CLS column.
    - ``"patch"``: the patch->patch block (patch queries attending to patch keys).
    - ``"cls_cross"``: the CLS row and column without the CLS->CLS cell.
    - ``"cls_self"``: the CLS->CLS cell only.

    With other prefix tokens (DeiT's distillation token, register tokens) the regions stay exactly
    these cells: the ``cls*`` regions touch only the CLS token's row and column (so they do include
    the CLS<->distillation and CLS<->register cells, and nothing else of those tokens' rows and
    columns), and ``"patch"`` is only patch queries x patch keys (no prefix token's row or column).
    The distillation and register tokens' own rows and columns are pruned only by ``"all"`` or a
    boolean mask. A model without a CLS token has ``"all"`` and ``"patch"`` (:func:`regions_for`).
    """
    T = layout.num_tokens
    m = torch.zeros(T, T, dtype=torch.bool)
    if region == "all":
        m[:] = True
        return m
    if region == "patch":
        p = layout.patch_slice
        m[p, p] = True
        return m
    if region in ("cls", "cls_cross", "cls_self"):
        if layout.cls_index is None:
            raise ValueError(
                f"region {region!r} needs a CLS token, but this model has none "
                "(it pools patch tokens); use 'all', 'patch' or a boolean (T, T) mask instead"
            )
        c = layout.cls_index
        if region == "cls_self":
            m[c, c] = True
            return m
        m[c, :] = True
        m[:, c] = True
        if region == "cls_cross":
            m[c, c] = False
        return m
    raise ValueError(f"unknown mask region {region!r}; use one of {', '.join(REGIONS)} or a boolean (T, T) tensor")


def compile_masks(
    masks: Optional[MaskSpec],
    *,
    num_layers: int,
    num_heads: int,
    layout: "TokenLayout",
    device: torch.device | str | None = None,
) -> dict[int, tuple[Optional[torch.Tensor], Optional[torch.Tensor]]]:
    """Turn ``{(layer, head): region}`` into ``{layer: (keep, head_gate)}``.

    ``keep`` is a float tensor ``(B or 1, H, T, T)`` (1 keeps, 0 prunes) and ``head_gate`` a float
    tensor ``(1, H)``; either may be ``None``. A boolean region tensor may be ``(T, T)`` or
    ``(B, T, T)``: the latter prunes a different region in each batch element, which is how
    analyses batch many ablations into one forward.
    """
    out: dict[int, tuple[Optional[torch.Tensor], Optional[torch.Tensor]]] = {}
    if not masks:
        return out
    T = layout.num_tokens
    keeps: dict[int, list[tuple[Optional[int], torch.Tensor]]] = {}
    gates: dict[int, torch.Tensor] = {}
    for key, region in masks.items():
        if not (isinstance(key, tuple) and len(key) == 2):
            raise ValueError(f"mask key {key!r} must be a (layer, head) tuple; use head=None for every head of the layer")
        layer, head = key
        if not isinstance(layer, int) or not 0 <= layer < num_layers:
            raise ValueError(f"mask key {key!r}: layer must be an int in 0..{num_layers - 1}")
        if head is not None and (not isinstance(head, int) or not 0 <= head < num_heads):
            raise ValueError(f"mask key {key!r}: head must be None or an int in 0..{num_heads - 1}")
        if isinstance(region, str) and region == "all":
            g = gates.setdefault(layer, torch.ones(1, num_heads, device=device))
            if head is None:
                g[:] = 0.0
            else:
                g[:, head] = 0.0
            continue
        if isinstance(region, str):
            m = region_matrix(region, layout)
        elif isinstance(region, torch.Tensor):
            if region.dtype != torch.bool:
                raise ValueError(f"mask for {key!r}: a tensor region must be boolean (True = pruned), got {region.dtype}")
            if region.shape[-2:] != (T, T) or region.dim() not in (2, 3):
                raise ValueError(
                    f"mask for {key!r}: expected shape ({T}, {T}) or (B, {T}, {T}) for this model's {T} tokens, "
                    f"got {tuple(region.shape)}"
                )
            m = region
        else:
            raise ValueError(f"mask for {key!r}: expected a region name ({', '.join(REGIONS)}) or a boolean tensor, got {type(region).__name__}")
        keeps.setdefault(layer, []).append((head, m.to(device) if device is not None else m))

    for layer in sorted(set(keeps) | set(gates)):
        keep = None
        if layer in keeps:
            batch = max((m.shape[0] if m.dim() == 3 else 1) for _, m in keeps[layer])
            keep = torch.ones(batch, num_heads, T, T, device=device)
            for head, m in keeps[layer]:
                m3 = m if m.dim() == 3 else m.unsqueeze(0)
                if m3.shape[0] not in (1, batch):
                    raise ValueError(f"layer {layer}: batched masks disagree on batch size ({m3.shape[0]} vs {batch})")
                sel = slice(None) if head is None else slice(head, head + 1)
                keep[:, sel] = keep[:, sel] * (~m3).unsqueeze(1).to(keep.dtype)
        out[layer] = (keep, gates.get(layer))
    return out

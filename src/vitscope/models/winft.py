"""The window-free transformer (WinfT): a ViT whose attention follows a reference model's responsive fields.

Definition (Ma et al. 2022, "WinfT"). In every layer ``l`` each patch query ``i`` may attend only
to the keys in an allowed set ``M[l, i]``; keys outside it are removed *before* the softmax, so the
row is renormalised over the allowed keys, exactly like windowed attention. Prefix tokens (CLS,
distillation, registers) attend to every token and every query may attend to them. The sets come
from the responsive fields of a trained reference model
(:func:`vitscope.analysis.fields.winft_masks_from_fields`: the keys
whose first-order interaction impact is significantly positive over training images, plus the query
itself), so each patch gets a window of its own shape and size instead of a fixed square.

The same class covers the two baselines of the experiment, so all three arms share one architecture,
parameter count and training recipe:

- ``masks=None, window=None``: every mask is all-True, i.e. the plain ViT;
- ``window=k``: the fixed ``k x k`` window around each patch (Chebyshev radius ``(k - 1) / 2`` on the
  patch grid, clipped at the border; ``k = 2 * max(grid) - 1`` is global);
- ``masks=``: a boolean ``(L, T, T)`` (or patch-block ``(L, P, P)``) tensor, or the path of a file
  written by :func:`save_masks`.

Implementation. :class:`WinfT` is a timm ``VisionTransformer`` whose blocks (:class:`WinfTBlock`)
keep their layer's mask as a registered buffer ``blocks.<l>.attn_allowed`` and pass it to timm's own
``Attention`` as ``attn_mask`` (``scaled_dot_product_attention`` boolean mask, True = attend). The
mask therefore travels in the state dict and in the ``.safetensors`` file ``vitscope train`` writes,
and :func:`vitscope.load_model` restores it from the weights alone. The mask lives in the block, not
in one ``(L, T, T)`` model buffer, because timm's ``forward_intermediates`` and vitscope's analysis
backend call the blocks one by one (a model buffer would need per-layer views, and safetensors
refuses tensors that share storage).

Architectures registered with timm (``timm.create_model(name, masks=..., window=...)``):
``winft_fmnist_tiny`` (the size of the built-in ``fmnist_vit_tiny``), ``winft_tiny_patch16_224``,
``winft_small_patch16_224`` and ``winft_base_patch16_224`` (DeiT/ViT Tiny, Small, Base).

Note on cost: the masked attention runs the dense fused kernel with a mask, so a sparse mask does
not make a WinfT faster than the plain ViT; all three arms of the experiment run the same kernel.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
from timm.layers import Attention
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from vitscope.core.layout import TokenLayout
from vitscope.models.builtin import FMNIST_VIT_TINY_ARGS, fmnist_pretrained_cfg
from vitscope.models.backends.timm import timm_layout

#: Tensor name of the masks in a mask file written by :func:`save_masks`.
MASKS_KEY = "masks"
#: safetensors metadata key of a mask file (JSON: layout and how the masks were made).
MASKS_META = "vitscope.winft_masks"
#: Name of each block's mask buffer in the state dict (``blocks.<l>.attn_allowed``).
BUFFER_NAME = "attn_allowed"

MaskSource = Union[None, str, Path, torch.Tensor, np.ndarray, Sequence[Any]]


class WinfTMaskError(ValueError):
    """Attention masks that a WinfT cannot use (the message names the problem and the fix)."""


# --------------------------------------------------------------------------------------------------
# Layout and mask helpers (no model needed)
# --------------------------------------------------------------------------------------------------


def layout_of(model: nn.Module) -> TokenLayout:
    """The token layout of a timm ``VisionTransformer`` (prefix tokens, patch grid), without touching the model."""
    return timm_layout(model)


def window_masks(layout: TokenLayout, k: int, num_layers: int) -> torch.Tensor:
    """Fixed ``k x k`` local windows in every layer, ``(L, T, T)`` bool (prefix rows and columns all True)."""
    from vitscope.core.grid import window_mask

    m = torch.from_numpy(window_mask(layout, k))
    return m.expand(num_layers, *m.shape).clone()


def expand_patch_masks(keys: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """Patch-block key sets ``(L, P, P)`` -> full ``(L, T, T)`` masks with global prefix tokens."""
    from vitscope.core.grid import allowed_from_keys

    return torch.from_numpy(allowed_from_keys(keys.cpu().numpy(), layout))


def check_masks(masks: torch.Tensor, layout: TokenLayout, num_layers: int, what: str = "masks") -> torch.Tensor:
    """Validate allowed-key masks for a model and return them as a contiguous CPU bool ``(L, T, T)`` tensor.

    Accepts ``(L, T, T)`` or the patch block ``(L, P, P)`` (prefix tokens are then made global).
    Requires prefix rows and columns to be all True (CLS attends and is attended globally) and every
    query to keep at least one key.
    """
    m = torch.as_tensor(masks).detach().cpu()
    if m.dtype != torch.bool:
        uniq = torch.unique(m)
        if not bool(((uniq == 0) | (uniq == 1)).all()):
            raise WinfTMaskError(f"{what} must be boolean (True = may attend); got dtype {m.dtype} with values other than 0/1")
        m = m.bool()
    L, P, T, pre = num_layers, layout.num_patches, layout.num_tokens, layout.num_prefix
    if m.shape == (L, P, P) and P != T:
        m = expand_patch_masks(m, layout)
    if m.shape != (L, T, T):
        raise WinfTMaskError(
            f"{what} have shape {tuple(m.shape)}, but this model needs ({L}, {T}, {T}) (layers, query tokens, key tokens) "
            f"or the patch block ({L}, {P}, {P}); derive them from a reference model with the same depth and grid"
        )
    if pre and not (bool(m[:, :pre, :].all()) and bool(m[:, :, :pre].all())):
        raise WinfTMaskError(f"{what}: prefix tokens (CLS etc., the first {pre} rows and columns) must attend and be attended globally")
    empty = ~m.any(-1)
    if bool(empty.any()):
        layer, query = (int(v) for v in empty.nonzero()[0])
        raise WinfTMaskError(f"{what}: query token {query} of layer {layer} may attend to no key; every query needs at least one (e.g. itself)")
    return m.contiguous()


def save_masks(masks: torch.Tensor, path: Union[str, Path], layout: TokenLayout, info: Optional[Mapping[str, Any]] = None) -> Path:
    """Write masks ``(L, T, T)`` to a ``.safetensors`` file that ``masks=PATH`` and :func:`read_masks` accept.

    ``info`` (JSON-serialisable) is stored next to the layout in the file's metadata, e.g. the
    reference model and the field settings the masks came from.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise WinfTMaskError(f"mask file {path} must end in .safetensors")
    m = check_masks(masks, layout, int(torch.as_tensor(masks).shape[0]))
    meta = {
        "grid": list(layout.grid),
        "num_prefix": layout.num_prefix,
        "patch_size": list(layout.patch_size),
        "cls_index": layout.cls_index,
        **mask_stats(m, layout),
        **dict(info or {}),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({MASKS_KEY: m}, str(tmp), metadata={MASKS_META: json.dumps(meta)})
    tmp.replace(path)
    return path


def read_mask_file(path: Union[str, Path]) -> tuple[torch.Tensor, dict[str, Any]]:
    """Masks and metadata from a file: a :func:`save_masks` file, a ``.pt`` holding a tensor (or a dict
    with ``"masks"``), or a WinfT weights file written by ``vitscope train`` (``blocks.<l>.attn_allowed``)."""
    path = Path(path)
    if not path.is_file():
        raise WinfTMaskError(f"mask file {path} does not exist; write one with vitscope.models.winft.save_masks")
    meta: dict[str, Any] = {}
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
        meta = json.loads(raw[MASKS_META]) if MASKS_META in raw else {}
        tensors = load_file(str(path))
    else:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
        tensors = {MASKS_KEY: obj} if isinstance(obj, torch.Tensor) else dict(obj) if isinstance(obj, dict) else {}
    if MASKS_KEY in tensors:
        return tensors[MASKS_KEY], meta
    per_block = sorted(
        ((int(k.split(".")[1]), v) for k, v in tensors.items() if k.startswith("blocks.") and k.endswith("." + BUFFER_NAME)),
        key=lambda kv: kv[0],
    )
    if per_block:
        return torch.stack([v for _, v in per_block]), meta
    raise WinfTMaskError(f"{path} holds neither a {MASKS_KEY!r} tensor nor WinfT block masks (blocks.<l>.{BUFFER_NAME})")


# --------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------


class WinfTBlock(Block):
    """A timm ``Block`` whose attention is restricted to a fixed allowed-key mask (buffer ``attn_allowed``, ``(T, T)`` bool).

    The mask is handed to timm's ``Attention`` as ``attn_mask`` (True = may attend), which the fused
    kernel applies before the softmax. A mask passed by the caller is combined with it (both must
    allow a key).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Filled by WinfT once the number of tokens is known.
        self.register_buffer(BUFFER_NAME, None)

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False) -> torch.Tensor:
        allowed = getattr(self, BUFFER_NAME)
        if allowed is None:
            raise RuntimeError("WinfTBlock has no attention mask; build it through WinfT, which sets one per block")
        if allowed.shape[-1] != x.shape[1]:
            raise WinfTMaskError(
                f"this block's attention mask is for {allowed.shape[-1]} tokens but the input has {x.shape[1]}; "
                "a WinfT runs only at the image size its masks were made for"
            )
        if is_causal:
            raise WinfTMaskError("a WinfT block does not combine its field mask with causal masking")
        if attn_mask is not None:
            if attn_mask.dtype == torch.bool:
                allowed = allowed & attn_mask
            else:  # an additive float mask: add -inf where the field forbids the key
                allowed = attn_mask.masked_fill(~allowed, float("-inf"))
        return super().forward(x, attn_mask=allowed)


class WinfT(VisionTransformer):
    """A timm ``VisionTransformer`` whose attention in layer ``l`` is restricted to ``masks[l]``.

    Args:
        masks: allowed keys, ``(L, T, T)`` or ``(L, P, P)`` boolean tensor/array, or the path of a
            mask file (:func:`save_masks`, a ``.pt`` tensor, or a WinfT weights file). Prefix tokens must
            be global and every query must keep a key.
        window: instead of ``masks``, a fixed odd ``k x k`` window around every patch in every layer.
        **kwargs: ``VisionTransformer`` arguments (``block_fn`` is always :class:`WinfTBlock`).

    Without ``masks`` and ``window`` every mask is all-True: the plain ViT.
    """

    def __init__(self, *, masks: MaskSource = None, window: Optional[int] = None, **kwargs: Any) -> None:
        if kwargs.pop("block_fn", WinfTBlock) is not WinfTBlock:
            raise ValueError("WinfT always uses WinfTBlock; do not pass block_fn")
        if kwargs.get("dynamic_img_size"):
            raise ValueError("WinfT masks are tied to one token grid; dynamic_img_size is not supported")
        super().__init__(block_fn=WinfTBlock, **kwargs)
        for i, blk in enumerate(self.blocks):
            if type(blk.attn) is not Attention:  # the fused path with attn_mask is what we rely on
                raise ValueError(f"block {i} uses {type(blk.attn).__name__}; WinfT needs timm's standard Attention")
        self.set_masks(self._initial_masks(masks, window))

    def _initial_masks(self, masks: MaskSource, window: Optional[int]) -> torch.Tensor:
        layout, L = self.token_layout, len(self.blocks)
        if masks is not None and window is not None:
            raise WinfTMaskError("give either masks= or window=, not both")
        if window is not None:
            return window_masks(layout, int(window), L)
        if masks is None:
            return torch.ones(L, layout.num_tokens, layout.num_tokens, dtype=torch.bool)
        if isinstance(masks, (str, Path)):
            masks, _meta = read_mask_file(masks)
        return torch.as_tensor(np.asarray(masks) if isinstance(masks, (list, tuple)) else masks)

    @property
    def token_layout(self) -> TokenLayout:
        return layout_of(self)

    def set_masks(self, masks: torch.Tensor) -> None:
        """Replace every layer's allowed-key mask (``(L, T, T)`` or ``(L, P, P)`` bool, validated)."""
        m = check_masks(masks, self.token_layout, len(self.blocks))
        device = next(self.parameters()).device
        for blk, layer_mask in zip(self.blocks, m):
            setattr(blk, BUFFER_NAME, layer_mask.clone().to(device))

    def allowed_masks(self) -> torch.Tensor:
        """Every layer's allowed-key mask, ``(L, T, T)`` bool (True = the query may attend to the key)."""
        return torch.stack([getattr(blk, BUFFER_NAME) for blk in self.blocks])

    def mask_stats(self) -> dict[str, Any]:
        """Key budget and sparsity of the masks (see :func:`mask_stats`)."""
        return mask_stats(self.allowed_masks(), self.token_layout)


def mask_stats(masks: torch.Tensor, layout: TokenLayout) -> dict[str, Any]:
    """Key budget of allowed-key masks ``(L, T, T)``, counted over patch queries and patch keys.

    - ``keys_per_query``: mean number of patch keys a patch query may attend to (over layers and
      queries): the attention budget compared between a WinfT and a fixed window;
    - ``keys_per_query_by_layer``: the same per layer;
    - ``sparsity``: share of patch-to-patch edges removed, ``1 - keys_per_query / P``;
    - ``token_sparsity``: share of all ``T x T`` cells removed (prefix tokens included);
    - ``key_distance``: mean Chebyshev distance on the patch grid (in patches) from a patch query to
      its allowed patch keys other than itself (1.0 for a 3x3 window; NaN when no such key), and
      ``key_distance_by_layer``: how local the masks are;
    - ``num_patches``.
    """
    m = torch.as_tensor(masks).bool().cpu()
    ps = layout.patch_slice
    block = m[:, ps, ps]
    per_layer = block.double().sum(-1).mean(-1)
    P = layout.num_patches
    kpq = float(per_layer.mean())
    pos = layout.patch_positions()
    cheb = (pos[:, None, :] - pos[None, :, :]).abs().amax(-1).double()  # (P, P)
    others = block & ~torch.eye(P, dtype=torch.bool)
    count = others.double().sum((-1, -2))
    dist_by_layer = (others.double() * cheb).sum((-1, -2)) / count  # NaN where a layer has no such key
    total = float(count.sum())
    return {
        "keys_per_query": kpq,
        "keys_per_query_by_layer": [float(v) for v in per_layer],
        "sparsity": 1.0 - kpq / P,
        "token_sparsity": float(1.0 - m.double().mean()),
        "key_distance": float((others.double() * cheb).sum() / total) if total else math.nan,
        "key_distance_by_layer": [float(v) for v in dist_by_layer],
        "num_patches": P,
    }


# --------------------------------------------------------------------------------------------------
# timm registration
# --------------------------------------------------------------------------------------------------


def _imagenet_cfg() -> dict[str, Any]:
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    return {
        "url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None, "crop_pct": 0.9,
        "interpolation": "bicubic", "fixed_input_size": True, "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj", "classifier": "head",
    }  # fmt: skip


def _fmnist_cfg() -> dict[str, Any]:
    cfg = fmnist_pretrained_cfg()
    return {**cfg, "url": "", "fixed_input_size": True, "first_conv": "patch_embed.proj", "classifier": "head"}


default_cfgs = generate_default_cfgs({
    "winft_fmnist_tiny": _fmnist_cfg(),
    "winft_tiny_patch16_224": _imagenet_cfg(),
    "winft_small_patch16_224": _imagenet_cfg(),
    "winft_base_patch16_224": _imagenet_cfg(),
})  # fmt: skip

#: Architecture of each registered WinfT (the ViT it is the same size as).
WINFT_ARCHS: dict[str, dict[str, Any]] = {
    "winft_fmnist_tiny": dict(FMNIST_VIT_TINY_ARGS),
    "winft_tiny_patch16_224": dict(patch_size=16, embed_dim=192, depth=12, num_heads=3),
    "winft_small_patch16_224": dict(patch_size=16, embed_dim=384, depth=12, num_heads=6),
    "winft_base_patch16_224": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12),
}


def _create(variant: str, pretrained: bool, kwargs: dict[str, Any]) -> WinfT:
    if pretrained:
        raise ValueError(
            f"{variant} has no pretrained weights to download: train one with `vitscope train --arch {variant}` "
            "and load it with vitscope.load_model(PATH)"
        )
    args = {**WINFT_ARCHS[variant], **kwargs}
    return build_model_with_cfg(WinfT, variant, False, feature_cfg=dict(out_indices=3, feature_cls="getter"), **args)


@register_model
def winft_fmnist_tiny(pretrained: bool = False, **kwargs: Any) -> WinfT:
    """WinfT the size of the built-in Fashion-MNIST ViT: 6 layers, 4 heads, width 64, 7x7 grid of 4 px patches + CLS."""
    return _create("winft_fmnist_tiny", pretrained, kwargs)


@register_model
def winft_tiny_patch16_224(pretrained: bool = False, **kwargs: Any) -> WinfT:
    """WinfT the size of ViT/DeiT-Tiny: 12 layers, 3 heads, width 192, 14x14 grid of 16 px patches + CLS."""
    return _create("winft_tiny_patch16_224", pretrained, kwargs)


@register_model
def winft_small_patch16_224(pretrained: bool = False, **kwargs: Any) -> WinfT:
    """WinfT the size of ViT/DeiT-Small: 12 layers, 6 heads, width 384, 14x14 grid of 16 px patches + CLS."""
    return _create("winft_small_patch16_224", pretrained, kwargs)


@register_model
def winft_base_patch16_224(pretrained: bool = False, **kwargs: Any) -> WinfT:
    """WinfT the size of ViT/DeiT-Base: 12 layers, 12 heads, width 768, 14x14 grid of 16 px patches + CLS."""
    return _create("winft_base_patch16_224", pretrained, kwargs)

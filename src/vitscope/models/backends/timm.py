"""timm Vision Transformers (``VisionTransformer`` and its subclasses, e.g. DeiT, distilled DeiT)."""

from __future__ import annotations

import dataclasses
import types
from typing import Optional

import torch
from torch import nn

from vitscope.capture.runtime import AttentionRuntime
from vitscope.core.layout import TokenLayout
from vitscope.models.errors import UnsupportedModelError


def _patched_forward(runtime: AttentionRuntime, layer: int, original):
    """A forward for ``timm.layers.Attention`` that routes through vitscope's kernel when asked.

    Mirrors timm's own forward line by line; with no plan for this layer it calls the original
    (fused) forward untouched.
    """

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False, **kw):
        plan = runtime.plan_for(layer)
        if plan is None:
            return original(x, attn_mask=attn_mask, is_causal=is_causal, **kw) if (attn_mask is not None or is_causal or kw) else original(x)
        if is_causal or (attn_mask is not None and attn_mask.dtype != torch.bool):
            raise NotImplementedError("vitscope analyses boolean attention masks only (no causal or additive float masks)")
        if attn_mask is not None:
            # A model that restricts its own attention (WinfT, windowed baselines) keeps doing so
            # under analysis: its mask joins the plan's allowed keys.
            plan = dataclasses.replace(plan, allowed=attn_mask if plan.allowed is None else plan.allowed & attn_mask)
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if getattr(self, "gate", None) is not None else None
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        x = runtime.attend(plan, layer, q, k, v, self.scale, self.attn_drop.p if self.training else 0.0)
        x = x.transpose(1, 2).reshape(B, N, self.num_heads * self.head_dim)
        x = self.norm(x) if hasattr(self, "norm") else x
        if gate is not None:
            x = x * gate
        x = self.proj(x)
        return self.proj_drop(x)

    return forward


class TimmBackend:
    """Adapts a timm ``VisionTransformer`` to vitscope's uniform interface (:class:`~vitscope.models.backends.base.Backend`)."""

    library = "timm"

    def __init__(self, model: nn.Module) -> None:
        from timm.layers import Attention
        from timm.models.vision_transformer import VisionTransformer

        name = type(model).__name__
        if not isinstance(model, VisionTransformer):
            hint = (
                " Windowed attention (Swin and similar) is not supported yet: vitscope's analyses need every "
                "token to attend to every token."
                if "swin" in name.lower() or hasattr(model, "layers") and not hasattr(model, "blocks")
                else ""
            )
            raise UnsupportedModelError(
                f"cannot analyse timm model class {name}: vitscope supports timm's VisionTransformer family "
                f"(vit_*, deit_*, and models built on it).{hint}"
            )
        blocks = list(model.blocks)
        if not blocks:
            raise UnsupportedModelError(f"{name} has no attention blocks to analyse")
        for i, blk in enumerate(blocks):
            attn = getattr(blk, "attn", None)
            if type(attn) is not Attention:
                raise UnsupportedModelError(
                    f"block {i} of {name} uses attention class {type(attn).__name__}; vitscope supports timm's "
                    "standard global `timm.layers.Attention` (no rotary or windowed variants yet)"
                )
        self.module = model.eval()
        self.blocks = blocks
        self.num_heads = blocks[0].attn.num_heads
        self.num_classes: Optional[int] = getattr(model, "num_classes", None) or None

    def install(self, runtime: AttentionRuntime) -> None:
        for i, blk in enumerate(self.blocks):
            attn = blk.attn
            original = getattr(attn, "_vitscope_original_forward", None) or attn.forward
            attn._vitscope_original_forward = original
            attn.forward = types.MethodType(_patched_forward(runtime, i, original), attn)

    def layout(self, input_size: Optional[tuple[int, int, int]] = None) -> TokenLayout:
        """The token layout (a timm ViT knows its grid; ``input_size`` is accepted for the protocol)."""
        return timm_layout(self.module)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        m = self.module
        return m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x))))

    def run_block(self, i: int, h: torch.Tensor) -> torch.Tensor:
        return self.blocks[i](h)

    def readout(self, h: torch.Tensor) -> torch.Tensor:
        m = self.module
        return m.forward_head(m.norm(h))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)


def timm_layout(m: nn.Module) -> TokenLayout:
    """The token layout of a timm ``VisionTransformer`` from its attributes alone (no forward):
    CLS, then the distillation token, then registers, then the patch grid."""
    has_cls = getattr(m, "cls_token", None) is not None
    dist = getattr(m, "dist_token", None) is not None
    n_reg = int(getattr(m, "num_reg_tokens", 0) or 0)
    idx = 0
    cls_index = None
    if has_cls:
        cls_index, idx = 0, 1
    dist_index = None
    if dist:
        dist_index, idx = idx, idx + 1
    regs = tuple(range(idx, idx + n_reg))
    num_prefix = int(m.num_prefix_tokens)
    grid = tuple(int(g) for g in m.patch_embed.grid_size)
    patch = tuple(int(p) for p in m.patch_embed.patch_size)
    return TokenLayout(num_prefix, cls_index, dist_index, regs, grid, patch)  # type: ignore[arg-type]

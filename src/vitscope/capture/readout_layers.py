"""Attention inside a model's readout: CaiT's class-attention blocks and attention-pooling heads.

Some models read their tokens out through attention that is not one of their square self-attention
layers: CaiT's class-attention blocks (the CLS token alone queries ``[CLS, patches]``) and the
attention-pooling heads of SigLIP-style models (timm ``AttentionPoolLatent``, transformers'
``SiglipMultiheadAttentionPoolingHead``: learned latent queries attend over every token). Their maps are ``(B, H, Q, K)`` with few queries and their own
key sequence, so they are *readout layers* of their own, numbered ``0..R-1`` after the model's
layers, each with its own key layout.

:func:`readout_plans` installs, only for the duration of a ``with`` block, an explicit forward on
each readout module that computes exactly timm's unfused path (``softmax(q k^T * scale) v``),
multiplies the map by a keep mask, reports it (and, in the backward pass, its gradient) and
multiplies each head's context by a gate before the output projection (a gate of 0 prunes that
head; a gate that requires grad gives the head's Taylor importance). Outside the block the modules run their own
(fused) forward, untouched.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class ReadoutPlan:
    """What to do in one readout layer during a forward, as :class:`~vitscope.capture.runtime.LayerPlan`
    does for the model's layers: ``keep`` (broadcastable to ``(B, H, Q, K)``) multiplies the
    post-softmax map (0 prunes a cell, no renormalisation); ``head_gate`` (broadcastable to ``(B, H)``)
    multiplies each head's context (0 prunes the head; one that requires grad gives its Taylor
    importance); ``on_attention(i, attn)`` sees the effective map ``(B, H, Q, K)``;
    ``on_gradient(i, attn, grad)`` sees it and its gradient in the backward pass."""

    keep: Optional[torch.Tensor] = None
    head_gate: Optional[torch.Tensor] = None
    on_attention: Optional[Callable[[int, torch.Tensor], None]] = None
    on_gradient: Optional[Callable[[int, torch.Tensor, torch.Tensor], None]] = None


def _effective(attn: torch.Tensor, index: int, plan: ReadoutPlan) -> torch.Tensor:
    """The plan applied to one readout layer's post-softmax map: keep mask, report, gradient hook."""
    if plan.keep is not None:
        attn = attn * plan.keep.to(attn)
    if plan.on_attention is not None:
        plan.on_attention(index, attn)
    if plan.on_gradient is not None and attn.requires_grad:
        seen = attn.detach()
        attn.register_hook(lambda g: plan.on_gradient(index, seen, g))  # type: ignore[misc]
    return attn


def readout_kind(module: nn.Module) -> Optional[str]:
    """``"class_attention"`` (timm CaiT ``ClassAttn``), ``"attention_pool"`` (timm
    ``AttentionPoolLatent``), ``"siglip_pool"`` (transformers' SigLIP pooling head), or None for a
    module vitscope does not capture."""
    from timm.layers.attention_pool import AttentionPoolLatent
    from timm.models.cait import ClassAttn

    if type(module) is ClassAttn:
        return "class_attention"
    if type(module) is AttentionPoolLatent:
        return "attention_pool"
    if type(module).__name__ == "SiglipMultiheadAttentionPoolingHead" and isinstance(getattr(module, "attention", None), nn.MultiheadAttention):
        return "siglip_pool"
    return None


def readout_num_heads(module: nn.Module) -> int:
    """The number of heads of a readout attention module."""
    return int(module.attention.num_heads if readout_kind(module) == "siglip_pool" else module.num_heads)


def _class_attention(m: nn.Module, index: int, plan: ReadoutPlan) -> Callable[[torch.Tensor], torch.Tensor]:
    def forward(x: torch.Tensor) -> torch.Tensor:  # timm ClassAttn.forward, unfused, with gate and report
        B, N, C = x.shape
        q = m.q(x[:, 0]).unsqueeze(1).reshape(B, 1, m.num_heads, C // m.num_heads).permute(0, 2, 1, 3)
        k = m.k(x).reshape(B, N, m.num_heads, C // m.num_heads).permute(0, 2, 1, 3)
        v = m.v(x).reshape(B, N, m.num_heads, C // m.num_heads).permute(0, 2, 1, 3)
        attn = _effective(((q * m.scale) @ k.transpose(-2, -1)).softmax(dim=-1), index, plan)
        ctx = attn @ v  # (B, H, 1, d)
        if plan.head_gate is not None:
            ctx = ctx * plan.head_gate.to(ctx).reshape(-1, m.num_heads, 1, 1)
        return m.proj_drop(m.proj(ctx.transpose(1, 2).reshape(B, 1, C)))

    return forward


def _attention_pool(m: nn.Module, index: int, plan: ReadoutPlan) -> Callable[..., torch.Tensor]:
    def forward(x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:  # timm AttentionPoolLatent.forward, unfused
        B, N, C = x.shape
        if m.pos_embed is not None:
            x = x + m.pos_embed.unsqueeze(0).to(x.dtype)
        q = m.q(m.latent.expand(B, -1, -1)).reshape(B, m.latent_len, m.num_heads, m.head_dim).transpose(1, 2)
        k, v = m.kv(x).reshape(B, N, 2, m.num_heads, m.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = m.q_norm(q), m.k_norm(k)
        scores = (q * m.scale) @ k.transpose(-2, -1)
        if attn_mask is not None:
            scores = scores + attn_mask if attn_mask.dtype != torch.bool else scores.masked_fill(~attn_mask, float("-inf"))
        attn = _effective(scores.softmax(dim=-1), index, plan)
        ctx = attn @ v  # (B, H, Q, d)
        if plan.head_gate is not None:
            ctx = ctx * plan.head_gate.to(ctx).reshape(-1, m.num_heads, 1, 1)
        out = m.proj_drop(m.proj(ctx.transpose(1, 2).reshape(B, m.latent_len, C)))
        if m.mlp is not None:
            out = out + m.mlp(m.norm(out))
        if m.pool == "token":
            return out[:, 0]
        if m.pool == "avg":
            return out.mean(1)
        return out

    return forward


def _siglip_pool(m: nn.Module, index: int, plan: ReadoutPlan) -> Callable[[torch.Tensor], torch.Tensor]:
    def forward(x: torch.Tensor) -> torch.Tensor:  # transformers' SiglipMultiheadAttentionPoolingHead, its MHA written out
        mha = m.attention
        B, N, E = x.shape
        H = mha.num_heads
        d = E // H
        w, b = mha.in_proj_weight, mha.in_proj_bias
        probe = m.probe.repeat(B, 1, 1)
        Q = probe.shape[1]
        q = F.linear(probe, w[:E], None if b is None else b[:E]).reshape(B, Q, H, d).transpose(1, 2)
        k = F.linear(x, w[E : 2 * E], None if b is None else b[E : 2 * E]).reshape(B, N, H, d).transpose(1, 2)
        v = F.linear(x, w[2 * E :], None if b is None else b[2 * E :]).reshape(B, N, H, d).transpose(1, 2)
        attn = _effective(((q * d**-0.5) @ k.transpose(-2, -1)).softmax(dim=-1), index, plan)
        ctx = attn @ v
        if plan.head_gate is not None:
            ctx = ctx * plan.head_gate.to(ctx).reshape(-1, H, 1, 1)
        out = mha.out_proj(ctx.transpose(1, 2).reshape(B, Q, E))
        out = out + m.mlp(m.layernorm(out))
        return out[:, 0]

    return forward


_FORWARDS = {"class_attention": _class_attention, "attention_pool": _attention_pool, "siglip_pool": _siglip_pool}


@contextlib.contextmanager
def readout_plans(modules: list[nn.Module], plans: Mapping[int, ReadoutPlan]) -> Iterator[None]:
    """Run readout layer ``i`` (``modules[i]``) under ``plans[i]`` inside the block; restored after."""
    saved = {}
    try:
        for i, plan in plans.items():
            m = modules[i]
            kind = readout_kind(m)
            if kind is None:  # pragma: no cover - modules come from the backend's own list
                raise TypeError(f"readout layer {i} ({type(m).__name__}) cannot be captured")
            saved[i] = m.__dict__.get("forward")
            m.forward = _FORWARDS[kind](m, i, plan)  # an instance attribute: shadows the class's forward
        yield
    finally:
        for i, old in saved.items():
            m = modules[i]
            if old is None:
                del m.forward
            else:
                m.forward = old

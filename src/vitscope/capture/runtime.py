"""The attention kernel every patched attention module calls.

Why a kernel of our own: fused attention (``scaled_dot_product_attention``) never materialises the
post-softmax matrix, so forward hooks on a fused model silently capture nothing. Instead of turning
fused attention off for the whole model, each attention module is patched once at load time to hand
its ``q, k, v`` to :class:`AttentionRuntime`. While no plan is installed for a layer the module runs
its own original (fused) forward, so an idle model costs one dictionary lookup per layer. A layer
with a plan computes ``softmax(q k^T * scale)`` explicitly, exactly like timm's unfused path and
Hugging Face's eager path, applies the plan's masks and gates, reports the matrix (and, on request,
its gradient) to the plan's callback, and multiplies by ``v``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

AttentionCallback = Callable[[int, torch.Tensor], None]
GradientCallback = Callable[[int, torch.Tensor, torch.Tensor], None]


@dataclass
class LayerPlan:
    """What to do in one layer's attention during one forward pass.

    Attributes:
        keep: multiplier on the post-softmax attention, broadcastable to ``(B, H, T, T)``
            (1 keeps a cell, 0 prunes it; no renormalisation). ``None``: keep everything.
        allowed: boolean, broadcastable to ``(B, H, T, T)``: where False the key is removed *before*
            the softmax (the row is renormalised over the allowed keys), as in windowed attention.
            Every query must keep at least one key. Keeps the fused kernel when nothing else needs
            the matrix.
        head_gate: multiplier on each head's context vector, broadcastable to ``(B, H)``.
            A gate of 0 equals pruning the head's whole attention matrix, but keeps the fast fused
            kernel. A gate that requires grad yields the mask-gradient (Taylor) importance.
        on_attention: called as ``fn(layer, attention)`` with the effective (masked) attention
            ``(B, H, T, T)`` during the forward pass.
        on_gradient: called as ``fn(layer, attention, grad)`` during the backward pass with the
            gradient of the loss with respect to the effective attention.
        buffer: optional contiguous ``(B, H, T, T)`` tensor the attention is written into (no-grad
            passes only), so a caller that keeps every map pays for no extra copy.
        report_softmax: hand ``on_attention`` each head's own softmax instead of the effective
            map: for talking-heads attention (CaiT) the probabilities before the model mixes the
            heads (``proj_w``), which are distributions over keys; for every other model the same
            matrix. Reported before the plan's ``keep`` and ``head_gate`` (use it without them).
    """

    keep: Optional[torch.Tensor] = None
    allowed: Optional[torch.Tensor] = None
    head_gate: Optional[torch.Tensor] = None
    on_attention: Optional[AttentionCallback] = None
    on_gradient: Optional[GradientCallback] = None
    buffer: Optional[torch.Tensor] = None
    report_softmax: bool = False

    @property
    def needs_matrix(self) -> bool:
        return self.keep is not None or self.on_attention is not None or self.on_gradient is not None


def with_model_mask(plan: LayerPlan, mask: Optional[torch.Tensor]) -> tuple[LayerPlan, Optional[torch.Tensor]]:
    """The model's own attention mask under ``plan``, as every backend hands it to :meth:`AttentionRuntime.attend`.

    A boolean mask joins the plan's allowed keys (a model that restricts its attention, e.g. WinfT,
    keeps doing so under analysis); a float mask is an additive bias (relative position bias),
    returned for ``attend``'s ``bias``. Returns ``(plan, bias)``.
    """
    import dataclasses

    if mask is None:
        return plan, None
    if mask.dtype == torch.bool:
        allowed = mask if plan.allowed is None else plan.allowed & mask
        return dataclasses.replace(plan, allowed=allowed), None
    return plan, mask


class AttentionRuntime:
    """Holds the plans for the current forward pass of one model."""

    def __init__(self, num_layers: int) -> None:
        self.num_layers = num_layers
        self.plans: dict[int, LayerPlan] = {}

    def plan_for(self, layer: int) -> Optional[LayerPlan]:
        return self.plans.get(layer) if self.plans else None

    def attend(
        self,
        plan: LayerPlan,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        scale: float,
        dropout_p: float = 0.0,
        bias: Optional[torch.Tensor] = None,
        pre_softmax: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
        post_softmax: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    ) -> torch.Tensor:
        """Multi-head attention ``(B, H, T, D) -> (B, H, T, D)`` under ``plan``.

        ``bias``: the model's own additive float attention bias, broadcastable to ``(B, H, T, T)``
        (relative position bias, BEiT-style), added to the scaled scores before the softmax. It is
        part of the model, not of the plan: the idle fused path passes it to SDPA as its float
        ``attn_mask``.

        ``pre_softmax`` / ``post_softmax``: the model's own maps of the ``(B, H, T, T)`` scores before
        and of the probabilities after the softmax (talking-heads attention mixes heads there). With
        either, the matrix is always explicit, and the map the plan sees, masks and reports is the one
        after ``post_softmax``: the matrix that multiplies ``v``.
        """
        mixing = pre_softmax is not None or post_softmax is not None
        if plan.needs_matrix or mixing:
            tracking = mixing or (
                torch.is_grad_enabled()
                and (q.requires_grad or (plan.head_gate is not None and plan.head_gate.requires_grad))
            )
            if tracking:
                # Same operation order as timm's unfused path (q is scaled before the product).
                scores = (q * scale) @ k.transpose(-2, -1)
                if bias is not None:
                    scores = scores + bias.to(dtype=scores.dtype)
                if pre_softmax is not None:
                    scores = pre_softmax(scores)
                if plan.allowed is not None:
                    scores = scores.masked_fill(~plan.allowed, float("-inf"))
                attn = scores.softmax(dim=-1)
                softmax = attn
                if post_softmax is not None:
                    attn = post_softmax(attn)
                if plan.keep is not None:
                    attn = attn * plan.keep.to(dtype=attn.dtype)
                if plan.head_gate is not None:
                    # Gating a head's context equals gating its attention rows; folding it into the
                    # matrix makes the reported (effective) attention show the pruning too.
                    attn = attn * _gate(plan.head_gate, attn.dtype)[:, :, None, None]
                if plan.on_gradient is not None and attn.requires_grad:
                    on_gradient = plan.on_gradient
                    held = attn.detach()
                    attn.register_hook(lambda g, _l=layer, _a=held: on_gradient(_l, _a, g))
            else:
                attn = _softmax_scores_inplace(q, k, scale, plan.buffer, plan.allowed, bias)
                softmax = attn if not plan.report_softmax or (plan.keep is None and plan.head_gate is None) else attn.clone()
                if plan.keep is not None:
                    attn.mul_(plan.keep.to(dtype=attn.dtype))
                if plan.head_gate is not None:
                    attn.mul_(_gate(plan.head_gate, attn.dtype)[:, :, None, None])
            if plan.on_attention is not None:
                plan.on_attention(layer, (softmax if plan.report_softmax else attn).detach())
            if dropout_p > 0.0:
                attn = F.dropout(attn, p=dropout_p)
            out = attn @ v
        else:
            mask = plan.allowed
            if bias is not None:
                mask = bias.to(dtype=q.dtype) if mask is None else bias.to(dtype=q.dtype).masked_fill(~mask, float("-inf"))
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)
            if plan.head_gate is not None:
                out = out * _gate(plan.head_gate, out.dtype)[:, :, None, None]
        return out


def _softmax_scores_inplace(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: float,
    buffer: Optional[torch.Tensor],
    allowed: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``softmax(q k^T * scale + bias)`` computed into one buffer: one batched GEMM, one in-place softmax.

    Half the memory traffic of the out-of-place version, which is most of the cost of materialising
    attention on a CPU.
    """
    B, H, T, D = q.shape
    S = k.shape[-2]
    if buffer is None:
        buffer = torch.empty(B, H, T, S, dtype=q.dtype, device=q.device)
    flat = buffer.view(B * H, T, S)
    torch.baddbmm(flat, q.reshape(B * H, T, D), k.reshape(B * H, S, D).transpose(1, 2), beta=0.0, alpha=scale, out=flat)
    if bias is not None:
        buffer.add_(bias.to(dtype=buffer.dtype))
    if allowed is not None:
        buffer.masked_fill_(~allowed, float("-inf"))
    torch.softmax(flat, dim=-1, out=flat)
    return buffer


def _gate(gate: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    gate = gate.to(dtype=dtype)
    return gate.unsqueeze(0) if gate.dim() == 1 else gate

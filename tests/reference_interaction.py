"""Independent reference for the interaction tests: timm's unfused ViT forward, written out by hand.

It uses only the timm module's sub-layers (patch embedding, norms, qkv, proj, MLP), never vitscope's
attention kernel, and adds the three interventions the analyses claim to perform:

- ``gates[l]``: a ``(B, T, T)`` multiplier on the post-softmax attention of every head of layer
  ``l`` (a tensor that requires grad gives d loss / d gate = sum_h dloss/dA * A);
- ``allowed[l]``: a boolean ``(T, T)`` or ``(B, T, T)``: keys set to -inf before the softmax;
- ``drop``: a boolean ``(B, P)`` of patch tokens removed from the sequence after the embedding.
"""

from __future__ import annotations

from typing import Mapping, Optional

import torch


def reference_logits(
    module: torch.nn.Module,
    x: torch.Tensor,
    *,
    gates: Optional[Mapping[int, torch.Tensor]] = None,
    allowed: Optional[Mapping[int, torch.Tensor]] = None,
    keep_patches: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    m = module
    h = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x))))
    if keep_patches is not None:
        pre = m.num_prefix_tokens
        rows = []
        for b in range(h.shape[0]):
            idx = sorted(int(i) for i in keep_patches[b])
            rows.append(torch.cat([h[b, :pre], h[b, [pre + i for i in idx]]], dim=0))
        h = torch.stack(rows)
    for l, blk in enumerate(m.blocks):
        a = blk.attn
        y = blk.norm1(h)
        B, N, C = y.shape
        qkv = a.qkv(y).reshape(B, N, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = a.q_norm(q), a.k_norm(k)
        scores = (q * a.scale) @ k.transpose(-2, -1)
        if allowed is not None and l in allowed:
            al = allowed[l]
            al = al[None, None] if al.dim() == 2 else al[:, None]
            scores = scores.masked_fill(~al, float("-inf"))
        attn = scores.softmax(dim=-1)
        if gates is not None and l in gates:
            attn = attn * gates[l][:, None]
        y = (attn @ v).transpose(1, 2).reshape(B, N, C)
        y = a.proj(a.norm(y))
        h = h + blk.drop_path1(blk.ls1(y))
        h = h + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(h))))
    return m.forward_head(m.norm(h))

"""Weight initialisations beyond timm's default: 2-D sin-cos position embeddings and mimetic attention initialisation."""

from __future__ import annotations

import torch
from torch import nn
from vitscope.training.recipe import TrainError


def sincos_2d(rows: int, cols: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """Fixed 2-D sine-cosine position codes ``(rows * cols, dim)`` (MAE / MoCo v3 form): a quarter of
    the channels each for sin and cos of the column and of the row, so nearby patches get similar codes."""
    if dim % 4:
        raise TrainError(f"2-D sine-cosine position codes need a width divisible by 4, got {dim}")
    gy, gx = torch.meshgrid(torch.arange(rows, dtype=torch.float32), torch.arange(cols, dtype=torch.float32), indexing="ij")
    omega = 1.0 / temperature ** (torch.arange(dim // 4, dtype=torch.float32) / max(1, dim // 4 - 1))
    y = gy.flatten()[:, None] * omega[None]
    x = gx.flatten()[:, None] * omega[None]
    return torch.cat([x.sin(), x.cos(), y.sin(), y.cos()], dim=1)


@torch.no_grad()
def mimetic_init(model: nn.Module, alpha: float = 0.7, beta: float = 0.7, pos_scale: float = 1.0) -> nn.Module:
    """Mimetic initialisation of a timm ``VisionTransformer``'s attention (Trockman & Kolter 2023).

    Each head's query and key weights are set so that ``W_q^T W_k`` approximates ``alpha Z + beta I``
    (``Z`` random): at the start a token's query is most similar to its own key. With the patch
    position embeddings set to 2-D sine-cosine codes (times ``pos_scale``), in which neighbours are
    similar, heads begin by attending near their own position — the locality a large data set
    teaches a ViT and a small one does not. Training is free to change every weight afterwards.
    Draws from torch's global RNG (the caller seeds it). Returns ``model``.
    """
    from timm.layers import Attention

    blocks = getattr(model, "blocks", None)
    pos = getattr(model, "pos_embed", None)
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    if blocks is None or pos is None or grid is None:
        raise TrainError(f"mimetic initialisation needs a timm VisionTransformer (blocks, pos_embed, patch_embed); got {type(model).__name__}")
    D = int(model.embed_dim)
    prefix = pos.shape[1] - int(grid[0]) * int(grid[1])
    pos[0, prefix:] = pos_scale * sincos_2d(int(grid[0]), int(grid[1]), D)
    pos[0, :prefix] = 0.0
    for i, blk in enumerate(blocks):
        attn = blk.attn
        if not isinstance(attn, Attention):
            raise TrainError(f"mimetic initialisation needs timm's Attention in every block; block {i} has {type(attn).__name__}")
        H = attn.num_heads
        dh = D // H
        w = attn.qkv.weight  # (3D, D): query rows, key rows, value rows
        for h in range(H):
            m = alpha * torch.randn(D, D) / D**0.5 + beta * torch.eye(D)
            u, sv, vh = torch.linalg.svd(m)
            root = sv[:dh].sqrt()
            w[h * dh : (h + 1) * dh] = (u[:, :dh] * root).T
            w[D + h * dh : D + (h + 1) * dh] = vh[:dh] * root[:, None]
    return model


def freeze_position_embeddings(model: nn.Module) -> nn.Module:
    """Keep ``model.pos_embed`` at its current values: it gets no gradient and so no optimiser
    state (fixed position codes, as in MAE and MoCo v3). Returns ``model``."""
    pos = getattr(model, "pos_embed", None)
    if not isinstance(pos, nn.Parameter):
        raise TrainError(f"freeze_pos_embed needs a model with a learned pos_embed parameter; {type(model).__name__} has none")
    pos.requires_grad_(False)
    return model

"""Convert timm ViT weights to the Hugging Face ``ViTForImageClassification`` layout.

Useful to compare vitscope's capture with transformers' eager attention on identical weights, and
to hand a timm checkpoint to Hugging Face tooling.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

# HF per-layer key suffix -> (timm suffix, qkv slice index or None). Both transformers v5 and v4 names.
_LAYER_MAP: dict[str, tuple[str, Optional[int]]] = {
    "attention.q_proj": ("attn.qkv", 0),
    "attention.k_proj": ("attn.qkv", 1),
    "attention.v_proj": ("attn.qkv", 2),
    "attention.o_proj": ("attn.proj", None),
    "attention.attention.query": ("attn.qkv", 0),
    "attention.attention.key": ("attn.qkv", 1),
    "attention.attention.value": ("attn.qkv", 2),
    "attention.output.dense": ("attn.proj", None),
    "layernorm_before": ("norm1", None),
    "layernorm_after": ("norm2", None),
    "mlp.fc1": ("mlp.fc1", None),
    "mlp.fc2": ("mlp.fc2", None),
    "intermediate.dense": ("mlp.fc1", None),
    "output.dense": ("mlp.fc2", None),
}
_TOP_MAP = {"embeddings.patch_embeddings.projection": "patch_embed.proj", "layernorm": "norm"}
_DIRECT_MAP = {
    "vit.embeddings.cls_token": "cls_token",
    "vit.embeddings.position_embeddings": "pos_embed",
    "classifier.weight": "head.weight",
    "classifier.bias": "head.bias",
}


def timm_vit_to_hf(model: nn.Module, class_names: Optional[list[str]] = None) -> nn.Module:
    """Build a ``transformers.ViTForImageClassification`` holding the same weights as a timm ViT.

    Supports timm ``VisionTransformer`` with a CLS token, no registers, a LayerNorm pre-norm block,
    a linear head on the CLS token and GELU MLP (ViT / DeiT non-distilled).
    """
    from transformers import ViTConfig, ViTForImageClassification

    src = model.state_dict()
    D = model.embed_dim
    blk = model.blocks[0]
    cfg = ViTConfig(
        hidden_size=D,
        num_hidden_layers=len(model.blocks),
        num_attention_heads=blk.attn.num_heads,
        intermediate_size=blk.mlp.fc1.out_features,
        hidden_act="gelu",
        image_size=model.patch_embed.img_size[0],
        patch_size=model.patch_embed.patch_size[0],
        num_channels=model.patch_embed.proj.in_channels,
        qkv_bias=blk.attn.qkv.bias is not None,
        layer_norm_eps=blk.norm1.eps,
        num_labels=model.num_classes,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    if class_names:
        cfg.id2label = {i: n for i, n in enumerate(class_names)}
        cfg.label2id = {n: i for i, n in enumerate(class_names)}
    hf = ViTForImageClassification(cfg)
    out: dict[str, torch.Tensor] = {}
    for key in hf.state_dict():
        if key in _DIRECT_MAP:
            out[key] = src[_DIRECT_MAP[key]]
            continue
        name, param = key.removeprefix("vit.").rsplit(".", 1)
        m = re.match(r"(?:encoder\.layer|layers)\.(\d+)\.(.+)$", name)
        if m:
            timm_suffix, part = _LAYER_MAP[m.group(2)]
            t = src[f"blocks.{m.group(1)}.{timm_suffix}.{param}"]
            out[key] = t.chunk(3, dim=0)[part] if part is not None else t
        elif name in _TOP_MAP:
            out[key] = src[f"{_TOP_MAP[name]}.{param}"]
        else:
            raise KeyError(f"no timm weight maps to Hugging Face key {key}")
    hf.load_state_dict({k: v.clone() for k, v in out.items()}, strict=True)
    return hf.eval()


def save_timm_as_hf(model: nn.Module, folder: Union[str, Path], preprocessing: Optional[dict] = None, class_names: Optional[list[str]] = None) -> Path:
    """Write a timm ViT as a Hugging Face model folder (config, safetensors weights, image processor)."""
    from transformers import ViTImageProcessor

    folder = Path(folder)
    hf = timm_vit_to_hf(model, class_names)
    hf.save_pretrained(folder)
    cfg = preprocessing or {}
    size = model.patch_embed.img_size[0]
    proc = ViTImageProcessor(
        do_resize=True,
        size={"height": size, "width": size},
        resample=3 if cfg.get("interpolation", "bicubic") == "bicubic" else 2,
        image_mean=list(cfg.get("mean", (0.485, 0.456, 0.406))),
        image_std=list(cfg.get("std", (0.229, 0.224, 0.225))),
    )
    proc.save_pretrained(folder)
    return folder

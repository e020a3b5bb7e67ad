"""vitscope's architectures registered with timm, so ``timm.create_model(name)`` builds them."""

from __future__ import annotations

from typing import Any

from timm.models import register_model

from vitscope.models import winft  # noqa: F401 - registers the WinfT architectures with timm
from vitscope.models.builtin import create_fmnist_vit_tiny


@register_model
def fmnist_vit_tiny(pretrained: bool = False, **kwargs: Any):
    """The built-in Fashion-MNIST ViT architecture (6 layers, 4 heads, 7x7 grid of 4 px patches)."""
    if pretrained:
        raise ValueError("use vitscope.load_model('fmnist_vit_tiny') for the trained weights")
    kwargs.pop("pretrained_cfg", None)
    kwargs.pop("pretrained_cfg_overlay", None)
    kwargs.pop("cache_dir", None)
    return create_fmnist_vit_tiny(**kwargs)

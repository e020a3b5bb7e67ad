"""Built-in models that ship with vitscope (weights inside the package, no download)."""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable

from torch import nn

from vitscope.data.fashion_mnist import CLASSES as FASHION_MNIST_CLASSES

#: Fashion-MNIST pixel statistics of the training split (values in 0..1).
FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)

#: Architecture of the built-in Fashion-MNIST ViT (a timm VisionTransformer).
FMNIST_VIT_TINY_ARGS: dict[str, Any] = dict(
    img_size=28,
    patch_size=4,
    in_chans=1,
    num_classes=10,
    embed_dim=64,
    depth=6,
    num_heads=4,
    mlp_ratio=2.0,
    qkv_bias=True,
    class_token=True,
    global_pool="token",
)


def fmnist_pretrained_cfg() -> dict[str, Any]:
    return {
        "input_size": (1, 28, 28),
        "interpolation": "bilinear",
        "crop_pct": 1.0,
        "crop_mode": "center",
        "mean": FASHION_MNIST_MEAN,
        "std": FASHION_MNIST_STD,
        "num_classes": 10,
    }


def create_fmnist_vit_tiny(**overrides: Any) -> nn.Module:
    """The built-in Fashion-MNIST ViT architecture (random weights): 6 layers x 4 heads, 7x7 grid."""
    from timm.models.vision_transformer import VisionTransformer

    args = {**FMNIST_VIT_TINY_ARGS, **overrides}
    model = VisionTransformer(**args)
    cfg = fmnist_pretrained_cfg()
    model.pretrained_cfg = cfg
    model.default_cfg = cfg
    return model


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    factory: Callable[..., nn.Module]
    weights_file: str
    class_names: list[str] = field(default_factory=list)
    description: str = ""

    @property
    def weights_path(self) -> Path:
        return Path(str(resources.files("vitscope").joinpath("assets", "models", self.weights_file)))


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "fmnist_vit_tiny": BuiltinModel(
        name="fmnist_vit_tiny",
        factory=create_fmnist_vit_tiny,
        weights_file="fmnist_vit_tiny.safetensors",
        class_names=FASHION_MNIST_CLASSES,
        description="6-layer, 4-head ViT on 28x28 Fashion-MNIST (7x7 patches of 4 px), trained by vitscope's own script",
    ),
}

DEFAULT_MODEL = "fmnist_vit_tiny"

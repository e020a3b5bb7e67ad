"""Loading Vision Transformers into one uniform, analysable object."""

from vitscope.models.builtin import BUILTIN_MODELS, DEFAULT_MODEL
from vitscope.models.errors import ModelLoadError, UnsupportedModelError
from vitscope.core.layout import TokenLayout
from vitscope.models.loader import load_model, wrap_timm
from vitscope.models.preprocessing import Preprocessing
from vitscope.models import registry as _registry  # noqa: F401 - registers vitscope models with timm
from vitscope.models.vit import CaptureError, ViT

__all__ = [
    "BUILTIN_MODELS",
    "DEFAULT_MODEL",
    "CaptureError",
    "ModelLoadError",
    "Preprocessing",
    "TokenLayout",
    "UnsupportedModelError",
    "ViT",
    "load_model",
    "wrap_timm",
]

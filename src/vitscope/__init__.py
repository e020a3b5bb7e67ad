"""vitscope: see how attention works inside Vision Transformers."""

from vitscope.capture.masks import REGIONS
from vitscope.models import (
    CaptureError,
    ModelLoadError,
    TokenLayout,
    UnsupportedModelError,
    ViT,
    load_model,
)

__version__ = "0.1.0"

__all__ = [
    "REGIONS",
    "CaptureError",
    "ModelLoadError",
    "TokenLayout",
    "UnsupportedModelError",
    "ViT",
    "__version__",
    "load_model",
]

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


def __getattr__(name: str):
    # Analyses import pandas, scipy and friends: load them only when first used.
    if name == "partial_pruning":
        from vitscope.analysis.importance import partial_pruning

        return partial_pruning
    if name == "open_run":
        from vitscope.store import open_run

        return open_run
    if name == "show":
        from vitscope.server.notebook import show

        return show
    if name == "analyze":
        from vitscope.analysis.run import analyze

        return analyze
    raise AttributeError(f"module 'vitscope' has no attribute {name!r}")


__all__ = [
    "REGIONS",
    "CaptureError",
    "ModelLoadError",
    "TokenLayout",
    "UnsupportedModelError",
    "ViT",
    "__version__",
    "analyze",
    "load_model",
    "open_run",
    "partial_pruning",
    "show",
]

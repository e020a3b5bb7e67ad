"""vitscope: see how attention works inside Vision Transformers.

Every public name is loaded on first use (PEP 562), so ``import vitscope``, the command line's
help and reading a finished run (``vitscope.open_run``) cost no torch, timm or transformers
import; loading a model or analysing does.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: public name -> the module that defines it
_EXPORTS = {
    "REGIONS": "vitscope.capture.masks",
    "CaptureError": "vitscope.models",
    "ModelLoadError": "vitscope.models",
    "TokenLayout": "vitscope.models",
    "UnsupportedModelError": "vitscope.models",
    "ViT": "vitscope.models",
    "load_model": "vitscope.models",
    "partial_pruning": "vitscope.analysis.importance",
    "explain": "vitscope.analysis.explain",
    "explain_all": "vitscope.analysis.explain",
    "open_run": "vitscope.store",
    "show": "vitscope.server.notebook",
    "analyze": "vitscope.pipeline",
}

if TYPE_CHECKING:  # for type checkers and IDEs; at run time the names load lazily
    from vitscope.analysis.explain import explain, explain_all
    from vitscope.analysis.importance import partial_pruning
    from vitscope.pipeline import analyze
    from vitscope.capture.masks import REGIONS
    from vitscope.models import CaptureError, ModelLoadError, TokenLayout, UnsupportedModelError, ViT, load_model
    from vitscope.server.notebook import show
    from vitscope.store import open_run


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'vitscope' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__all__ = ["__version__", *_EXPORTS]

"""Loading images: listing and labelling files (``sources``), robust decoding (``decode``), and
batching for a model (``batching``); the values they hand around are in ``records``.

``load_images`` gives an :class:`ImageSet` (stable ``image_id`` per image, labels, class names),
``open_image`` decodes one file safely, and ``iter_batches`` turns a set into preprocessed
:class:`Batch` es, skipping unreadable files with a :class:`VitscopeDataWarning`.
``load_fashion_mnist`` (Fashion-MNIST from its IDX files) is imported on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from vitscope.data.batching import iter_batches
from vitscope.data.decode import open_image
from vitscope.data.records import Batch, DataError, ImageError, ImageRecord, ImageSet, VitscopeDataWarning
from vitscope.data.sources import IMAGE_EXTENSIONS, embedded_sample, load_images

_LAZY = {"load_fashion_mnist": "vitscope.data.fashion_mnist"}

__all__ = [
    "IMAGE_EXTENSIONS",
    "Batch",
    "DataError",
    "ImageError",
    "ImageRecord",
    "ImageSet",
    "VitscopeDataWarning",
    "embedded_sample",
    "iter_batches",
    "load_fashion_mnist",
    "load_images",
    "open_image",
]


def __getattr__(name: str) -> Any:
    # Imported lazily so that this package imports even where an optional loader is unavailable.
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name != module_name:
            raise
        raise AttributeError(f"{name} is not available: module {module_name} is not installed") from e
    value = getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

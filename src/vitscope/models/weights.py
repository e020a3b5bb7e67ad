"""Weight files: reading any state dict, and the self-describing ``.safetensors`` vitscope writes.

One module owns the file format so that the writer (``vitscope train``, tests that save models)
and the reader (:func:`vitscope.load_model` on a path) cannot drift apart: a file written by
:func:`write_weights` carries its architecture, constructor arguments, preprocessing config and
class names as safetensors metadata, and :func:`read_weights_metadata` returns exactly those.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from vitscope.core.atomic import atomic_path
from vitscope.models.errors import ModelLoadError

#: safetensors metadata keys vitscope writes so a single file can rebuild its model.
META_ARCH = "vitscope.architecture"
META_ARGS = "vitscope.model_args"
META_CFG = "vitscope.pretrained_cfg"
META_CLASSES = "vitscope.class_names"


@dataclass(frozen=True)
class WeightsMetadata:
    """What a vitscope weights file says about the model it holds.

    ``arch`` is a timm-registered architecture name, ``model_args`` the keyword arguments of
    ``timm.create_model``, ``pretrained_cfg`` the preprocessing config (input size, mean, std, ...)
    and ``class_names`` the classifier's labels, when recorded. ``extra`` keeps any other metadata
    key (e.g. a training run's fingerprint) verbatim.
    """

    arch: str
    model_args: dict[str, Any] = field(default_factory=dict)
    pretrained_cfg: Optional[dict[str, Any]] = None
    class_names: Optional[list[str]] = None
    extra: dict[str, str] = field(default_factory=dict)


def file_sha256(path: Union[str, Path]) -> str:
    """The file's SHA-256 (hex), read in 1 MiB blocks so large checkpoints stay out of memory."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_state_dict(path: Union[str, Path]) -> dict[str, torch.Tensor]:
    """Weights from ``.safetensors`` or a PyTorch checkpoint (``.pth``/``.pt``/``.bin``).

    Checkpoints that nest the weights (``state_dict``, ``model``, ``model_ema``, ``module``, as
    timm's and DeiT's training scripts write them) are unwrapped, and DDP's ``module.`` prefix is
    dropped. Pickles are read with ``weights_only=True``: a checkpoint never runs code.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - report any unpickling failure the same way
        raise ModelLoadError(f"could not read weights from {path}: {e}. Use a .safetensors file or a plain state_dict .pth") from e
    for key in ("state_dict", "model", "model_ema", "module"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict):
        raise ModelLoadError(f"{path} does not hold a state_dict (found {type(obj).__name__})")
    return {k.removeprefix("module."): v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def read_weights_metadata(path: Union[str, Path]) -> WeightsMetadata:
    """The model description stored in a vitscope ``.safetensors`` file.

    Raises :class:`ModelLoadError` naming the file when it is not a ``.safetensors`` file or was
    not written by :func:`write_weights` (then the architecture must be given by name).
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ModelLoadError(
            f"{path}: a bare {path.suffix or 'weights'} file does not say which architecture it holds; "
            f"use load_model('<timm name>', weights='{path}') instead"
        )
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta: dict[str, str] = dict(f.metadata() or {})
    except Exception as e:  # noqa: BLE001 - a damaged header reads as any of several errors
        raise ModelLoadError(f"could not read {path} as safetensors ({type(e).__name__}: {e}); is the file complete?") from e
    arch = meta.pop(META_ARCH, None)
    if not arch:
        raise ModelLoadError(
            f"{path} carries no vitscope architecture metadata; load it with "
            f"load_model('<timm model name>', weights='{path}')"
        )
    args = json.loads(meta.pop(META_ARGS, "{}"))
    cfg = json.loads(meta.pop(META_CFG)) if META_CFG in meta else None
    names = json.loads(meta.pop(META_CLASSES)) if META_CLASSES in meta else None
    return WeightsMetadata(arch=arch, model_args=args, pretrained_cfg=cfg, class_names=names, extra=meta)


def write_weights(model: nn.Module, path: Union[str, Path], metadata: WeightsMetadata) -> Path:
    """Write ``model``'s state dict to ``path`` (``.safetensors``) with ``metadata``, crash-safely.

    The file appears complete or not at all (temporary name, fsync, rename), so an interrupted
    writer never leaves a truncated weights file that a later load would half-read.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ModelLoadError(f"weights file {path} must end in .safetensors")
    meta = {
        META_ARCH: metadata.arch,
        META_ARGS: json.dumps(metadata.model_args),
        **({META_CFG: json.dumps(metadata.pretrained_cfg)} if metadata.pretrained_cfg is not None else {}),
        **({META_CLASSES: json.dumps(list(metadata.class_names))} if metadata.class_names is not None else {}),
        **metadata.extra,
    }
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=meta)
    return path


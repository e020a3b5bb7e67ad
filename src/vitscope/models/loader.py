"""`load_model(spec)`: one factory for timm names, Hugging Face ids/folders, local files and built-ins."""

from __future__ import annotations

from pathlib import Path
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import torch
from torch import nn

from vitscope.models.builtin import BUILTIN_MODELS
from vitscope.models.errors import ModelLoadError, UnsupportedModelError
from vitscope.models.preprocessing import Preprocessing
from vitscope.models.backends.timm import timm_backend
from vitscope.models.vit import ViT
from vitscope.models.weights import file_sha256, read_state_dict, read_weights_metadata

def resolve_device(device: Union[str, torch.device, None]) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _load_strict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ModelLoadError(
            f"weights in {source} do not fit {type(model).__name__}: "
            f"{len(result.missing_keys)} missing (e.g. {result.missing_keys[:3]}), "
            f"{len(result.unexpected_keys)} unexpected (e.g. {result.unexpected_keys[:3]}). "
            "Check that the model name matches the checkpoint's architecture."
        )


def _imagenet_class_names(model: nn.Module) -> Optional[list[str]]:
    try:
        from timm.data import ImageNetInfo, infer_imagenet_subset

        subset = infer_imagenet_subset(model)
        if not subset:
            return None
        info = ImageNetInfo(subset)
        return [info.index_to_description(i) for i in range(model.num_classes)]
    except Exception:  # noqa: BLE001 - names are a convenience, never a reason to fail
        return None


def wrap_timm(
    model: nn.Module,
    *,
    name: Optional[str] = None,
    spec: Optional[str] = None,
    class_names: Optional[list[str]] = None,
    weights_sha256: Optional[str] = None,
    device: Union[str, torch.device, None] = None,
) -> ViT:
    """Wrap an already built timm ViT (``VisionTransformer``, ``Eva``, ``Beit`` or ``Cait``)."""
    from timm.data import create_transform, resolve_data_config

    backend = timm_backend(model)
    cfg = resolve_data_config({}, model=model)
    # A model built directly (not from a registered config) carries timm's default 224 px config;
    # the input the model actually accepts wins.
    pe = model.patch_embed
    actual = (int(pe.proj.in_channels), *(int(s) for s in pe.img_size))
    if tuple(cfg["input_size"]) != actual and not getattr(pe, "dynamic_img_size", False):
        cfg = {**cfg, "input_size": actual}
        if actual[0] != len(cfg["mean"]):
            cfg["mean"], cfg["std"] = (0.5,) * actual[0], (0.5,) * actual[0]
    prep = Preprocessing.from_timm_config(cfg, transform=create_transform(**cfg))
    name = name or getattr(model, "pretrained_cfg", {}).get("architecture") or type(model).__name__
    vit = ViT(
        backend,
        name=name,
        spec=spec or name,
        layout=backend.layout(prep.input_size),
        preprocessing=prep,
        class_names=class_names or _imagenet_class_names(model),
        weights_sha256=weights_sha256,
        library="timm",
    )
    vit.module.requires_grad_(False)
    return vit.to(resolve_device(device))


def load_model(
    spec: Union[str, nn.Module],
    weights: Union[str, Path, None] = None,
    device: Union[str, torch.device, None] = None,
) -> ViT:
    """Load a Vision Transformer as one uniform, analysable :class:`~vitscope.ViT`.

    ``spec`` is one of:

    - the name of a built-in model (``"fmnist_vit_tiny"``, weights included);
    - a timm model name (``"deit_tiny_patch16_224"``): weights from ``weights=`` (``.safetensors``
      or ``.pth``), else timm's pretrained download (needs internet);
    - ``"hf:<hub id or local folder>"``: a Hugging Face ViT / DeiT / DINOv2 / CLIP / SigLIP /
      ViT-MAE / BEiT / Data2Vec-Vision model (needs ``pip install 'vitscope[hf]'``);
    - a ``.safetensors`` file written by ``vitscope train`` (it records its own architecture);
    - an ``nn.Module`` you built yourself: a timm ``VisionTransformer``, ``Eva``, ``Beit`` or
      ``Cait``, or one of the transformers classes above.

    docs/models.md lists the supported families, their token layouts and what is refused.

    ``device`` defaults to CUDA when available. The model is put in eval mode with gradients off.
    """
    vit = _load(spec, weights, device)
    # Where the weights came from travels with the model, so a run records it and `vitscope serve`
    # finds the same weights again without --weights.
    if weights is not None:
        vit.weights_path = str(Path(weights).resolve())
    return vit


Device = Union[str, torch.device, None]


@dataclass(frozen=True)
class ModelSource:
    """One kind of model spec :func:`load_model` understands: ``matches(spec)`` says whether it is
    this kind, ``load(spec, weights, device)`` builds the :class:`ViT`. ``describe`` goes into the
    error message for a spec no source matches."""

    name: str
    matches: Callable[[Any], bool]
    load: Callable[[Any, Union[str, Path, None], Device], ViT]
    describe: str


#: The kinds of spec, tried in order; :func:`register_model_source` adds one (e.g. a new library).
MODEL_SOURCES: list[ModelSource] = []


def register_model_source(source: ModelSource, *, before: Optional[str] = None) -> None:
    """Add ``source`` to :data:`MODEL_SOURCES` (before the source named ``before``, else last but the
    timm fallback, which matches any other string)."""
    names = [s.name for s in MODEL_SOURCES]
    if source.name in names:
        raise ValueError(f"a model source named {source.name!r} is already registered")
    at = names.index(before) if before in names else (names.index("timm") if "timm" in names else len(names))
    MODEL_SOURCES.insert(at, source)


def _load(spec: Union[str, nn.Module], weights: Union[str, Path, None], device: Device) -> ViT:
    if not isinstance(spec, nn.Module) and (not isinstance(spec, str) or not spec):
        raise ModelLoadError(f"model spec must be a non-empty string or an nn.Module, got {spec!r}")
    for source in MODEL_SOURCES:
        if source.matches(spec):
            return source.load(spec, weights, device)
    raise ModelLoadError(f"unknown model {spec!r}: it is none of: " + "; ".join(s.describe for s in MODEL_SOURCES))


def _load_module(model: nn.Module, weights: Union[str, Path, None], device: Device) -> ViT:
    if type(model).__module__.startswith("transformers."):
        from vitscope.models.backends.hf import wrap_hf

        return wrap_hf(model, source=type(model).__name__, device=device, read_processor=False)
    return wrap_timm(model, device=device)


def _load_hf(spec: str, weights: Union[str, Path, None], device: Device) -> ViT:
    from vitscope.models.backends.hf import load_hf

    return load_hf(spec[3:], weights=weights, device=device)


def _load_builtin(spec: str, weights: Union[str, Path, None], device: Device) -> ViT:
    entry = BUILTIN_MODELS[spec]
    path = Path(weights) if weights else entry.weights_path
    model = entry.factory()
    _load_strict(model, read_state_dict(path), str(path))
    return wrap_timm(model, name=spec, spec=spec, class_names=list(entry.class_names), weights_sha256=file_sha256(path), device=device)


def _is_local(spec: Any) -> bool:
    return isinstance(spec, str) and (Path(spec).suffix in (".safetensors", ".pth", ".pt") or Path(spec).exists())


def _load_timm(spec: str, weights: Union[str, Path, None], device: Device) -> ViT:
    import timm

    if not timm.is_model(spec):
        close = timm.list_models(f"*{spec}*")[:8]
        hint = f" Did you mean one of: {', '.join(close)}?" if close else ""
        raise ModelLoadError(
            f"unknown model {spec!r}: not a built-in ({', '.join(BUILTIN_MODELS)}), not a timm model name, "
            f"not an existing file, and not 'hf:<id>'.{hint}"
        )
    if weights is not None:
        model = timm.create_model(spec, pretrained=False)
        _load_strict(model, read_state_dict(weights), str(weights))
        sha = file_sha256(weights)
    else:
        try:
            model = timm.create_model(spec, pretrained=True)
        except UnsupportedModelError:
            raise
        except Exception as e:  # noqa: BLE001 - network/hub errors vary by version
            raise ModelLoadError(
                f"could not download pretrained weights for {spec!r} ({type(e).__name__}: {e}). "
                "If you are offline, pass weights=PATH to a .safetensors or .pth file."
            ) from e
        sha = None
    return wrap_timm(model, name=spec, spec=spec, weights_sha256=sha, device=device)


def _load_local_file(path: Path, device: Union[str, torch.device, None]) -> ViT:
    if path.is_dir():
        if (path / "config.json").exists():
            from vitscope.models.backends.hf import load_hf

            return load_hf(str(path), device=device)
        raise ModelLoadError(f"{path} is a folder without config.json; pass a model file or 'hf:<folder>'")
    if not path.is_file():
        raise ModelLoadError(f"model file {path} does not exist")
    meta = read_weights_metadata(path)
    import timm

    from vitscope.models import registry  # noqa: F401 - registers vitscope's timm models

    args = dict(meta.model_args)
    # Attention masks (WinfT, fixed windows) are buffers restored from the weights themselves; the
    # file they were first read from need not exist any more.
    for key in ("masks", "mask_file"):
        args.pop(key, None)
    model = timm.create_model(meta.arch, pretrained=False, **args)
    if meta.pretrained_cfg is not None:
        model.pretrained_cfg = meta.pretrained_cfg
        model.default_cfg = meta.pretrained_cfg
    _load_strict(model, read_state_dict(path), str(path))
    return wrap_timm(model, name=path.stem, spec=str(path), class_names=meta.class_names, weights_sha256=file_sha256(path), device=device)


for _source in (
    ModelSource("module", lambda s: isinstance(s, nn.Module), _load_module, "an nn.Module (a timm VisionTransformer or a transformers ViT model)"),
    ModelSource("hf", lambda s: isinstance(s, str) and s.startswith("hf:"), _load_hf, "'hf:<hub id or local folder>' (a Hugging Face model)"),
    ModelSource("builtin", lambda s: isinstance(s, str) and s in BUILTIN_MODELS, _load_builtin, f"a built-in model ({', '.join(BUILTIN_MODELS)})"),
    ModelSource("file", _is_local, lambda s, w, d: _load_local_file(Path(s), d), "a model file (.safetensors from vitscope train) or a Hugging Face folder"),
    ModelSource("timm", lambda s: isinstance(s, str), _load_timm, "a timm model name"),
):
    register_model_source(_source)

"""Hugging Face ViT, DeiT and DINOv2-style models (``pip install 'vitscope[hf]'``).

Capture goes through transformers' own extension point: vitscope registers an attention function
named ``"vitscope"`` with ``AttentionInterface`` and switches the model to it. That function calls
transformers' SDPA implementation unchanged unless vitscope has a plan for the calling layer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from vitscope.capture.runtime import AttentionRuntime
from vitscope.models.errors import ModelLoadError, UnsupportedModelError
from vitscope.core.layout import TokenLayout
from vitscope.models.preprocessing import Preprocessing
from vitscope.models.vit import ViT

ATTN_IMPLEMENTATION = "vitscope"

# model class -> how logits are read out of the final residual stream
_READOUTS = {
    "ViTForImageClassification": "cls",
    "DeiTForImageClassification": "cls",
    "DeiTForImageClassificationWithTeacher": "cls_dist_mean",
    "Dinov2ForImageClassification": "cls_patch_mean",
    "Dinov2WithRegistersForImageClassification": "cls_patch_mean",
}
_BASES = ("ViTModel", "DeiTModel", "Dinov2Model", "Dinov2WithRegistersModel")
_RESAMPLE_NAMES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


def _vitscope_attention(module: nn.Module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    runtime: Optional[AttentionRuntime] = getattr(module, "_vitscope_runtime", None)
    layer: int = getattr(module, "_vitscope_layer", -1)
    plan = runtime.plan_for(layer) if runtime is not None else None
    if plan is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if attention_mask is not None:
        raise NotImplementedError("vitscope cannot analyse attention that already uses an attention mask")
    scale = scaling if scaling is not None else query.size(-1) ** -0.5
    out = runtime.attend(plan, layer, query, key, value, scale, dropout if module.training else 0.0)
    return out.transpose(1, 2).contiguous(), None


def _register_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, _vitscope_attention)


def _find_layers(base: nn.Module) -> list[nn.Module]:
    for path in ("layers", "encoder.layer", "encoder.layers"):
        obj: Any = base
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList) and len(obj) > 0:
            return list(obj)
    raise UnsupportedModelError(f"{type(base).__name__}: found no list of transformer layers (looked for layers, encoder.layer)")


class HFBackend:
    """Adapts a transformers ViT / DeiT / DINOv2 model to vitscope's uniform interface."""

    library = "transformers"

    def __init__(self, model: nn.Module) -> None:
        cls = type(model).__name__
        if cls in _READOUTS:
            self.readout_kind: Optional[str] = _READOUTS[cls]
            self.base = getattr(model, model.base_model_prefix)
        elif cls in _BASES:
            self.readout_kind = None
            self.base = model
        else:
            supported = ", ".join(sorted(set(_READOUTS) | set(_BASES)))
            windowed = " Windowed attention (Swin and similar) is not supported yet." if "swin" in cls.lower() else ""
            raise UnsupportedModelError(f"cannot analyse transformers model class {cls}; supported: {supported}.{windowed}")
        self.module = model.eval()
        self.config = model.config
        self.blocks = _find_layers(self.base)
        self.num_heads = int(self.config.num_attention_heads)
        self.num_classes = int(getattr(self.config, "num_labels", 0)) if self.readout_kind else None
        self.model_type = self.config.model_type

    def install(self, runtime: AttentionRuntime) -> None:
        _register_attention()
        for i, layer in enumerate(self.blocks):
            for sub in layer.modules():
                sub._vitscope_layer = i
                sub._vitscope_runtime = runtime
        try:
            self.module.set_attn_implementation(ATTN_IMPLEMENTATION)
        except Exception:  # noqa: BLE001 - older releases: set the config field directly
            self.module.config._attn_implementation = ATTN_IMPLEMENTATION

    def layout(self, input_size: tuple[int, int, int]) -> TokenLayout:
        ps = self.config.patch_size
        patch = (ps, ps) if isinstance(ps, int) else tuple(ps)
        grid = (input_size[1] // patch[0], input_size[2] // patch[1])
        n_reg = int(getattr(self.config, "num_register_tokens", 0) or 0)
        if self.model_type == "deit":
            return TokenLayout(2, 0, 1, (), grid, patch)  # type: ignore[arg-type]
        return TokenLayout(1 + n_reg, 0, None, tuple(range(1, 1 + n_reg)), grid, patch)  # type: ignore[arg-type]

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.base.embeddings(x)

    def run_block(self, i: int, h: torch.Tensor) -> torch.Tensor:
        out = self.blocks[i](h)
        return out[0] if isinstance(out, tuple) else out

    def readout(self, h: torch.Tensor) -> torch.Tensor:
        h = self.base.layernorm(h)
        m = self.module
        if self.readout_kind == "cls":
            return m.classifier(h[:, 0])
        if self.readout_kind == "cls_dist_mean":
            return (m.cls_classifier(h[:, 0]) + m.distillation_classifier(h[:, 1])) / 2
        if self.readout_kind == "cls_patch_mean":
            prefix = 1 + int(getattr(self.config, "num_register_tokens", 0) or 0)
            return m.classifier(torch.cat([h[:, 0], h[:, prefix:].mean(dim=1)], dim=1))
        raise ValueError(f"{type(m).__name__} has no classification head")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(pixel_values=x).logits


def _as_dict(value: Any) -> Optional[dict[str, int]]:
    """Processor sizes are dicts in some releases and ``SizeDict`` objects in others."""
    if value is None:
        return None
    if isinstance(value, int):
        return {"height": value, "width": value}
    items = value.items() if isinstance(value, dict) else vars(value).items()
    return {k: int(v) for k, v in items if v is not None}


def _preprocessing(source: str, config: Any) -> Preprocessing:
    """Preprocessing from the model's image processor values (defaults of ViTImageProcessor if absent)."""
    channels = int(getattr(config, "num_channels", 3))
    size: Any = {"height": config.image_size, "width": config.image_size}
    crop: Optional[dict[str, int]] = None
    mean, std, resample = [0.5] * channels, [0.5] * channels, 2
    try:
        from transformers import AutoImageProcessor

        proc = AutoImageProcessor.from_pretrained(source)
        size = _as_dict(getattr(proc, "size", None)) or size
        if getattr(proc, "do_center_crop", False):
            crop = _as_dict(getattr(proc, "crop_size", None))
        mean = list(getattr(proc, "image_mean", mean))
        std = list(getattr(proc, "image_std", std))
        resample = int(getattr(proc, "resample", resample))
    except Exception:  # noqa: BLE001 - a folder of converted weights may carry no processor config
        pass
    resize: Union[int, tuple[int, int]]
    if isinstance(size, dict) and "shortest_edge" in size:
        resize = int(size["shortest_edge"])
    elif isinstance(size, dict):
        resize = (int(size["height"]), int(size["width"]))
    else:
        resize = (int(size), int(size))
    if crop:
        crop_hw: Optional[tuple[int, int]] = (int(crop["height"]), int(crop["width"]))
    elif isinstance(resize, tuple):
        crop_hw = None
    else:
        crop_hw = (resize, resize)
    out_hw = crop_hw or resize
    return Preprocessing(
        input_size=(channels, out_hw[0], out_hw[1]),  # type: ignore[index]
        mean=tuple(mean),
        std=tuple(std),
        interpolation=_RESAMPLE_NAMES.get(resample, "bilinear"),
        resize=resize,
        crop=crop_hw,
    )


def wrap_hf(model: nn.Module, *, source: str = "", device: Union[str, torch.device, None] = None, weights_sha256: Optional[str] = None) -> ViT:
    """Wrap an already built transformers model."""
    from vitscope.models.loader import resolve_device

    backend = HFBackend(model)
    prep = _preprocessing(source, model.config)
    id2label = getattr(model.config, "id2label", None) or {}
    names = [id2label.get(i, str(i)) for i in range(backend.num_classes)] if backend.num_classes else None
    vit = ViT(
        backend,
        name=source or type(model).__name__,
        spec=f"hf:{source}" if source else type(model).__name__,
        layout=backend.layout(prep.input_size),
        preprocessing=prep,
        class_names=names,
        weights_sha256=weights_sha256,
        library="transformers",
    )
    vit.module.requires_grad_(False)
    return vit.to(resolve_device(device))


def load_hf(source: str, weights: Union[str, Path, None] = None, device: Union[str, torch.device, None] = None) -> ViT:
    """Load ``hf:<hub id or local folder>`` (classification head if the checkpoint has one)."""
    try:
        import transformers
    except ImportError as e:
        raise ModelLoadError("Hugging Face models need transformers: pip install 'vitscope[hf]'") from e
    if weights is not None:
        raise ModelLoadError("hf: models load their weights from the hub id or folder; do not pass weights=")
    if not source:
        raise ModelLoadError("empty hf: spec; use hf:<hub id> (e.g. hf:google/vit-base-patch16-224) or hf:<local folder>")
    try:
        config = transformers.AutoConfig.from_pretrained(source)
    except Exception as e:  # noqa: BLE001
        raise ModelLoadError(f"could not read a Hugging Face config from {source!r} ({e}). Offline? Use a local folder.") from e
    archs = list(getattr(config, "architectures", None) or [])
    head = any(a in _READOUTS for a in archs)
    auto = transformers.AutoModelForImageClassification if head else transformers.AutoModel
    try:
        model = auto.from_pretrained(source, attn_implementation="sdpa")
    except Exception as e:  # noqa: BLE001
        raise ModelLoadError(f"could not load Hugging Face model {source!r}: {e}") from e
    sha = None
    folder = Path(source)
    if folder.is_dir():
        from vitscope.models.loader import file_sha256

        files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
        sha = file_sha256(files[0]) if len(files) == 1 else None
    return wrap_hf(model, source=source, device=device, weights_sha256=sha)

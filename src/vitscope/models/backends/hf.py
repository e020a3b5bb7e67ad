"""Hugging Face vision transformers (``pip install 'vitscope[hf]'``): ViT, DeiT, DINOv2 (with
registers), CLIP and SigLIP vision towers, ViT-MAE, BEiT and Data2Vec-Vision.

Capture goes through transformers' own extension point: vitscope registers an attention function
named ``"vitscope"`` with ``AttentionInterface`` and switches the model to it. That function calls
transformers' SDPA implementation unchanged unless vitscope has a plan for the calling layer. The
model's own attention mask (BEiT's relative position bias arrives as a float ``attention_mask``) is
honoured either way. Data2Vec-Vision predates that interface: its self-attention modules are patched
one by one instead, mirroring transformers' code.
"""

from __future__ import annotations

import copy

import math
import types
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from vitscope.capture.runtime import AttentionRuntime, LayerPlan, with_model_mask
from vitscope.models.errors import ModelLoadError, UnsupportedModelError
from vitscope.core.layout import TokenLayout
from vitscope.models.preprocessing import Preprocessing
from vitscope.models.vit import ViT

ATTN_IMPLEMENTATION = "vitscope"

# model class with a classifier -> how logits are read out of the final hidden states
_READOUTS = {
    "ViTForImageClassification": "cls",
    "DeiTForImageClassification": "cls",
    "DeiTForImageClassificationWithTeacher": "cls_dist_mean",
    "Dinov2ForImageClassification": "cls_patch_mean",
    "Dinov2WithRegistersForImageClassification": "cls_patch_mean",
    "CLIPForImageClassification": "patch_mean",
    "SiglipForImageClassification": "token_mean",
    "BeitForImageClassification": "pooler",
    "Data2VecVisionForImageClassification": "pooler",
}
# backbones without a classifier: their readout is the pooled embedding
_BASES = (
    "ViTModel",
    "DeiTModel",
    "Dinov2Model",
    "Dinov2WithRegistersModel",
    "CLIPVisionModel",
    "CLIPVisionModelWithProjection",
    "SiglipVisionModel",
    "ViTMAEModel",
    "BeitModel",
    "Data2VecVisionModel",
    "DINOv3ViTModel",
)
# whole image-text models -> the vision tower class load_hf takes from them
# (CLIP's with its visual projection: the embedding is the one CLIP users use, ``image_embeds``)
_VISION_TOWERS = {"clip": "CLIPVisionModelWithProjection", "siglip": "SiglipVisionModel"}
_RESAMPLE_NAMES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


def _plan_with_mask(plan: LayerPlan, attention_mask: Optional[torch.Tensor]) -> tuple[LayerPlan, Optional[torch.Tensor]]:
    """The model's own mask under a plan: boolean -> allowed keys, float -> additive bias."""
    return with_model_mask(plan, attention_mask)


def _vitscope_attention(module: nn.Module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    runtime: Optional[AttentionRuntime] = getattr(module, "_vitscope_runtime", None)
    layer: int = getattr(module, "_vitscope_layer", -1)
    plan = runtime.plan_for(layer) if runtime is not None else None
    if plan is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if kwargs.get("is_causal"):
        raise NotImplementedError("vitscope analyses bidirectional attention only; this layer asked for causal attention")
    if key.shape[1] != query.shape[1]:
        raise NotImplementedError("vitscope needs as many key/value heads as query heads (no grouped-query attention here)")
    plan, bias = _plan_with_mask(plan, attention_mask)
    scale = scaling if scaling is not None else query.size(-1) ** -0.5
    out = runtime.attend(plan, layer, query, key, value, scale, dropout if module.training else 0.0, bias=bias)
    return out.transpose(1, 2).contiguous(), None


def _register_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, _vitscope_attention)
    try:  # models that build their mask with create_bidirectional_mask look it up by the same name
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

        if ATTN_IMPLEMENTATION not in ALL_MASK_ATTENTION_FUNCTIONS:
            ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_IMPLEMENTATION, sdpa_mask)
    except ImportError:  # older releases: no mask interface
        pass


def _data2vec_attention_forward(runtime: AttentionRuntime, layer: int, original):
    """``Data2VecVisionSelfAttention`` / ``...SdpaSelfAttention``, mirrored up to ``q, k, v`` and the
    (per-layer and shared) relative position bias."""

    def forward(self, hidden_states, output_attentions=False, relative_position_bias=None, interpolate_pos_encoding=False, resolution=None):
        plan = runtime.plan_for(layer)
        if plan is None:
            return original(hidden_states, output_attentions, relative_position_bias, interpolate_pos_encoding, resolution)
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.attention_head_size)
        q = self.query(hidden_states).view(hidden_shape).transpose(1, 2)
        k = self.key(hidden_states).view(hidden_shape).transpose(1, 2)
        v = self.value(hidden_states).view(hidden_shape).transpose(1, 2)
        bias = None
        if self.has_relative_position_bias:
            height, width = resolution
            window_size = (height // self.config.patch_size, width // self.config.patch_size)
            bias = self.relative_position_bias(window_size, interpolate_pos_encoding, dim_size=hidden_states.shape[1])
        if relative_position_bias is not None:
            bias = relative_position_bias if bias is None else bias + relative_position_bias
        p = self.config.attention_probs_dropout_prob if self.training else 0.0
        ctx = runtime.attend(plan, layer, q, k, v, 1 / math.sqrt(self.attention_head_size), p, bias=bias)
        ctx = ctx.permute(0, 2, 1, 3).contiguous()
        ctx = ctx.view(*ctx.size()[:-2], self.all_head_size)
        return (ctx, None) if output_attentions else (ctx,)

    return forward


def _find_layers(base: nn.Module) -> list[nn.Module]:
    for path in ("layers", "encoder.layer", "encoder.layers", "model.layer"):
        obj: Any = base
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList) and len(obj) > 0:
            return list(obj)
    raise UnsupportedModelError(f"{type(base).__name__}: found no list of transformer layers (looked for layers, encoder.layer)")


class HFBackend:
    """Adapts a transformers vision transformer to vitscope's uniform interface."""

    library = "transformers"

    def __init__(self, model: nn.Module) -> None:
        cls = type(model).__name__
        if cls in _READOUTS:
            self.readout_kind: Optional[str] = _READOUTS[cls]
            base = getattr(model, "vision_model", None)
            self.base = base if base is not None else getattr(model, model.base_model_prefix)
        elif cls in _BASES:
            self.readout_kind = None
            base = getattr(model, "vision_model", None)  # CLIP / SigLIP towers of older releases
            self.base = base if isinstance(base, nn.Module) and hasattr(base, "embeddings") else model
        else:
            supported = ", ".join(sorted(set(_READOUTS) | set(_BASES)))
            windowed = (
                " Windowed attention (Swin and similar) is not supported yet: vitscope's analyses need every token "
                "to attend to every token."
                if "swin" in cls.lower()
                else ""
            )
            raise UnsupportedModelError(f"cannot analyse transformers model class {cls}; supported: {supported}.{windowed}")
        self.module = model.eval()
        self.config = self.base.config  # the vision config (CLIP/SigLIP classifiers nest it)
        self.model_type = self.config.model_type
        if self.model_type == "vit_mae" and float(getattr(self.config, "mask_ratio", 0.0)) > 0:
            raise UnsupportedModelError(
                f"{cls} has mask_ratio={self.config.mask_ratio}: it drops that share of the patches at random, so "
                "the token sequence differs from image to image. Set model.config.mask_ratio = 0 (the encoder then "
                "sees every patch, in order) before loading it."
            )
        self.blocks = _find_layers(self.base)
        self.num_heads = int(self.config.num_attention_heads)
        self.num_classes = int(getattr(model.config, "num_labels", 0)) if self.readout_kind else None
        self._resolution: Optional[tuple[int, int]] = None

    # -------------------------------------------------------------- attention
    def install(self, runtime: AttentionRuntime) -> None:
        for i, layer in enumerate(self.blocks):
            for sub in layer.modules():
                sub._vitscope_layer = i
                sub._vitscope_runtime = runtime
        if self.model_type == "data2vec-vision":
            for i, layer in enumerate(self.blocks):
                sa = layer.attention.attention
                original = getattr(sa, "_vitscope_original_forward", None) or sa.forward
                sa._vitscope_original_forward = original
                sa.forward = types.MethodType(_data2vec_attention_forward(runtime, i, original), sa)
            return
        _register_attention()
        try:
            self.module.set_attn_implementation(ATTN_IMPLEMENTATION)
        except Exception:  # noqa: BLE001 - older releases: set the config field directly
            self.module.config._attn_implementation = ATTN_IMPLEMENTATION
            self.config._attn_implementation = ATTN_IMPLEMENTATION

    def layout(self, input_size: tuple[int, int, int]) -> TokenLayout:
        ps = self.config.patch_size
        patch = (ps, ps) if isinstance(ps, int) else tuple(ps)
        grid = (input_size[1] // patch[0], input_size[2] // patch[1])
        n_reg = int(getattr(self.config, "num_register_tokens", 0) or 0)
        if self.model_type == "deit":
            return TokenLayout(2, 0, 1, (), grid, patch)  # type: ignore[arg-type]
        if self.model_type.startswith("siglip"):
            return TokenLayout(0, None, None, (), grid, patch)  # type: ignore[arg-type]
        return TokenLayout(1 + n_reg, 0, None, tuple(range(1, 1 + n_reg)), grid, patch)  # type: ignore[arg-type]

    # ----------------------------------------------------------------- pieces
    def _mae_noise(self, x: torch.Tensor) -> torch.Tensor:
        """ViT-MAE shuffles the patches by ``argsort(noise)`` even with nothing masked; increasing noise
        keeps them in order."""
        n = self.base.embeddings.patch_embeddings.num_patches
        return torch.arange(n, device=x.device, dtype=torch.float32).expand(x.shape[0], n)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        b = self.base
        t = self.model_type
        if t.startswith("clip"):
            return b.pre_layrnorm(b.embeddings(x))
        if t == "vit_mae":
            return b.embeddings(x, noise=self._mae_noise(x))[0]
        self._resolution = (int(x.shape[2]), int(x.shape[3]))
        if t == "data2vec-vision":
            return b.embeddings(x)[0]
        return b.embeddings(x)

    def _window(self) -> tuple[tuple[int, int], tuple[int, int]]:
        res = self._resolution
        if res is None:
            size = self.config.image_size
            res = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        ps = self.config.patch_size
        return res, (res[0] // ps, res[1] // ps)

    def run_block(self, i: int, h: torch.Tensor) -> torch.Tensor:
        t = self.model_type
        if t in ("beit", "data2vec-vision"):
            _, window = self._window()
            if h.shape[1] != 1 + window[0] * window[1]:
                raise ValueError(
                    f"{type(self.module).__name__}: its relative position bias is made for {1 + window[0] * window[1]} "
                    f"tokens, got {h.shape[1]}. Run the blocks on the full sequence (token dropping is not supported "
                    "for relative-position-bias models)."
                )
        if t == "beit":
            res, window = self._window()
            sp = self.base.shared_position_bias
            shared = sp(window, interpolate_pos_encoding=False, dim_size=h.shape[1]) if sp is not None else None
            out = self.blocks[i](h, attention_mask=shared, resolution=res)
        elif t == "data2vec-vision":
            res, window = self._window()
            enc = self.base.encoder
            shared = (
                enc.relative_position_bias(window, interpolate_pos_encoding=False, dim_size=h.shape[1])
                if enc.has_relative_position_bias
                else None
            )
            out = self.blocks[i](h, relative_position_bias=shared, resolution=res)
        elif t == "dinov3_vit":
            out = self.blocks[i](h, attention_mask=None, position_embeddings=self._rope(h))
        else:
            out = self.blocks[i](h, attention_mask=None)
        return out[0] if isinstance(out, tuple) else out

    def _rope(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """DINOv3's rotary ``(cos, sin)`` for the patch grid of the last :meth:`embed` (it depends on
        the grid only), as its forward computes them."""
        res, window = self._window()
        n = int(getattr(self.config, "num_register_tokens", 0) or 0) + 1 + window[0] * window[1]
        if h.shape[1] != n:
            raise ValueError(
                f"{type(self.module).__name__}: its rotary embedding is made for {n} tokens (a {window[0]}x{window[1]} grid), "
                f"got {h.shape[1]}. Run the blocks on the full sequence (token dropping is not supported for this model)."
            )
        key = (res, h.device, h.dtype)
        if getattr(self, "_rope_key", None) != key:
            self._rope_key, self._rope_value = key, self.base.rope_embeddings(h.new_empty((1, 3, res[0], res[1])))
        return self._rope_value

    def _final(self, h: torch.Tensor) -> torch.Tensor:
        """Residual stream after the last block -> the model's ``last_hidden_state``."""
        t = self.model_type
        if t.startswith("clip"):
            return h
        if t.startswith("siglip"):
            return self.base.post_layernorm(h)
        if t == "dinov3_vit":
            return self.base.norm(h)
        return self.base.layernorm(h)

    def _pool(self, last: torch.Tensor, pooler_output: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``last_hidden_state`` -> the pooled image embedding ``(B, D)``."""
        t = self.model_type
        b = self.base
        if t.startswith("clip"):
            pooled = pooler_output if pooler_output is not None else b.post_layernorm(last[:, 0])
            proj = getattr(self.module, "visual_projection", None)  # (CLIPVisionModelWithProjection: into the joint space)
            return proj(pooled) if proj is not None else pooled
        if t.startswith("siglip"):
            if getattr(b, "use_head", False):
                return pooler_output if pooler_output is not None else b.head(last)
            return last.mean(dim=1)
        if t in ("beit", "data2vec-vision"):
            if pooler_output is not None:
                return pooler_output
            if b.pooler is not None:
                return b.pooler(last)
            return last[:, 1:].mean(dim=1) if self.config.use_mean_pooling else last[:, 0]
        return last[:, 0]  # CLS after the final layer norm

    def readout_modules(self, through_embedding: bool = False) -> list[nn.Module]:
        """SigLIP's attention-pooling head, when the tower has one and the readout goes through it: a
        backbone's (its readout is its embedding), or any readout of the embedding
        (``through_embedding``); SigLIP's classifier reads the mean of the tokens instead."""
        if self.readout_kind is not None and not through_embedding:
            return []
        head = getattr(self.base, "head", None) if self.model_type.startswith("siglip") and getattr(self.base, "use_head", False) else None
        return [head] if head is not None else []

    def pooling(self) -> Optional[tuple[str, int]]:
        """How :meth:`embedding` pools the tokens: ``("token", 0)`` (CLS), ``("mean", first)`` (the mean
        of tokens ``first..``), or None (SigLIP's attention-pooling head)."""
        t, b = self.model_type, self.base
        if t.startswith("siglip"):
            return None if getattr(b, "use_head", False) else ("mean", 0)
        if t in ("beit", "data2vec-vision") and getattr(self.config, "use_mean_pooling", False):
            return ("mean", 1)
        return ("token", 0)

    def embedding(self, h: torch.Tensor) -> torch.Tensor:
        """The pooled image embedding ``(B, D)``: CLS after the final norm (ViT, DeiT, DINOv2, MAE),
        the pooler output (CLIP, projected into the joint space for a whole CLIP; SigLIP with its
        attention-pooling head; BEiT / Data2Vec), or the mean
        over tokens (SigLIP without a head)."""
        return self._pool(self._final(h))

    def readout(self, h: torch.Tensor) -> torch.Tensor:
        """Class logits, or the pooled embedding for a backbone without a classifier."""
        kind = self.readout_kind
        if kind is None:
            return self.embedding(h)
        h = self._final(h)
        m = self.module
        if kind == "cls":
            return m.classifier(h[:, 0])
        if kind == "cls_dist_mean":
            return (m.cls_classifier(h[:, 0]) + m.distillation_classifier(h[:, 1])) / 2
        if kind == "cls_patch_mean":
            prefix = 1 + int(getattr(self.config, "num_register_tokens", 0) or 0)
            return m.classifier(torch.cat([h[:, 0], h[:, prefix:].mean(dim=1)], dim=1))
        if kind == "patch_mean":
            return m.classifier(h[:, 1:].mean(dim=1))
        if kind == "token_mean":
            return m.classifier(h.mean(dim=1))
        if kind == "pooler":
            return m.classifier(self._pool(h))
        raise ValueError(f"{type(m).__name__}: unknown readout {kind!r}")

    # ------------------------------------------- pieces of a block (SplitBlocks)
    def _split_layer(self, i: int) -> Optional[nn.Module]:
        """Layer ``i`` when it is a ViT / DeiT layer of the current transformers layout (pre-norm,
        ``q_proj`` / ``k_proj`` / ``v_proj`` / ``o_proj`` attention, no layer scale), the one whose
        pieces :meth:`finish_block` and :meth:`run_block_queries` mirror; else None. Older releases
        (``ViTSelfAttention`` + ``ViTSelfOutput``) and the other families get the whole layer."""
        layer = self.blocks[i]
        if self.model_type not in ("vit", "deit") or type(layer).__name__ not in ("ViTLayer", "DeiTLayer"):
            return None
        att = getattr(layer, "attention", None)
        if type(att).__name__ not in ("ViTAttention", "DeiTAttention"):
            return None
        if not all(hasattr(att, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling")):
            return None
        if not all(hasattr(layer, n) for n in ("layernorm_before", "layernorm_after", "mlp", "dropout")):
            return None
        return layer

    def output_projection(self, i: int) -> Optional[nn.Linear]:
        """``attention.o_proj`` of a ViT / DeiT layer: it takes the heads' contexts side by side."""
        layer = self._split_layer(i)
        return None if layer is None else layer.attention.o_proj

    def finish_block(self, i: int, h: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        layer = self._split_layer(i)
        if layer is None:
            raise NotImplementedError(f"layer {i} of {type(self.module).__name__} cannot be run in pieces; run it whole")
        mid = layer.dropout(attn_out) + h
        return layer.dropout(layer.mlp(layer.layernorm_after(mid))) + mid

    def can_run_queries(self, i: int) -> bool:
        return self._split_layer(i) is not None

    def run_block_queries(self, i: int, h: torch.Tensor, n: int) -> torch.Tensor:
        """Mirrors ``ViTLayer.forward`` / ``ViTAttention.forward`` (SDPA) with the query projection,
        attention, output projection and MLP on the first ``n`` tokens only."""
        layer = self._split_layer(i)
        if layer is None:
            raise NotImplementedError(f"layer {i} of {type(self.module).__name__} cannot be run in pieces; run it whole")
        att = layer.attention
        B, T, _ = h.shape
        y = layer.layernorm_before(h)
        q = att.q_proj(y[:, :n]).view(B, n, -1, att.head_dim).transpose(1, 2)
        k = att.k_proj(y).view(B, T, -1, att.head_dim).transpose(1, 2)
        v = att.v_proj(y).view(B, T, -1, att.head_dim).transpose(1, 2)
        p = att.attention_dropout if att.training else 0.0
        ctx = F.scaled_dot_product_attention(q, k, v, dropout_p=p, scale=att.scaling).transpose(1, 2).reshape(B, n, -1)
        mid = layer.dropout(att.o_proj(ctx)) + h[:, :n]
        return layer.dropout(layer.mlp(layer.layernorm_after(mid))) + mid

    def readout_tokens(self) -> Optional[int]:
        """1 for the ViT / DeiT classifiers (CLS after the final layer norm), 2 for DeiT with its
        distillation head (CLS and distillation token); None for the pooled and mean readouts."""
        if self.model_type not in ("vit", "deit"):
            return None
        return {"cls": 1, "cls_dist_mean": 2}.get(self.readout_kind or "")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The library's own forward: logits, or for a backbone its pooled embedding."""
        kw: dict[str, Any] = {"noise": self._mae_noise(x)} if self.model_type == "vit_mae" else {}
        out = self.module(pixel_values=x, **kw)
        if self.readout_kind is not None:
            return out.logits
        if getattr(out, "image_embeds", None) is not None:
            return out.image_embeds  # (CLIP with its projection)
        return self._pool(out.last_hidden_state, getattr(out, "pooler_output", None))


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
        if not source:
            raise LookupError("no processor to read")
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


def wrap_hf(
    model: nn.Module,
    *,
    source: str = "",
    device: Union[str, torch.device, None] = None,
    weights_sha256: Optional[str] = None,
    read_processor: bool = True,
) -> ViT:
    """Wrap an already built transformers model. ``read_processor=False``: take the preprocessing from
    the config alone instead of looking up ``source``'s image processor (a model built in memory
    has none, and a lookup by name would go to the hub)."""
    from vitscope.models.loader import resolve_device

    backend = HFBackend(model)
    prep = _preprocessing(source if read_processor else "", backend.config)
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
    """Load ``hf:<hub id or local folder>`` (classification head if the checkpoint has one; the vision
    tower of a whole CLIP / SigLIP; a ViT-MAE encoder with masking off)."""
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
    auto: Any = transformers.AutoModelForImageClassification if head else transformers.AutoModel
    extra: dict[str, Any] = {}
    if not head and config.model_type in _VISION_TOWERS:
        # a whole CLIP / SigLIP (image and text): its vision tower is the ViT
        auto = getattr(transformers, _VISION_TOWERS[config.model_type])
        if config.model_type == "clip":  # the projection's size lives in the whole model's config
            vision = copy.deepcopy(config.vision_config)
            vision.projection_dim = config.projection_dim
            extra["config"] = vision
    if config.model_type == "vit_mae":
        extra["mask_ratio"] = 0.0  # the encoder sees every patch, in order (pre-training masks 75 %)
    try:
        model = auto.from_pretrained(source, attn_implementation="sdpa", **extra)
    except Exception as e:  # noqa: BLE001
        raise ModelLoadError(f"could not load Hugging Face model {source!r}: {e}") from e
    sha = None
    folder = Path(source)
    if folder.is_dir():
        from vitscope.models.weights import file_sha256

        files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
        sha = file_sha256(files[0]) if len(files) == 1 else None
    return wrap_hf(model, source=source, device=device, weights_sha256=sha)

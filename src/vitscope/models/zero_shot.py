"""Zero-shot class logits for CLIP and SigLIP models from their own text towers.

``analyze --objective zero-shot`` turns a CLIP / SigLIP vision tower into a classifier over the
image set's class names: each class's prompt (``"a photo of a {}."`` by default; several prompts
are averaged as in CLIP's prompt ensembling) goes through the model's text tower once, and the
image logits are the model's own ``logits_per_image``. The text tower is used only here, and freed
afterwards: what stays is a :class:`~vitscope.models.readouts.ZeroShotReadout` holding one text
embedding per class, the visual projection and the logit scale (and SigLIP's bias).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import torch

from vitscope.models.errors import ModelLoadError
from vitscope.models.readouts import ZeroShotReadout

#: CLIP's plain prompt; pass several to average them.
DEFAULT_PROMPTS: tuple[str, ...] = ("a photo of a {}.",)


def zero_shot_readout(
    model: Union[str, Path, torch.nn.Module],
    class_names: Sequence[str],
    prompts: Sequence[str] = DEFAULT_PROMPTS,
    *,
    tokenizer: Optional[Callable[[list[str]], Any]] = None,
    batch_size: int = 256,
    project: bool = True,
) -> ZeroShotReadout:
    """The zero-shot readout of a whole Hugging Face ``CLIPModel`` or ``SiglipModel``.

    Args:
        model: the model, or its hub id / local folder (``hf:`` prefix allowed), loaded with its text
            tower.
        class_names: one name per class, in class-index order; each prompt's ``{}`` is filled with it.
        prompts: prompt templates; the text embeddings of a class's prompts are averaged after
            normalising, then normalised again.
        tokenizer: texts -> a dict of ``input_ids`` (and ``attention_mask``) tensors; default the
            model folder's own tokenizer (``AutoTokenizer``, SigLIP padded to ``max_length`` as it
            was trained).
        project: apply CLIP's visual projection to the embedding the readout is given. ``False``
            when that embedding is already in the joint space: a whole CLIP loaded by vitscope
            (``hf:<CLIP>`` loads ``CLIPVisionModelWithProjection``, whose embedding is
            ``image_embeds``); ``True`` for a bare ``CLIPVisionModel`` tower.
    """
    if not class_names:
        raise ValueError("zero-shot classification needs class names; give images in class sub-folders or a labels CSV with names")
    if not prompts or any("{}" not in p for p in prompts):
        raise ValueError(f"every prompt needs a '{{}}' where the class name goes, got {list(prompts)!r}")
    source = None
    if not isinstance(model, torch.nn.Module):
        source = str(model).removeprefix("hf:")
        model = _load_whole(source)
    kind = type(model).__name__
    if kind not in ("CLIPModel", "SiglipModel", "Siglip2Model"):
        raise ModelLoadError(f"zero-shot classification needs a whole CLIPModel or SiglipModel (image and text towers), got {kind}")
    siglip = kind.startswith("Siglip")
    if tokenizer is None:
        if source is None:
            raise ValueError("pass tokenizer= (the model's own, e.g. AutoTokenizer.from_pretrained(<its folder>)) with a model object")
        tokenizer = _own_tokenizer(source, siglip)
    device = next(model.parameters()).device
    texts = [p.format(name) for name in class_names for p in prompts]
    feats = []
    with torch.no_grad():
        for i in range(0, len(texts), batch_size):
            tokens = {k: v.to(device) for k, v in dict(tokenizer(texts[i : i + batch_size])).items() if k in ("input_ids", "attention_mask")}
            out = model.get_text_features(**tokens)
            feats.append(torch.nn.functional.normalize(getattr(out, "pooler_output", out).float(), dim=-1))
    text = torch.cat(feats).reshape(len(class_names), len(prompts), -1).mean(1)  # (normalised again by the readout)
    scale = float(model.logit_scale.detach().exp())
    bias = float(model.logit_bias.detach()) if siglip else 0.0
    proj = None if siglip or not project else model.visual_projection.weight.detach().float().cpu()
    return ZeroShotReadout(text.cpu(), class_names, scale=scale, bias=bias, projection=proj, prompts=prompts)


def _load_whole(source: str) -> torch.nn.Module:
    try:
        import transformers
    except ImportError as e:
        raise ModelLoadError("zero-shot classification needs transformers: pip install 'vitscope[hf]'") from e
    try:
        return transformers.AutoModel.from_pretrained(source).eval()
    except Exception as e:  # noqa: BLE001
        raise ModelLoadError(f"could not load the whole model (image and text towers) from {source!r}: {e}") from e


def _own_tokenizer(source: str, siglip: bool) -> Callable[[list[str]], Any]:
    import transformers

    try:
        tok = transformers.AutoTokenizer.from_pretrained(source)
    except Exception as e:  # noqa: BLE001
        raise ModelLoadError(f"could not load the tokenizer of {source!r} ({e}); pass tokenizer= yourself") from e
    padding = "max_length" if siglip else True  # SigLIP's text tower was trained on max-length padding
    return lambda texts: tok(texts, padding=padding, truncation=True, return_tensors="pt")

"""Attention explanations: one relevance map over the patch grid per image.

Raw attention shows what one head of one layer mixes; an *explanation* answers "which patches made
the model say this?" with a single map. This module computes the attention-based explanations the
literature compares, from vitscope's exact attention capture (no fused-attention pitfalls):

- ``"attention"``: the last layer's attention from the CLS token to each patch, averaged over heads
  (or one head). The usual "raw attention" baseline. (Mean-pooling models: see below.)
- ``"rollout"``: attention rollout (Abnar & Zuidema, "Quantifying Attention Flow in
  Transformers", ACL 2020), as popularised for ViTs by Jacob Gildenblat's *vit-explain*: per layer
  fuse the heads (mean, max or min), optionally zero the weakest entries (``discard_ratio``), add
  the residual connection as ``0.5 A + 0.5 I``, renormalise the rows and multiply the layers from
  first to last; the explanation is the CLS row of the product over the patch columns.
- ``"grad_rollout"``: the same product over gradient-weighted attention
  ``(mean_h ∂y/∂A ⊙ A)⁺`` (vit-explain's ``grad_rollout``): class-specific.
- ``"relevance"``: Chefer, Gur & Wolf, "Generic Attention-model Explainability for Interpreting
  Bi-Modal and Encoder-Decoder Transformers" (ICCV 2021): ``R = I``, and for each layer
  ``R ← R + mean_h[(∂y/∂A ⊙ A)⁺] · R``; the explanation is the CLS row of ``R`` over the patches.
- ``"interaction"``: each patch's aggregated first-order interaction impact (Ma et al.,
  "Visualizing and Understanding Patch Interactions in Vision Transformer", 2022), the per-image
  patch ranking that paper's indiscriminative-patch removal uses:

      map[j] = -sum_l sum_q sum_h  dloss/dA_l^h[q, j] * A_l^h[q, j]

  over every layer ``l``, every query token ``q`` (prefix tokens and patches) and every head ``h``,
  for key patch ``j``, with ``loss`` the cross-entropy of the explained class. It is the
  first-order estimate of how much the loss rises when patch ``j`` is removed as a *key* (its
  post-softmax attention column zeroed, without renormalising) for every query in every layer,
  i.e. :func:`vitscope.analysis.interaction.key_importance` of
  :func:`~vitscope.analysis.interaction.first_order_impact`, the same numbers as a run's
  ``interaction_key_importance``. Summed over all layers and queries, not read off the last
  layer's CLS query, because the paper's patch explanation is the patch's impact through all its
  interactions: in a CLS-readout model the last layer's CLS query alone is one layer's
  gradient x attention, and the earlier layers are where patches interact with each other. Signed
  (a patch whose removal would lower the loss scores below 0) and needs no CLS token.
- ``"random"``: a seeded uniform map, the floor every explanation must beat in a faithfulness test.

``y`` is the logit of the explained class (``target``; default the model's own prediction), as in
Chefer et al., who back-propagate the one-hot logit rather than a loss; ``"interaction"`` uses the
explained class's cross-entropy instead, as Ma et al.'s interaction indicator is a loss change. Images
in a batch stay independent: the gradient is that of ``sum_i y_i[target_i]`` (or of the summed
losses), and a ViT never mixes images.

Prefix tokens beyond CLS (distillation, registers) take part in every product like any token; only
the final CLS row is restricted to the patch columns (``layout.patch_slice``) and reshaped to the
patch grid. For a model that reads out the *mean* of its tokens instead of a CLS token (global
average pooling: timm ``global_pool="avg"``, SigLIP without its head, BEiT's mean pooling) the row
read is that mean: the average of the rows of the tokens it pools (its "readout row",
:meth:`vitscope.ViT.readout_row`), in each method where the CLS row stands above. A readout that
pools by attention (SigLIP's and timm's attention-pooling heads, CaiT's class-attention blocks)
attends with a query whose attention is not in any analysed layer, so there is no row to read: the
row-based methods refuse it, and ``"interaction"`` and ``"random"`` apply to every model.

Deviations from vit-explain's code, each a fix rather than a choice: rows are renormalised by their
own sum (vit-explain divides by a broadcast that normalises columns), every image of a batch gets its
own discarding (vit-explain discards in image 0 only), each layer's gradient is paired with that
layer's attention (vit-explain's backward hooks record them last layer first and zip them with the
forward order), and the map is not divided by its maximum (the ordering of patches, which is what
the faithfulness tests read, is unchanged).
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any, Iterable, Optional, Union

import torch

from vitscope.analysis.inputs import class_indices
from vitscope.capture.runtime import LayerPlan
from vitscope.models.vit import CaptureError

if TYPE_CHECKING:  # pragma: no cover
    from vitscope.models.vit import ViT

#: Every explanation method, in the order results are reported.
METHODS: tuple[str, ...] = ("attention", "rollout", "grad_rollout", "relevance", "interaction", "random")
#: Methods that read the readout's attention row: the CLS token's, or for a mean-pooling model the
#: mean of the pooled tokens' rows (they do not apply to attention-pooling readouts).
CLS_METHODS: tuple[str, ...] = ("attention", "rollout", "grad_rollout", "relevance")
#: Methods that need one backward pass (of the target logit).
GRADIENT_METHODS: tuple[str, ...] = ("grad_rollout", "relevance")
#: Methods that need a classification head (a class logit or loss to differentiate).
HEAD_METHODS: tuple[str, ...] = ("grad_rollout", "relevance", "interaction")
#: How :func:`explain`'s ``"rollout"`` fuses the heads of a layer.
HEAD_FUSIONS: tuple[str, ...] = ("mean", "max", "min")

#: option -> (default, methods that read it)
OPTIONS: dict[str, tuple[Any, tuple[str, ...]]] = {
    "head": (None, ("attention",)),
    "head_fusion": ("mean", ("rollout",)),
    "discard_ratio": (0.0, ("rollout", "grad_rollout")),
    "seed": (0, ("random",)),
}

Target = Union[None, int, torch.Tensor, Iterable[int]]


def explain(vit: "ViT", x: Any, method: str, target: Target = None, **options: Any) -> torch.Tensor:
    """One explanation map per image, ``(B, rows, cols)`` float32 on the model's device.

    Args:
        vit: a loaded model (:func:`vitscope.load_model`).
        x: a preprocessed ``(B, C, H, W)`` tensor, or images (paths, PIL images, arrays).
        method: one of :data:`METHODS`.
        target: the class to explain, an int for every image or one index per image (LongTensor
            ``(B,)`` or a sequence); ``None``: each image's predicted class. Only the gradient
            methods (``grad_rollout``, ``relevance``, ``interaction``) depend on it.
        **options: ``head`` (attention: one head instead of the mean), ``head_fusion`` (rollout:
            ``"mean"``, ``"max"`` or ``"min"``), ``discard_ratio`` (rollout, grad_rollout: fraction
            in ``[0, 1)`` of each layer's fused matrix entries zeroed, smallest first, the CLS→CLS
            entry always kept; default 0), ``seed`` (random).

    Larger values mean more relevant; the scale differs between methods (only orderings compare).
    """
    if not isinstance(method, str):
        raise TypeError(f"method must be a string, one of {', '.join(METHODS)}; to compute several use explain_all")
    return explain_all(vit, x, (method,), target, **options)[method]


def explain_all(
    vit: "ViT", x: Any, methods: Iterable[str] = METHODS, target: Target = None, **options: Any
) -> dict[str, torch.Tensor]:
    """Several explanations of the same images from one forward pass (and at most one backward).

    Same arguments as :func:`explain` with a sequence of ``methods``; each option applies to every
    requested method that reads it, and must be read by at least one of them. Returns
    ``{method: (B, rows, cols)}`` in the order asked. ``"interaction"`` differentiates a loss, not
    a logit, so it runs its own forward and backward beside the shared pass of the others.
    """
    methods = _check_methods(vit, methods)
    opts = _check_options(vit, methods, options)
    x = _as_batch(vit, x)
    B = x.shape[0]
    layout = vit.layout
    rows, cols = layout.grid
    out: dict[str, torch.Tensor] = {}
    cls_methods = [m for m in methods if m in CLS_METHODS]
    if cls_methods:
        maps = _cls_explanations(vit, x, cls_methods, target, opts)
        out.update(maps)
    elif target is not None and vit.num_classes:
        _resolve_target(target, torch.zeros(B, dtype=torch.long, device=x.device), vit.num_classes)
    if "interaction" in methods:
        out["interaction"] = interaction_maps(vit, x, target)
    if "random" in methods:
        out["random"] = _random_maps(x, (rows, cols), int(opts["seed"])).to(x.device)
    return {m: out[m] for m in methods}


def interaction_maps(vit: "ViT", x: torch.Tensor, target: Target = None) -> torch.Tensor:
    """The ``"interaction"`` explanation of a preprocessed batch, ``(B, rows, cols)`` float32.

    :func:`~vitscope.analysis.interaction.key_importance` (prefix queries included) of
    :func:`~vitscope.analysis.interaction.first_order_impact` for the explained class: one forward
    with the explicit kernel in every layer and one backward of the summed cross-entropies (about 3
    forward-equivalents), no parameter gradients.
    """
    from vitscope.analysis.interaction import first_order_impact, key_importance

    B = x.shape[0]
    if target is not None:
        # explain's target rules (no -1 for "the prediction"), checked before the passes run
        target = _resolve_target(target, torch.zeros(B, dtype=torch.long), vit.num_classes).numpy()
    r = first_order_impact(vit, x, target)
    score = key_importance(r["impact"], r["prefix_impact"])  # (B, P) float64
    return torch.from_numpy(score).to(torch.float32).reshape(B, *vit.layout.grid).to(x.device)


# --------------------------------------------------------------------------- the one pass
def _cls_explanations(
    vit: "ViT", x: torch.Tensor, methods: list[str], target: Target, opts: dict[str, Any]
) -> dict[str, torch.Tensor]:
    layout = vit.layout
    L = vit.num_layers
    cls = layout.cls_index
    read = vit.readout_row()  # (T,): one-hot at CLS, or uniform over the mean-pooled tokens
    assert read is not None  # (refused by _check_methods)
    by_cls = cls is not None and bool(read[cls] == 1)
    patches = layout.patch_slice
    B = x.shape[0]
    T = layout.num_tokens
    want = set(methods)
    need_grad = bool(want & set(GRADIENT_METHODS))
    head = opts["head"]
    fusion = opts["head_fusion"]
    discard = float(opts["discard_ratio"])

    last_row: list[torch.Tensor] = []
    rollout_mats: dict[int, torch.Tensor] = {}
    grad_rollout_mats: dict[int, torch.Tensor] = {}
    relevance_mats: dict[int, torch.Tensor] = {}
    seen_forward: set[int] = set()
    seen_backward: set[int] = set()

    def on_attention(layer: int, attn: torch.Tensor) -> None:
        seen_forward.add(layer)
        a = attn.float()
        if "attention" in want and layer == L - 1:
            # (B, H, P): the CLS row, or the mean of the pooled tokens' rows
            row = a[:, :, cls, patches] if by_cls else torch.einsum("t,bhtk->bhk", read.to(a), a)[..., patches]
            last_row.append(row.mean(1) if head is None else row[:, head])
        if "rollout" in want:
            rollout_mats[layer] = rollout_matrix(fuse_heads(a, fusion), discard)

    def on_gradient(layer: int, attn: torch.Tensor, grad: torch.Tensor) -> None:
        seen_backward.add(layer)
        cam = attn.float() * grad.float()
        if "grad_rollout" in want:
            # vit-explain: the mean over heads first, then its positive part.
            grad_rollout_mats[layer] = rollout_matrix(cam.mean(1).clamp(min=0), discard)
        if "relevance" in want:
            # Chefer et al.: the positive part of each head first, then the mean over heads.
            relevance_mats[layer] = cam.clamp(min=0).mean(1)

    every_layer = bool(want - {"attention"})
    layers = range(L) if every_layer else [L - 1]
    plans = {
        layer: LayerPlan(
            on_attention=on_attention if ("rollout" in want or ("attention" in want and layer == L - 1)) else None,
            on_gradient=on_gradient if need_grad else None,
        )
        for layer in layers
    }
    with torch.set_grad_enabled(need_grad):
        h0 = vit.embed(x)
        if need_grad:
            h0 = h0.detach().requires_grad_(True)
        h = vit.run_blocks(h0, plans=plans)
        _check(vit, seen_forward, [l for l, p in plans.items() if p.on_attention is not None], "forward")
        if need_grad:
            logits = vit.readout(h)
            t = _resolve_target(target, logits.detach().argmax(-1), vit.num_classes)
            objective = logits.gather(1, t[:, None]).sum()
            # autograd.grad, not backward(): no parameter gradients are computed or accumulated.
            torch.autograd.grad(objective, h0)
            _check(vit, seen_backward, list(plans), "backward")
        elif target is not None and vit.num_classes:
            _resolve_target(target, torch.zeros(B, dtype=torch.long, device=x.device), vit.num_classes)

    out: dict[str, torch.Tensor] = {}
    start = read.to(device=x.device, dtype=torch.float64).expand(B, T)
    for method in methods:
        if method == "attention":
            flat = last_row[0]
        elif method == "rollout":
            flat = _cls_row_of_product(start, rollout_mats, L, residual=False)[:, patches]
        elif method == "grad_rollout":
            flat = _cls_row_of_product(start, grad_rollout_mats, L, residual=False)[:, patches]
        else:  # relevance
            flat = _cls_row_of_product(start, relevance_mats, L, residual=True)[:, patches]
        out[method] = flat.to(torch.float32).reshape(B, *layout.grid)
    return out


def _cls_row_of_product(start: torch.Tensor, mats: dict[int, torch.Tensor], L: int, *, residual: bool) -> torch.Tensor:
    """The CLS row of ``M_{L-1} ... M_1 M_0`` (``residual``: of ``(I + M_{L-1}) ... (I + M_0)``).

    Only the row is needed, so it is carried as a vector from the last layer down,
    ``r ← r M_l`` (``r ← r + r M_l``): ``O(T²)`` per layer instead of a ``T×T`` matrix product.
    Float64, so the order of the products does not show in the result.
    """
    r = start
    for layer in reversed(range(L)):
        step = torch.bmm(r[:, None, :], mats[layer].to(torch.float64))[:, 0]
        r = r + step if residual else step
    return r


# --------------------------------------------------------------------------- the building blocks
def fuse_heads(attn: torch.Tensor, fusion: str) -> torch.Tensor:
    """``(B, H, T, T)`` -> ``(B, T, T)`` by the mean, max or min over heads (vit-explain's ``head_fusion``)."""
    if fusion == "mean":
        return attn.mean(1)
    if fusion == "max":
        return attn.amax(1)
    if fusion == "min":
        return attn.amin(1)
    raise ValueError(f"head_fusion must be one of {', '.join(HEAD_FUSIONS)}, got {fusion!r}")


def discard_smallest(fused: torch.Tensor, ratio: float) -> torch.Tensor:
    """Zero the ``int(T*T*ratio)`` smallest entries of each image's ``(T, T)`` matrix, except the
    first (CLS→CLS) entry, which is always kept (vit-explain's rule: when it is among the smallest,
    one entry fewer is zeroed). Returns a new tensor."""
    B = fused.shape[0]
    flat = fused.reshape(B, -1).clone()
    k = int(flat.shape[1] * ratio)
    if k > 0:
        first = flat[:, 0].clone()
        idx = flat.topk(k, dim=-1, largest=False).indices
        flat.scatter_(1, idx, 0.0)
        flat[:, 0] = first
    return flat.reshape(fused.shape)


def rollout_matrix(fused: torch.Tensor, discard_ratio: float = 0.0) -> torch.Tensor:
    """One layer's factor of the rollout product: ``discard``, then ``0.5 A + 0.5 I`` with its rows
    renormalised to sum to 1 (the residual connection carries half of each token's information)."""
    a = discard_smallest(fused, discard_ratio) if discard_ratio > 0 else fused
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    a = 0.5 * a + 0.5 * eye
    return a / a.sum(-1, keepdim=True)


def _random_maps(x: torch.Tensor, grid: tuple[int, int], seed: int) -> torch.Tensor:
    """Uniform ``[0, 1)`` maps; each image's generator is seeded with ``seed`` and a hash of the
    image itself, so an image gets the same map whatever batch it is explained in, and different
    images get different maps."""
    maps = []
    for img in x:
        raw = img.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        digest = hashlib.sha256(seed.to_bytes(8, "little", signed=True) + raw).digest()
        g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
        maps.append(torch.rand(grid, generator=g))
    return torch.stack(maps) if maps else torch.zeros(0, *grid)


# --------------------------------------------------------------------------- checking arguments
def _check_methods(vit: "ViT", methods: Iterable[str]) -> list[str]:
    if isinstance(methods, str):
        methods = [methods]
    methods = list(dict.fromkeys(methods))
    if not methods:
        raise ValueError(f"no methods given; choose from {', '.join(METHODS)}")
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise ValueError(f"unknown explanation method(s) {bad}; valid methods: {', '.join(METHODS)}")
    if vit.readout_row() is None:
        need = [m for m in methods if m in CLS_METHODS]
        if need:
            raise ValueError(
                f"{vit.name} pools its tokens by attention (an attention-pooling head or class-attention blocks), so "
                f"{', '.join(need)} cannot be computed: the methods {', '.join(CLS_METHODS)} all read the readout's row of "
                "attention (the CLS token's, or the mean of the pooled tokens'), and this readout's query attends outside the "
                "analysed layers; none of them applies to this model (only 'interaction' and 'random' do)"
            )
    if any(m in HEAD_METHODS for m in methods) and not vit.num_classes:
        raise ValueError(
            f"{vit.name} has no classification head, so {', '.join(m for m in methods if m in HEAD_METHODS)} "
            "(gradients of a class logit or loss) cannot be computed; load a model with a classifier"
        )
    return methods


def _check_options(vit: "ViT", methods: list[str], options: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise TypeError(f"unknown option(s) {unknown}; explanation options are {', '.join(OPTIONS)}")
    for name in options:
        readers = OPTIONS[name][1]
        if not set(readers) & set(methods):
            raise ValueError(f"option {name!r} is read by {', '.join(readers)} only, none of which was asked for ({', '.join(methods)})")
    opts = {name: options.get(name, default) for name, (default, _) in OPTIONS.items()}
    if opts["head"] is not None:
        head = opts["head"]
        if isinstance(head, bool) or not isinstance(head, int) or not 0 <= head < vit.num_heads:
            raise ValueError(f"head {head!r} out of range: {vit.name} has heads 0..{vit.num_heads - 1}")
    if opts["head_fusion"] not in HEAD_FUSIONS:
        raise ValueError(f"head_fusion must be one of {', '.join(HEAD_FUSIONS)}, got {opts['head_fusion']!r}")
    ratio = opts["discard_ratio"]
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= float(ratio) < 1.0:
        raise ValueError(f"discard_ratio must be a number in [0, 1), got {ratio!r}")
    if isinstance(opts["seed"], bool) or not isinstance(opts["seed"], int):
        raise ValueError(f"seed must be an int, got {opts['seed']!r}")
    return opts


def _as_batch(vit: "ViT", x: Any) -> torch.Tensor:
    if not (isinstance(x, torch.Tensor) and x.ndim == 4 and x.is_floating_point()):
        x = vit.preprocess(x)
    return x.to(vit.device, dtype=vit.dtype)


def _resolve_target(target: Target, prediction: torch.Tensor, num_classes: Optional[int]) -> torch.Tensor:
    """``target`` as a ``(B,)`` long tensor on ``prediction``'s device (``None``: the prediction)."""
    if target is None:
        return prediction
    return class_indices(target, prediction.shape[0], num_classes, "target").to(prediction.device)


def _check(vit: "ViT", seen: set[int], wanted: list[int], phase: str) -> None:
    missing = sorted(set(wanted) - seen)
    if missing:
        raise CaptureError(
            f"{vit.name}: layers {missing} never reached vitscope's attention kernel in the {phase} pass "
            "(their attention module bypasses it); no explanation is returned"
        )

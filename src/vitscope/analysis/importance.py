"""Head importance: what happens to the model when one attention head is pruned.

Pruning a head (Li et al. 2023, "Head importance") multiplies its post-softmax attention matrix
by a 0/1 mask without renormalisation. Pruning the whole matrix equals zeroing the head's slice of
the context vector before the output projection, which is what a head gate of 0
(:class:`~vitscope.capture.runtime.LayerPlan` ``head_gate``) does while keeping the fused kernel.

Per batch of images (a driver calls these batch by batch and stores the arrays):

- :func:`head_sweep`: prune every head alone and record the target probability, loss, correctness
  and how much the pruned block's output changed. Exact and fast: the layers before the pruned one
  are run once and shared, the pruned layer reuses its recorded attention, and a CLS readout's last
  block computes only the CLS row (about 17 forward passes for DeiT-Tiny instead of ``L * H = 36``).
- :func:`head_sweep_naive`: the same numbers from one full forward per head (the reference).
- :func:`taylor_importance`: the mask-gradient importance of Michel et al. (2019), one forward and
  one backward pass.
- :func:`partial_pruning`: the paper's six partial-pruning modes for one image and head.

Over a whole image set (pure functions on pandas frames):

- :func:`summarize_importance`: accuracy drop, probability drop, loss increase, layer change and
  Taylor importance per head with percentile-bootstrap confidence intervals over images.
- :func:`metric_agreement`: Spearman rank correlation between the metrics.
- :func:`pruning_curve` / :func:`pruning_curves`: accuracy as heads are removed cumulatively.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Optional, Union

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from vitscope.analysis.inputs import Targets
from vitscope.analysis.inputs import as_batch as _as_batch
from vitscope.analysis.inputs import resolve_targets as _resolve_targets
from vitscope.analysis.inputs import split_batch as _split_batch
from vitscope.capture.masks import REGIONS, region_matrix, regions_for
from vitscope.capture.runtime import LayerPlan
from vitscope.core.indices import check_head
from vitscope.models.vit import CaptureError
from vitscope.analysis.metrics import HEAD_METRICS, ranking_metrics
from vitscope.core.stats import bootstrap_means

if TYPE_CHECKING:  # pragma: no cover
    from vitscope.models.vit import ViT

#: Partial-pruning modes in the paper's order: mode ``i`` is ``MODES[i - 1]``.
MODES: tuple[str, ...] = ("none",) + REGIONS

#: Head-level metrics that rank heads (larger = more important); every metric is registered in
#: :mod:`vitscope.analysis.metrics`.
METRICS: tuple[str, ...] = ranking_metrics()

HeadOrder = Union[Sequence[tuple[int, int]], pd.DataFrame]


# --------------------------------------------------------------------------- helpers
def _check_head(vit: "ViT", layer: int, head: int) -> None:
    check_head(layer, head, vit.num_layers, vit.num_heads, vit.name)


def _stream_change(pruned: torch.Tensor, base: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(1 - cosine, relative L2)`` between block outputs, per image over all tokens x channels.

    ``1 - cos`` is ``||p/|p| - b/|b|||^2 / 2`` because ``1 - p.b / (|p||b|)`` of two nearly parallel
    vectors cancels to zero in floating point while their normalised difference does not. It is
    evaluated as ``(|d| - (|p| - |b|)) (|d| + (|p| - |b|)) / (2 |p| |b|)`` with ``d = p - b`` (the
    same quantity), in float64 from the exact difference, so small effects stay resolvable at the
    cost of three norms instead of normalising both outputs element by element (which cost the
    sweep about half a forward pass).
    """
    n = pruned.shape[0]
    p = pruned.reshape(n, -1)
    b = base.reshape(n, -1)
    pn = torch.linalg.vector_norm(p, dim=1, dtype=torch.float64)
    bn = torch.linalg.vector_norm(b, dim=1, dtype=torch.float64)
    dn = torch.linalg.vector_norm(p.double() - b.double(), dim=1)
    gap = pn - bn
    change = (dn - gap) * (dn + gap) / (2 * pn * bn)
    return change, dn / bn


def _record_stream(vit: "ViT", h: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Run the unpruned model from the embedding; ``stream[l]`` is the input of block ``l``
    (``stream[L]`` the output of the last block). Returns ``(stream, logits)``."""
    stream = [h]
    out = vit.run_blocks(h, on_block=lambda _l, o: stream.append(o))
    return stream, vit.readout(out)


# --------------------------------------------------------------------------- 1. head sweep
def _head_weights(proj: torch.nn.Linear, num_heads: int) -> torch.Tensor:
    """``proj.weight`` split by head as ``(H, d_head, D_out)``: ``ctx_h @ W[h]`` is head ``h``'s
    share of ``proj(ctx)`` (without the bias)."""
    w = proj.weight
    return w.reshape(w.shape[0], num_heads, w.shape[1] // num_heads).permute(1, 2, 0).contiguous()


#: What a head sweep measures the pruned model by (``objective=``): ``"label"``, the classifier's
#: probability, loss and correctness for the target class; ``"embedding"``, the change of the pooled
#: image embedding, ``1 - cos(pruned, unpruned)``, defined for every model (backbones included).
OBJECTIVES: tuple[str, ...] = ("label", "embedding")


def embedding_change(pruned: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """``1 - cos(pruned, base)`` per row of two ``(N, D)`` embeddings, in float64.

    Computed as ``||p/|p| - b/|b|||^2 / 2`` (the same quantity): ``1 - cos`` of two nearly parallel
    vectors cancels to zero in floating point, their normalised difference does not, so the small
    effect of one head stays resolvable.
    """
    p, b = pruned.double(), base.double()
    return 0.5 * (p / p.norm(dim=-1, keepdim=True) - b / b.norm(dim=-1, keepdim=True)).pow(2).sum(dim=-1)


def check_objective(vit: "ViT", objective: str) -> None:
    """Refuse an unknown objective, and ``"label"`` for a model without a classifier (say what to use)."""
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; use one of {', '.join(OBJECTIVES)}")
    if objective == "label" and not vit.num_classes:
        raise ValueError(
            f"{vit.name} has no classification head, so its pruned probabilities are undefined; "
            "use objective='embedding' (--objective embedding) to measure how much each head changes its image embedding"
        )


@torch.no_grad()
def head_sweep(
    vit: "ViT", x: Any, targets: Targets = None, *, chunk: Optional[int] = None, shortcuts: bool = True,
    objective: str = "label", layers: Optional[Sequence[int]] = None,
) -> dict[str, np.ndarray]:
    """Prune each head of each layer alone and measure the effect on every image of a batch.

    Args:
        vit: a loaded model (with a classification head for ``objective="label"``).
        x: preprocessed ``(B, C, H, W)`` batch (or images, which are preprocessed first).
        targets: class index per image; ``None`` or ``-1`` means the unpruned prediction.
        chunk: most rows run through the model at once (the sweep replicates the batch ``H``
            times per layer, ``B * H`` rows). ``None``: ``B`` rows per call on the CPU, so every
            call is as large and as cache-friendly as the plain forward of the batch (about 20%
            faster than ``B * H`` rows for DeiT-Tiny on one core), and all ``B * H`` rows on an
            accelerator, where larger launches pay. Lower it to bound memory.
        shortcuts: use the pruned layer's recorded attention and the readout-only last block
            (below) where the model allows; ``False`` runs whole blocks everywhere (same numbers,
            slower; for comparison).
        objective: ``"label"`` (below) or ``"embedding"``: then instead of the class keys the
            result has ``base_embedding_norm (B,)`` and ``embedding_change (B, L, H)``,
            ``1 - cos`` between the pruned and the unpruned pooled embedding
            (:meth:`ViT.embedding`), besides ``layer_change`` and ``layer_rel_l2``; ``targets``
            are ignored.
        layers: sweep only these layers (the others' entries are NaN, and ``False`` for
            ``pruned_correct``); default every layer.

    Returns a dict of numpy arrays (``B`` images, ``L`` layers, ``H`` heads, ``C`` classes):

    - ``base_logits (B, C)``, ``base_prob (B,)`` (softmax probability of the target),
      ``prediction (B,)``, ``target (B,)``, ``base_loss (B,)`` (cross-entropy of the target);
    - ``pruned_prob``, ``pruned_loss`` ``(B, L, H)`` the same with head ``(l, h)`` pruned;
      ``pruned_correct (B, L, H)``: whether the pruned model's argmax equals the target;
    - ``layer_change (B, L, H)``: ``1 - cos(pruned, unpruned)`` of block ``l``'s output, where the
      cosine is taken over the image's whole flattened ``tokens x channels`` output, so it measures
      how much the head changes the residual stream leaving its own block (0 = unchanged);
    - ``layer_rel_l2 (B, L, H)``: ``||pruned - unpruned|| / ||unpruned||`` of the same outputs.

    How: one unpruned forward records each block's input and output and, for the blocks with a
    separable output projection (:meth:`ViT.output_projection`), the heads' contexts entering it.
    For layer ``l`` the batch is replicated once per head, each copy with a different head pruned,
    and only what pruning can change is run:

    - block ``l`` itself is not re-run up to its attention output: the unpruned context is reused
      and the pruned head's share is subtracted through the projection,
      ``proj(ctx with head h zeroed) = proj(ctx) - ctx_h @ W_proj[:, h]^T``; then the rest of the
      block (:meth:`ViT.finish_block`: residual, layer scale, norm, MLP) runs. No q/k/v or softmax.
      Blocks without such a projection (a sub-LN over all heads, talking heads, other families)
      run whole with the head gated off;
    - blocks ``l+1..L-2`` run whole;
    - for ``l < L - 1`` the last block computes only what the readout reads
      (:meth:`ViT.readout_tokens`: the CLS token, or CLS + distillation token for DeiT's distilled
      models): keys and values of every token, queries, attention and MLP of those tokens only
      (:meth:`ViT.run_block_queries`). Readouts that pool over patches (``global_pool='avg'``,
      attention pooling, HF CLIP / SigLIP / DINOv2 / BEiT readouts) run the last block whole, as do
      backends that cannot run a subset of queries. For ``l = L - 1`` block ``l``'s whole output is
      needed for ``layer_change``, so only the first saving applies.

    Exactly the same numbers as :func:`head_sweep_naive` (up to float rounding), at a cost of about
    ``1 + H * ((L - 1) * (L - 2) / 2 + L * (1 - a) + (L - 1) * b) / L`` forward passes of the batch
    instead of ``L * H``: the unpruned pass, the whole blocks between the pruned and the last one,
    the pruned block less the share ``a`` of a block's time spent on q/k/v, the softmax and the
    projection, and the share ``b`` of the last block a CLS readout still needs (mostly the keys
    and values). For DeiT-Tiny on a CPU ``a ~ 0.4`` and ``b ~ 0.2``: about 17 (17.5 measured, see
    BENCHMARKS.md). Where a block cannot be split ``a = 0``, and where the readout pools over the
    patches ``b = 1``; with neither saving (or ``shortcuts=False``) the cost is the whole-block
    floor ``1 + H * (L + 1) / 2``, 20.5 for DeiT-Tiny.
    """
    check_objective(vit, objective)
    by_embedding = objective == "embedding"
    head_out = vit.embedding if by_embedding else vit.readout
    x = _as_batch(vit, x)
    L, H = vit.num_layers, vit.num_heads
    # Which savings apply: per layer for the recorded context, once for the readout-only last block.
    split = {l for l in range(L) if vit.output_projection(l) is not None} if shortcuts else set()
    n_read = vit.readout_tokens() if shortcuts and L > 1 and vit.can_run_queries(L - 1) else None
    contexts: dict[int, torch.Tensor] = {}
    stream = [vit.embed(x)]
    last = vit.run_blocks(
        stream[0], on_block=lambda _l, o: stream.append(o), on_context=contexts.__setitem__ if split else None
    )
    base_logits = head_out(last)  # the pooled embedding under the embedding objective
    B = base_logits.shape[0]
    if by_embedding:
        target = torch.full((B,), -1, dtype=torch.long, device=base_logits.device)
    else:
        n_classes = base_logits.shape[1]
        prediction = base_logits.argmax(-1)
        target = _resolve_targets(targets, prediction, n_classes)
        base_logp = base_logits.double().log_softmax(-1)
        base_lp = base_logp.gather(1, target[:, None]).squeeze(1)

    rows = B * H
    step = (B if x.device.type == "cpu" else rows) if chunk is None else int(chunk)
    if step < 1:
        raise ValueError(f"chunk must be a positive number of rows, got {chunk}")
    dev = base_logits.device
    out = {k: torch.full((L, rows), torch.nan, dtype=torch.float64, device=dev) for k in ("logp", "change", "rel")}
    correct = torch.zeros(L, rows, dtype=torch.bool, device=dev)
    flat = torch.arange(rows, device=dev)
    wanted = set(range(L)) if layers is None else {check_head(l, 0, L, H, vit.name)[0] for l in layers}
    for l in range(L):
        ctx = contexts.pop(l, None)  # freed as the sweep moves on, like the stream below
        if l not in wanted:
            stream[l] = ctx = None  # type: ignore
            continue
        if ctx is not None:
            proj = vit.output_projection(l)
            assert proj is not None
            base_attn = F.linear(ctx, proj.weight, proj.bias)  # the unpruned attention output of block l
            w_heads = _head_weights(proj, H)
            ctx_heads = ctx.reshape(ctx.shape[0], ctx.shape[1], H, ctx.shape[2] // H)
        for start in range(0, rows, step):
            idx = flat[start : start + step]
            b_idx, h_idx = idx // H, idx % H
            if ctx is not None:
                share = torch.bmm(ctx_heads[b_idx, :, h_idx], w_heads[h_idx])  # (n, T, D): the pruned head's share
                y = vit.finish_block(l, stream[l][b_idx], base_attn[b_idx] - share)
            else:
                gate = torch.ones(idx.numel(), H, dtype=x.dtype, device=dev)
                gate[torch.arange(idx.numel(), device=dev), h_idx] = 0.0
                y = vit.run_blocks(stream[l][b_idx], l, l + 1, plans={l: LayerPlan(head_gate=gate)})
            change, rel = _stream_change(y, stream[l + 1][b_idx])
            if l == L - 1:
                final = y
            elif n_read is not None:
                final = vit.run_block_queries(L - 1, vit.run_blocks(y, l + 1, L - 1), n_read)
            else:
                final = vit.run_blocks(y, l + 1)
            logits = head_out(final)
            out["change"][l, idx] = change
            out["rel"][l, idx] = rel
            if by_embedding:
                out["logp"][l, idx] = embedding_change(logits, base_logits[b_idx])  # (the embedding change)
                continue
            t = target[b_idx]
            out["logp"][l, idx] = logits.double().log_softmax(-1).gather(1, t[:, None]).squeeze(1)
            correct[l, idx] = logits.argmax(-1) == t
        stream[l] = None  # type: ignore  # block l's input is not needed again: free it as the sweep moves on
        ctx = base_attn = ctx_heads = None  # type: ignore  # nor its context (the last references)

    def per_head(v: torch.Tensor) -> np.ndarray:  # (L, B*H) -> (B, L, H)
        return v.reshape(L, B, H).permute(1, 0, 2).cpu().numpy()

    if by_embedding:
        return {
            "base_embedding_norm": base_logits.double().norm(dim=-1).cpu().numpy(),
            "embedding_change": per_head(out["logp"]),
            "layer_change": per_head(out["change"]),
            "layer_rel_l2": per_head(out["rel"]),
        }
    return {
        **_label_keys(base_logits, base_lp, prediction, target, per_head(out["logp"]), per_head(correct)),
        "layer_change": per_head(out["change"]),
        "layer_rel_l2": per_head(out["rel"]),
    }


def _label_keys(base_logits: torch.Tensor, base_lp: torch.Tensor, prediction: torch.Tensor, target: torch.Tensor,
                logp: np.ndarray, correct: np.ndarray) -> dict[str, np.ndarray]:
    """The label keys of a head sweep's result (see :func:`head_sweep`), from the pruned log-probabilities."""
    return {
        "base_logits": base_logits.float().cpu().numpy(),
        "base_prob": base_lp.exp().cpu().numpy(),
        "prediction": prediction.cpu().numpy(),
        "target": target.cpu().numpy(),
        "base_loss": (-base_lp).cpu().numpy(),
        "pruned_prob": np.exp(logp),
        "pruned_loss": -logp,
        "pruned_correct": correct,
    }


@torch.no_grad()
def head_sweep_naive(vit: "ViT", x: Any, targets: Targets = None, *, objective: str = "label") -> dict[str, np.ndarray]:
    """Reference for :func:`head_sweep`: one full masked forward per head (``L * H`` forwards).

    Returns the same keys as :func:`head_sweep` except ``layer_change`` and ``layer_rel_l2``.
    Slow; meant for checking the fast sweep.
    """
    check_objective(vit, objective)
    x = _as_batch(vit, x)
    if objective == "embedding":
        base = vit.embeddings(x)
        L, H = vit.num_layers, vit.num_heads
        change = np.empty((x.shape[0], L, H))
        for l in range(L):
            for h in range(H):
                change[:, l, h] = embedding_change(vit.embeddings(x, masks={(l, h): "all"}), base).cpu().numpy()
        return {"base_embedding_norm": base.double().norm(dim=-1).cpu().numpy(), "embedding_change": change}
    base_logits = vit.logits(x)
    prediction = base_logits.argmax(-1)
    target = _resolve_targets(targets, prediction, base_logits.shape[1])
    base_lp = base_logits.double().log_softmax(-1).gather(1, target[:, None]).squeeze(1)
    L, H, B = vit.num_layers, vit.num_heads, x.shape[0]
    logp = np.empty((B, L, H))
    correct = np.empty((B, L, H), dtype=bool)
    for l in range(L):
        for h in range(H):
            logits = vit.logits(x, masks={(l, h): "all"})
            logp[:, l, h] = logits.double().log_softmax(-1).gather(1, target[:, None]).squeeze(1).cpu().numpy()
            correct[:, l, h] = (logits.argmax(-1) == target).cpu().numpy()
    return _label_keys(base_logits, base_lp, prediction, target, logp, correct)


# --------------------------------------------------------------------------- 2. Taylor
@torch.no_grad()
def readout_head_sweep(vit: "ViT", x: Any, targets: Targets = None) -> dict[str, np.ndarray]:
    """Prune each head of each *readout* layer alone (CaiT's class attention, attention pooling;
    :attr:`ViT.readout_layers`) and measure the target's probability, like :func:`head_sweep` for the
    model's layers.

    The blocks run once; each pruned readout reads their output with that head's context zeroed.
    Returns ``base_prob (B,)``, ``target (B,)``, ``prediction (B,)``, the readout layers' maps
    ``attention (B, R, H, Q, K)`` (float32) and, over ``R`` readout layers of ``H`` heads,
    ``pruned_prob``, ``pruned_loss`` and ``pruned_correct`` ``(B, R, H)``.
    """
    from vitscope.capture.readout_layers import ReadoutPlan, readout_plans

    vit._require_head()
    x = _as_batch(vit, x)
    layers = vit.readout_layers
    if not layers:
        raise ValueError(f"{vit.name} has no attention in its readout (it reads a CLS token or a mean); use head_sweep")
    from vitscope.capture.readout_layers import readout_num_heads

    heads = {readout_num_heads(m) for m in layers}
    if len(heads) != 1:  # pragma: no cover - every supported family has one head count
        raise ValueError(f"readout layers with different head counts {sorted(heads)}")
    H, R = heads.pop(), len(layers)
    last = vit.run_blocks(vit.embed(x))
    ones = torch.ones(H, dtype=last.dtype, device=last.device)
    maps: dict[int, torch.Tensor] = {}
    with readout_plans(layers, {i: ReadoutPlan(head_gate=ones, on_attention=maps.__setitem__) for i in range(R)}):  # the same explicit path
        base = vit.readout(last).double()
    if len(maps) != R:  # pragma: no cover - the backends list only modules their readout runs
        raise CaptureError(f"readout layer(s) {sorted(set(range(R)) - set(maps))} of {vit.name} did not run in its readout")
    prediction = base.argmax(-1)
    target = _resolve_targets(targets, prediction, base.shape[1])
    B = base.shape[0]
    logp = torch.empty(B, R, H, dtype=torch.float64)
    correct = torch.empty(B, R, H, dtype=torch.bool)
    for i in range(R):
        for h in range(H):
            gate = ones.clone()
            gate[h] = 0.0
            with readout_plans(layers, {i: ReadoutPlan(head_gate=gate)}):
                logits = vit.readout(last).double()
            logp[:, i, h] = logits.log_softmax(-1).gather(1, target[:, None]).squeeze(1).cpu()
            correct[:, i, h] = (logits.argmax(-1) == target).cpu()
    base_lp = base.log_softmax(-1).gather(1, target[:, None]).squeeze(1).cpu()
    shapes = {tuple(maps[i].shape) for i in range(R)}
    attention = torch.stack([maps[i] for i in range(R)], dim=1).float().cpu().numpy() if len(shapes) == 1 else None
    return {"base_prob": base_lp.exp().numpy(), "target": target.cpu().numpy(), "prediction": prediction.cpu().numpy(), "attention": attention,
            "pruned_prob": logp.exp().numpy(), "pruned_loss": (-logp).numpy(), "pruned_correct": correct.numpy()}


#: Above this many bytes of attention maps (``L * H * T^2`` per image, float32) :func:`taylor_importance`
#: recomputes each block in the backward pass instead of keeping what the block saved for it: the
#: maps themselves where attention runs explicitly (talking heads, float biases on some kernels),
#: q, k, v and the MLP's activations where it runs fused.
TAYLOR_CHECKPOINT_BYTES = 1 << 30


def taylor_keeps_maps(vit: "ViT", batch: int) -> bool:
    """Whether :func:`taylor_importance` keeps every layer's maps for its backward pass (``True``) or,
    for long sequences and big batches, recomputes each block there (one layer's maps alive at a time)."""
    T = vit.num_tokens
    return vit.num_layers * vit.num_heads * T * T * batch * 4 <= TAYLOR_CHECKPOINT_BYTES


def taylor_importance(vit: "ViT", x: Any, targets: Targets = None, *, recompute: Optional[bool] = None) -> np.ndarray:
    """Mask-gradient (Taylor) head importance of Michel et al. (2019), per image, ``(B, L, H)``.

    Every head's context is multiplied by a gate ``xi = 1``; the importance of head ``(l, h)`` for
    image ``i`` is ``|d loss_i / d xi_{l,h}|`` where ``loss_i`` is the cross-entropy of the image's
    target (``None`` / ``-1``: the unpruned prediction). It is the first-order estimate of the loss
    change when the head is pruned. The head-level score of the paper is the mean of this absolute
    value over images (the ``taylor`` column of :func:`summarize_importance`). The batch loss is
    the sum of the per-image losses, and image ``i``'s loss depends only on its own gates, so one
    forward and one backward give every image its own gradient.

    ``recompute``: run each block again in the backward pass instead of keeping every layer's
    attention maps for it (activation checkpointing: memory of one layer's maps instead of ``L``,
    for one more forward; the same gradients). ``None``: when :func:`taylor_keeps_maps` says the
    maps would not fit :data:`TAYLOR_CHECKPOINT_BYTES`.
    """
    vit._require_head()
    x = _as_batch(vit, x)
    L, H = vit.num_layers, vit.num_heads
    with torch.no_grad():
        h0 = vit.embed(x)
    xi = torch.ones(h0.shape[0], L, H, dtype=h0.dtype, device=h0.device, requires_grad=True)
    if recompute is None:
        recompute = not taylor_keeps_maps(vit, h0.shape[0])
    with torch.enable_grad():
        if recompute:
            from torch.utils.checkpoint import checkpoint

            def block(h: torch.Tensor, gate: torch.Tensor, l: int) -> torch.Tensor:  # (installs its plan again when recomputed)
                return vit.run_blocks(h, l, l + 1, plans={l: LayerPlan(head_gate=gate)})

            out = h0
            for l in range(L):
                out = checkpoint(block, out, xi[:, l], l, use_reentrant=False)
        else:
            out = vit.run_blocks(h0, plans={l: LayerPlan(head_gate=xi[:, l]) for l in range(L)})
        logits = vit.readout(out)
        target = _resolve_targets(targets, logits.detach().argmax(-1), logits.shape[1])
        loss = F.cross_entropy(logits, target, reduction="sum")
        (grad,) = torch.autograd.grad(loss, xi)
    return grad.abs().cpu().numpy()


# --------------------------------------------------------------------------- 3. partial pruning
def _single_image(vit: "ViT", image: Any) -> torch.Tensor:
    """One image as a ``(1, C, H, W)`` batch; floating-point tensors are taken as preprocessed."""
    if isinstance(image, torch.Tensor) and image.is_floating_point() and image.ndim in (3, 4):
        x = image.unsqueeze(0) if image.ndim == 3 else image
        if x.shape[0] != 1:
            raise ValueError(f"partial_pruning takes one image, got a batch of {x.shape[0]}; loop over the images")
        return _as_batch(vit, x)
    return _as_batch(vit, vit.preprocess([image]))


@torch.no_grad()
def partial_pruning(
    vit: "ViT", image: Any, layer: int, head: int, label: Optional[int] = None, topk: int = 5,
    *, stream: Optional[torch.Tensor] = None,
) -> pd.DataFrame:
    """The paper's six partial-pruning modes of one head on one image.

    Modes (rows, in the paper's order): 1 ``none``; 2 ``all`` (the whole matrix); 3 ``cls`` (CLS
    row + CLS column); 4 ``patch`` (patch->patch block); 5 ``cls_cross`` (CLS row + column without
    the CLS->CLS cell); 6 ``cls_self`` (the CLS->CLS cell only). Pruned cells are set to 0 without
    renormalisation. A model without a CLS token gets the modes that exist for it, 1, 2 and 4
    (:func:`~vitscope.capture.masks.regions_for`), numbered as above.

    Args:
        image: a path, PIL image or array, or a preprocessed float ``(C, H, W)`` / ``(1, C, H, W)``
            tensor (float tensors are not preprocessed again).
        label: class whose probability is reported; ``None`` = the unpruned prediction.
        topk: how many top predictions to list per mode.
        stream: the residual stream entering block ``layer`` for this image, ``(1, T, D)``, when the
            caller has it (a server answering many heads of one image keeps it): the blocks before
            ``layer`` are then not run again (and ``image`` is not read).

    Returns a DataFrame with columns ``mode`` (1..6), ``region``, ``label``, ``label_prob`` and the
    list columns ``top_classes``, ``top_names``, ``top_probs``.

    The blocks before ``layer`` run once; the six variants then run as one batch from ``layer`` on.
    """
    vit._require_head()
    _check_head(vit, layer, head)
    modes = ("none", *regions_for(vit.layout))
    n = len(modes)
    if stream is None:
        h = vit.run_blocks(vit.embed(_single_image(vit, image)), 0, layer)
    else:
        h = stream
        if h.ndim != 3 or h.shape[0] != 1 or h.shape[1] != vit.num_tokens:
            raise ValueError(f"stream must be the (1, {vit.num_tokens}, D) residual stream entering block {layer}; got shape {tuple(h.shape)}")
    T, H = vit.num_tokens, vit.num_heads
    keep = torch.ones(n, H, T, T, dtype=h.dtype, device=h.device)
    for i, region in enumerate(modes):
        if region not in ("none", "all"):
            keep[i, head] = (~region_matrix(region, vit.layout)).to(device=h.device, dtype=h.dtype)
    gate = torch.ones(n, H, dtype=h.dtype, device=h.device)
    gate[modes.index("all"), head] = 0.0  # the whole matrix: same as zeroing the head's context
    plans = {layer: LayerPlan(keep=keep, head_gate=gate)}
    logits = vit.readout(vit.run_blocks(h.expand(n, -1, -1).contiguous(), layer, plans=plans))
    probs = logits.double().softmax(-1).cpu()
    if label is None:
        label = int(probs[0].argmax())
    elif not 0 <= int(label) < probs.shape[1]:
        raise ValueError(f"label {label} is not a class index of this {probs.shape[1]}-class model")
    k = max(1, min(int(topk), probs.shape[1]))
    top_p, top_c = probs.topk(k, dim=-1)
    names = vit.class_names
    rows = []
    for i, region in enumerate(modes):
        classes = top_c[i].tolist()
        rows.append(
            {
                "mode": MODES.index(region) + 1,  # the paper's number, also where modes are missing
                "region": region,
                "label": int(label),
                "label_prob": float(probs[i, int(label)]),
                "top_classes": classes,
                "top_names": [names[c] if names else str(c) for c in classes],
                "top_probs": top_p[i].tolist(),
            }
        )
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- 4. aggregation
def _effects(image_heads: pd.DataFrame, images: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, np.ndarray], np.ndarray]:
    """Per-image effect matrices ``(N images, K heads)`` for every metric whose inputs are present.

    Returns ``(heads, {metric: matrix}, image_ids)`` where ``heads`` lists ``layer, head`` in the
    column order of the matrices.
    """
    for col in ("image_id", "layer", "head"):
        if col not in image_heads.columns:
            raise ValueError(f"image_heads needs a {col!r} column (one row per image and head)")
    if "image_id" not in images.columns:
        raise ValueError("images needs an 'image_id' column (one row per image)")
    if images["image_id"].duplicated().any():
        dup = images.loc[images["image_id"].duplicated(), "image_id"].iloc[0]
        raise ValueError(f"images lists image_id {dup!r} more than once")
    if image_heads.duplicated(["image_id", "layer", "head"]).any():
        r = image_heads.loc[image_heads.duplicated(["image_id", "layer", "head"])].iloc[0]
        raise ValueError(f"image_heads has more than one row for image_id={r.image_id!r}, layer={r.layer}, head={r.head}")

    ids, img_code = np.unique(image_heads["image_id"].to_numpy(), return_inverse=True)
    keys = image_heads[["layer", "head"]].to_numpy(dtype=np.int64)
    heads_arr, head_code = np.unique(keys, axis=0, return_inverse=True)
    head_code = head_code.reshape(-1)
    N, K = len(ids), len(heads_arr)
    if len(image_heads) != N * K:
        present = np.zeros((N, K), dtype=bool)
        present[img_code, head_code] = True
        i, k = np.argwhere(~present)[0]
        raise ValueError(
            f"image_heads is incomplete: {N * K - len(image_heads)} (image, head) rows are missing, e.g. "
            f"image_id={ids[i]!r}, layer={heads_arr[k, 0]}, head={heads_arr[k, 1]}; every image needs a row for every head"
        )

    per_image = images.set_index("image_id")
    missing = pd.Index(ids).difference(per_image.index)
    if len(missing):
        raise ValueError(f"{len(missing)} image_id(s) of image_heads are not in images, e.g. {missing[0]!r}")
    per_image = per_image.loc[ids]

    def grid(values: Any) -> np.ndarray:
        m = np.empty((N, K))
        m[img_code, head_code] = np.asarray(values, dtype=np.float64)
        return m

    def column(name: str) -> np.ndarray:
        return per_image[name].to_numpy(dtype=np.float64)[:, None]

    cols, icols = set(image_heads.columns), set(images.columns)
    eff: dict[str, np.ndarray] = {}
    for metric in HEAD_METRICS.values():
        if set(metric.image_head_columns) <= cols and set(metric.image_columns) <= icols:
            eff[metric.name] = np.asarray(metric.effect(lambda c: grid(image_heads[c]), column), dtype=np.float64)
    if not eff:
        raise ValueError(
            "no metric can be computed: image_heads needs pruned_correct / pruned_prob / pruned_loss (with correct / "
            "base_prob / base_loss in images), layer_change or taylor"
        )
    heads = pd.DataFrame({"layer": heads_arr[:, 0], "head": heads_arr[:, 1]})
    return heads, eff, ids


def summarize_importance(
    image_heads: pd.DataFrame, images: pd.DataFrame, *, n_boot: int = 1000, seed: int = 0, ci: float = 0.95
) -> pd.DataFrame:
    """Head-level importance over an image set, with bootstrap confidence intervals.

    Args:
        image_heads: one row per (image, head): ``image_id, layer, head`` and any of
            ``pruned_prob, pruned_loss, pruned_correct, layer_change, layer_rel_l2, taylor``.
        images: one row per image: ``image_id`` and ``base_prob, base_loss, correct``.
        n_boot: bootstrap resamples of the images (0: no intervals).
        ci: coverage of the percentile interval.

    Returns one row per (layer, head) with ``head_index = layer * H + head`` (the paper's axis),
    ``n_images`` and, for each metric whose inputs are present, the mean over images plus
    ``<metric>_lo`` / ``<metric>_hi``:

    - ``acc_drop``: accuracy unpruned minus accuracy with the head pruned;
    - ``prob_drop``: mean drop of the target probability;
    - ``loss_increase``: mean increase of the target cross-entropy;
    - ``layer_change`` (and ``layer_rel_l2``): mean change of the pruned block's output;
    - ``taylor``: mean absolute mask gradient (Michel et al. 2019).

    Intervals resample images (every head and metric uses the same resamples), so they say how
    much a head's score depends on which images were analysed.
    """
    heads, eff, ids = _effects(image_heads, images)
    n_heads_per_layer = int(heads["head"].max()) + 1
    out = heads.copy()
    out.insert(2, "head_index", out["layer"] * n_heads_per_layer + out["head"])
    out["n_images"] = len(ids)
    names = list(eff)
    stacked = np.concatenate([eff[m] for m in names], axis=1)
    means = stacked.mean(axis=0)
    if n_boot > 0:
        lo, hi = bootstrap_means(stacked, n_boot=n_boot, seed=seed, ci=ci)
    else:
        lo = hi = np.full_like(means, np.nan)
    K = len(heads)
    for i, m in enumerate(names):
        sl = slice(i * K, (i + 1) * K)
        out[m], out[f"{m}_lo"], out[f"{m}_hi"] = means[sl], lo[sl], hi[sl]
    if "taylor" in out:
        out["taylor_layer_norm"] = layer_normalised(out, "taylor")
    return out


def layer_normalised(heads: pd.DataFrame, column: str) -> np.ndarray:
    """``heads[column]`` divided by its L2 norm within each layer (Michel et al. 2019, section 4.2:
    importance scores are normalised per layer before heads of different layers are compared).
    A layer whose scores are all zero stays zero."""
    values = heads[column].to_numpy(dtype=np.float64)
    norms = heads.assign(_sq=values**2).groupby("layer")["_sq"].transform("sum").to_numpy() ** 0.5
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(norms > 0, values / norms, 0.0)


def metric_agreement(heads: pd.DataFrame, metrics: Optional[Sequence[str]] = None) -> pd.DataFrame:
    """Spearman rank correlation between every pair of head-level metrics.

    ``heads`` is the output of :func:`summarize_importance`; ``metrics`` defaults to every metric
    column present. Returns one row per unordered pair: ``metric_a, metric_b, spearman, p_value,
    n_heads``. A high correlation means the metrics rank heads alike.
    """
    from scipy.stats import spearmanr

    if metrics is None:
        metrics = [m for m in HEAD_METRICS if m in heads.columns]
    missing = [m for m in metrics if m not in heads.columns]
    if missing:
        raise ValueError(f"heads has no column(s) {missing}; available: {list(heads.columns)}")
    rows = []
    for i, a in enumerate(metrics):
        for b in metrics[i + 1 :]:
            ok = heads[a].notna() & heads[b].notna()
            rho, p = spearmanr(heads.loc[ok, a], heads.loc[ok, b]) if ok.sum() > 2 else (np.nan, np.nan)
            rows.append({"metric_a": a, "metric_b": b, "spearman": float(rho), "p_value": float(p), "n_heads": int(ok.sum())})
    return pd.DataFrame(rows, columns=["metric_a", "metric_b", "spearman", "p_value", "n_heads"])


def _order_list(vit: "ViT", order: HeadOrder, name: str) -> list[tuple[int, int]]:
    if isinstance(order, pd.DataFrame):
        if not {"layer", "head"} <= set(order.columns):
            raise ValueError(f"order {name!r}: a DataFrame order needs 'layer' and 'head' columns")
        pairs = list(zip(order["layer"].astype(int), order["head"].astype(int)))
    else:
        pairs = [(int(l), int(h)) for l, h in order]
    for l, h in pairs:
        _check_head(vit, l, h)
    if len(set(pairs)) != len(pairs):
        raise ValueError(f"order {name!r} lists a head more than once; each head can be removed only once")
    return pairs


def default_steps(n: int, points: int = 13) -> list[int]:
    """About ``points`` evenly spaced head counts from 0 to ``n`` (inclusive)."""
    return sorted(set(np.linspace(0, n, min(points, n + 1)).round().astype(int).tolist()))


@torch.no_grad()
def _curves(
    vit: "ViT", batches: Iterable[Any], orders: Mapping[str, list[tuple[int, int]]], steps: Mapping[str, list[int]],
    objective: str = "label",
) -> pd.DataFrame:
    """Cumulative-pruning curves for several orders in one pass over ``batches``.

    Identical pruned sets (k = 0, or all heads) are evaluated once; each pruned model starts from
    the recorded input of its first pruned layer, since the layers before it are unchanged. Under
    the ``"embedding"`` objective the curve is the mean embedding change ``1 - cos`` (column
    ``mean_embedding_change``; accuracy, probability and loss are NaN).
    """
    plan = CurvePlan(orders, steps, objective)
    return plan.table([plan.batch_sums(vit, batch) for batch in batches])


class CurvePlan:
    """The pruned head sets of several cumulative-pruning curves, and how their rows are summed.

    The curves are additive over images, so the work splits by batch: :meth:`batch_sums` of each
    batch (on any process), then :meth:`table` of the sums in batch order — the same numbers, bit
    for bit, however the batches were shared out.
    """

    #: Summed per image, per pruned set: under the label objective the correct count, the target's
    #: probability and its loss; under the embedding objective the change ``1 - cos``.
    SUMS = {"label": ("accuracy", "mean_prob", "mean_loss"), "embedding": ("mean_embedding_change",)}

    def __init__(self, orders: Mapping[str, list[tuple[int, int]]], steps: Mapping[str, list[int]], objective: str = "label"):
        if objective not in self.SUMS:
            raise ValueError(f"unknown objective {objective!r}; use one of {', '.join(self.SUMS)}")
        self.orders, self.objective = dict(orders), objective
        self.configs: dict[frozenset[tuple[int, int]], list[tuple[str, int]]] = {}
        for name, order in orders.items():
            for k in steps[name]:
                self.configs.setdefault(frozenset(order[:k]), []).append((name, k))

    @torch.no_grad()
    def batch_sums(self, vit: "ViT", batch: Any) -> tuple[int, np.ndarray]:
        """``(images, sums)`` of one batch: ``sums[i]`` holds :attr:`SUMS` over its images for the
        ``i``-th pruned set."""
        check_objective(vit, self.objective)
        xb, tb = _split_batch(batch)
        x = _as_batch(vit, xb)
        out = np.zeros((len(self.configs), len(self.SUMS[self.objective])))
        if self.objective == "embedding":
            stream = [vit.embed(x)]
            base = vit.embedding(vit.run_blocks(stream[0], on_block=lambda _l, o: stream.append(o)))
            for i, config in enumerate(self.configs):
                if config:  # (nothing pruned: no change)
                    out[i, 0] = float(embedding_change(vit.embedding(_run_pruned(vit, stream, config)), base).sum())
            return x.shape[0], out
        stream, base_logits = _record_stream(vit, vit.embed(x))
        target = _resolve_targets(tb, base_logits.argmax(-1), base_logits.shape[1])
        for i, config in enumerate(self.configs):
            logits = vit.readout(_run_pruned(vit, stream, config)) if config else base_logits
            logp = logits.double().log_softmax(-1).gather(1, target[:, None]).squeeze(1)
            out[i] = [float((logits.argmax(-1) == target).sum()), float(logp.exp().sum()), float(-logp.sum())]
        return x.shape[0], out

    def table(self, parts: Sequence[tuple[int, np.ndarray]]) -> pd.DataFrame:
        """The curves' rows from the :meth:`batch_sums` of every batch, in batch order."""
        n_images, sums = 0, np.zeros((len(self.configs), len(self.SUMS[self.objective])))
        for n, part in parts:  # one running sum, batch by batch, whatever process made each part
            n_images += n
            sums = sums + part
        if n_images == 0:
            raise ValueError("batches yielded no images")
        columns = ("accuracy", "mean_prob", "mean_loss", *(("mean_embedding_change",) if self.objective == "embedding" else ()))
        rows = []
        for i, uses in enumerate(self.configs.values()):
            values = dict.fromkeys(columns, np.nan) | dict(zip(self.SUMS[self.objective], sums[i] / n_images))
            rows += [{"metric": name, "k": k, **values, "n_images": n_images} for name, k in uses]
        order_of = {name: i for i, name in enumerate(self.orders)}
        df = pd.DataFrame(rows)
        df = df.sort_values(["metric", "k"], key=lambda s: s.map(order_of) if s.name == "metric" else s, kind="mergesort")
        return df.reset_index(drop=True)


def _run_pruned(vit: "ViT", stream: Sequence[torch.Tensor], config: frozenset[tuple[int, int]]) -> torch.Tensor:
    """The last block's output with the heads of ``config`` pruned together, run from the recorded
    input of the first pruned layer (the layers before it are unchanged)."""
    h0 = stream[0]
    gates = torch.ones(vit.num_layers, vit.num_heads, dtype=h0.dtype, device=h0.device)
    for l, h in config:
        gates[l, h] = 0.0
    start = min(l for l, _ in config)
    plans = {l: LayerPlan(head_gate=gates[l][None]) for l in sorted({l for l, _ in config})}
    return vit.run_blocks(stream[start], start, plans=plans)


def pruning_curves_by_ranking(
    vit: "ViT",
    batches: Iterable[Any],
    rankings: Mapping[str, pd.DataFrame],
    metrics: Sequence[str],
    *,
    steps: Optional[Sequence[int]] = None,
    seed: int = 0,
    objective: str = "label",
) -> pd.DataFrame:
    """:func:`pruning_curves` for several head rankings at once (e.g. ``{"held_out": heads ranked on
    other images, "in_sample": heads ranked on these images}``), in one pass over ``batches``.

    Each ``rankings[name]`` is a :func:`summarize_importance` table; identical pruned sets across
    rankings are evaluated once. Returns the columns of :func:`pruning_curves` after ``ranking``.
    To share the batches out over several processes, use :func:`ranking_curve_plan` and
    :func:`ranking_curves_table` instead.
    """
    plan = ranking_curve_plan(vit, rankings, metrics, steps=steps, seed=seed, objective=objective)
    return ranking_curves_table(plan, [plan.batch_sums(vit, batch) for batch in batches])


def ranking_curve_plan(
    vit: "ViT",
    rankings: Mapping[str, pd.DataFrame],
    metrics: Sequence[str],
    *,
    steps: Optional[Sequence[int]] = None,
    seed: int = 0,
    objective: str = "label",
) -> CurvePlan:
    """The :class:`CurvePlan` of :func:`pruning_curves_by_ranking` (its orders are named
    ``"<ranking>\x00<metric>"``; :func:`ranking_curves_table` splits them back)."""
    check_objective(vit, objective)
    orders: dict[str, list[tuple[int, int]]] = {}
    for name, heads in rankings.items():
        for m in metrics:
            if m == "random":  # the same seeded permutation for every ranking: a shared baseline
                ranked = heads.sort_values(["layer", "head"]).iloc[np.random.default_rng(seed).permutation(len(heads))]
            elif m not in heads.columns:
                raise ValueError(f"ranking {name!r} has no column {m!r}; available: {list(heads.columns)} (or 'random')")
            else:
                ranked = heads.sort_values([m, "layer", "head"], ascending=[False, True, True], na_position="last", kind="mergesort")
            orders[f"{name}\x00{m}"] = _order_list(vit, ranked, m)
    ks = {key: _check_steps(steps, len(o), key.split("\x00")[1]) for key, o in orders.items()}
    return CurvePlan(orders, ks, objective)


def ranking_curves_table(plan: CurvePlan, parts: Sequence[tuple[int, np.ndarray]]) -> pd.DataFrame:
    """The table of :func:`pruning_curves_by_ranking` from a :func:`ranking_curve_plan`'s batch sums."""
    df = plan.table(parts)
    split = df["metric"].str.split("\x00", n=1, expand=True)
    df.insert(0, "ranking", split[0])
    df["metric"] = split[1]
    return df


def pruning_curve(
    vit: "ViT", batches: Iterable[Any], order: HeadOrder, steps: Optional[Sequence[int]] = None, *, objective: str = "label"
) -> pd.DataFrame:
    """Accuracy as heads are removed cumulatively in ``order``.

    Args:
        batches: iterable of preprocessed batches ``x`` or ``(x, targets)`` pairs (targets ``-1``
            or absent: the unpruned prediction, so the unpruned accuracy is 1).
        order: ``(layer, head)`` pairs or a DataFrame with ``layer, head`` columns, first removed first.
        steps: numbers of removed heads ``k`` to evaluate (default: ~13 points from 0 to
            ``len(order)``). At ``k`` the first ``k`` heads of ``order`` are pruned together (head
            gates 0 in every affected layer).

    Returns ``k, accuracy, mean_prob, mean_loss, n_images`` per step (probability and loss of the
    target); under ``objective="embedding"`` also ``mean_embedding_change`` (the others NaN).
    """
    pairs = _order_list(vit, order, "order")
    ks = _check_steps(steps, len(pairs), "order")
    return _curves(vit, batches, {"order": pairs}, {"order": ks}, objective).drop(columns="metric")


def _check_steps(steps: Optional[Sequence[int]], n: int, name: str) -> list[int]:
    ks = default_steps(n) if steps is None else sorted(set(int(k) for k in steps))
    bad = [k for k in ks if not 0 <= k <= n]
    if bad:
        raise ValueError(f"steps {bad} for {name!r} are outside 0..{n} (the number of heads in its order)")
    return ks


def pruning_curves(
    vit: "ViT",
    batches: Iterable[Any],
    heads: pd.DataFrame,
    metrics: Optional[Sequence[str]] = None,
    *,
    steps: Optional[Sequence[int]] = None,
    seed: int = 0,
    objective: str = "label",
) -> pd.DataFrame:
    """Cumulative pruning curves, one per metric, removing the most important head first.

    ``heads`` is the output of :func:`summarize_importance`; ``metrics`` defaults to every metric
    column present. The name ``"random"`` adds a baseline order (a permutation from ``seed``).
    Ties are broken by (layer, head). A metric whose curve falls fastest ranks heads best.
    ``batches`` is iterated once for all metrics (a generator is fine). Returns
    ``metric, k, accuracy, mean_prob, mean_loss, n_images``.
    """
    if metrics is None:
        metrics = [m for m in METRICS if m in heads.columns]
    orders: dict[str, list[tuple[int, int]]] = {}
    for m in metrics:
        if m == "random":
            perm = np.random.default_rng(seed).permutation(len(heads))
            ranked = heads.iloc[perm]
        else:
            if m not in heads.columns:
                raise ValueError(f"heads has no column {m!r}; available: {list(heads.columns)} (or 'random')")
            ranked = heads.sort_values([m, "layer", "head"], ascending=[False, True, True], na_position="last", kind="mergesort")
        orders[m] = _order_list(vit, ranked, m)
    ks = {m: _check_steps(steps, len(o), m) for m, o in orders.items()}
    return _curves(vit, batches, orders, ks, objective)

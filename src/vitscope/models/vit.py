"""`ViT`: one uniform, analysable object for any supported Vision Transformer."""

from __future__ import annotations

import contextlib
import copy
import hashlib
from typing import Callable, Iterator, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from vitscope.capture.masks import MaskSpec, compile_masks
from vitscope.capture.runtime import AttentionRuntime, LayerPlan
from vitscope.core.indices import select_layers
from vitscope.core.layout import TokenLayout
from vitscope.models.backends.base import Backend
from vitscope.models.preprocessing import ImageLike, Preprocessing

Inputs = Union[torch.Tensor, ImageLike, Sequence[ImageLike]]


class CaptureError(RuntimeError):
    """A capture saw fewer attention maps than the model has layers."""


class ViT:
    """A loaded Vision Transformer with addressable attention.

    Create one with :func:`vitscope.load_model`. The wrapped ``module`` keeps its own (fused)
    attention; the methods below switch individual layers to the explicit kernel only while they
    run. Inputs ``x`` are either a preprocessed ``(B, C, H, W)`` tensor or images (paths, PIL images,
    arrays), which are run through :meth:`preprocess` first.

    Hook points (for :meth:`run_with_cache`): ``"embed"`` (tokens entering block 0),
    ``"blocks.{l}.attn.pattern"`` (post-softmax attention ``(B, H, T, T)``) and
    ``"blocks.{l}.out"`` (residual stream after block ``l``).
    """

    def __init__(
        self,
        backend: Backend,
        *,
        name: str,
        spec: str,
        layout: TokenLayout,
        preprocessing: Preprocessing,
        class_names: Optional[list[str]] = None,
        weights_sha256: Optional[str] = None,
        library: str = "timm",
    ) -> None:
        self.backend = backend
        self.name = name
        self.spec = spec
        self.layout = layout
        self.preprocessing = preprocessing
        self.class_names = class_names
        self.weights_sha256 = weights_sha256
        #: The weights file it was loaded from (set by load_model when given weights=), else None.
        self.weights_path: Optional[str] = None
        self.library = library
        #: A class readout on the pooled embedding that replaces the model's own (see :meth:`with_readout`).
        self.readout_head: Optional[torch.nn.Module] = None
        self.num_layers: int = len(backend.blocks)
        self.num_heads: int = backend.num_heads
        # One runtime per module: a module wrapped twice (two ViT objects over one model) shares it,
        # so installing the second wrapper does not take the attention away from the first.
        # (Keyed by the module's identity: a deep copy of a wrapped module carries the attribute but
        # its patched attention still points at the original's runtime, so it is installed afresh.)
        owner, shared = getattr(backend.module, "_vitscope_shared_runtime", (None, None))
        if owner == id(backend.module) and isinstance(shared, AttentionRuntime) and shared.num_layers == self.num_layers:
            self.runtime = shared
        else:
            self.runtime = AttentionRuntime(self.num_layers)
            backend.install(self.runtime)
            backend.module._vitscope_shared_runtime = (id(backend.module), self.runtime)

    # ----------------------------------------------------------------- basics
    @property
    def module(self) -> torch.nn.Module:
        """The underlying ``torch.nn.Module`` (timm or transformers), in eval mode."""
        return self.backend.module

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    @property
    def num_classes(self) -> Optional[int]:
        if self.readout_head is not None:
            return int(self.readout_head.num_classes)
        return self.backend.num_classes

    def with_readout(self, readout: torch.nn.Module) -> "ViT":
        """This model with class logits from ``readout(embedding)`` instead of its own classifier.

        For backbones without a classifier (or to score another label set): ``readout`` is a
        :class:`vitscope.models.readouts.Readout`, e.g. a CLIP zero-shot head
        (:func:`vitscope.models.zero_shot.zero_shot_readout`) or a linear probe
        (:func:`vitscope.analysis.probe.fit_probe`). The returned view shares the module, its weights
        and its attention runtime with this one (nothing is copied); this object is unchanged.
        """
        view = copy.copy(self)
        view.readout_head = readout.to(self.device).eval()
        view.class_names = list(readout.class_names)
        return view

    @property
    def num_tokens(self) -> int:
        return self.layout.num_tokens

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the model's floating-point parameters (the first one found)."""
        return next((p.dtype for p in self.module.parameters() if p.is_floating_point()), torch.float32)

    def state_sha256(self) -> str:
        """SHA-256 of the weights actually loaded: every parameter and buffer's name, dtype,
        shape and bytes, in name order.

        Unlike a weights file's hash this exists for hub downloads and in-memory modules too, and
        it changes when weights are edited after loading, so a run can refuse to resume with other
        weights. Costs one read of the weights (about 1 s per GB).
        """
        h = hashlib.sha256()
        for name, t in sorted(self.module.state_dict().items()):
            t = t.detach().to("cpu").contiguous()
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b"")
        return h.hexdigest()

    def to(self, device: Union[str, torch.device]) -> "ViT":
        self.module.to(device)
        return self

    def __repr__(self) -> str:
        return (
            f"ViT({self.name!r}, library={self.library}, layers={self.num_layers}, heads={self.num_heads}, "
            f"{self.layout.describe()}, classes={self.num_classes})"
        )

    def preprocess(self, images: Union[ImageLike, Sequence[ImageLike]]) -> torch.Tensor:
        """Paths, PIL images or arrays -> ``(B, C, H, W)`` with the model's own preprocessing."""
        return self.preprocessing.batch(images)

    def _input(self, x: Inputs) -> torch.Tensor:
        """Any input form -> the model's ``(B, C, H, W)`` on its device and dtype (the rules are
        :meth:`Preprocessing.batch`'s: only a floating-point tensor is taken as preprocessed)."""
        return self.preprocess(x).to(self.device, dtype=next(self.module.parameters()).dtype)  # type: ignore[arg-type]

    # ------------------------------------------------------- low-level pieces
    def embed(self, x: Inputs) -> torch.Tensor:
        """Tokens entering block 0, ``(B, T, D)``."""
        return self.backend.embed(self._input(x))

    def readout(self, h: torch.Tensor) -> torch.Tensor:
        """Residual stream after the last block -> class logits (from :attr:`readout_head` when set)."""
        if self.readout_head is not None:
            return self.readout_head(self.backend.embedding(h))
        return self.backend.readout(h)

    def embedding(self, h: torch.Tensor) -> torch.Tensor:
        """Residual stream after the last block -> the model's pooled image embedding ``(B, D)``
        (what its classifier, if any, reads; docs/models.md lists it per family)."""
        return self.backend.embedding(h)

    @contextlib.contextmanager
    def intervene(self, plans: Mapping[int, LayerPlan]) -> Iterator[AttentionRuntime]:
        """Install per-layer plans for the forward passes run inside the block."""
        rt = self.runtime
        saved = rt.plans
        rt.plans = dict(plans)
        try:
            yield rt
        finally:
            rt.plans = saved

    def run_blocks(
        self,
        h: torch.Tensor,
        start: int = 0,
        stop: Optional[int] = None,
        *,
        plans: Optional[Mapping[int, LayerPlan]] = None,
        on_block: Optional[Callable[[int, torch.Tensor], None]] = None,
        on_context: Optional[Callable[[int, torch.Tensor], None]] = None,
    ) -> torch.Tensor:
        """Run blocks ``start..stop-1`` on the residual stream ``h`` under ``plans``.

        Reusing ``h`` from an earlier call is how analyses skip the layers an ablation cannot
        change. ``on_block(l, out)`` sees each block's output. ``on_context(l, ctx)`` sees what enters
        block ``l``'s attention output projection: the heads' contexts side by side, ``(B, T, H *
        d_head)``, head ``h`` in channels ``h * d_head : (h + 1) * d_head`` (after any head gate);
        it is called only for the blocks that have an :meth:`output_projection`. The model's own
        fused attention keeps running: the context is read where the projection receives it.
        """
        stop = self.num_layers if stop is None else stop
        hooks = []
        if on_context is not None:
            for i in range(start, stop):
                proj = self.output_projection(i)
                if proj is not None:
                    hooks.append(proj.register_forward_pre_hook(lambda _m, args, _i=i: on_context(_i, args[0])))
        try:
            with self.intervene(plans or {}):
                for i in range(start, stop):
                    h = self.backend.run_block(i, h)
                    if on_block is not None:
                        on_block(i, h)
        finally:
            for hook in hooks:
                hook.remove()
        return h

    # ----------------------------------------------- pieces of a block
    # What the backend offers of :class:`~vitscope.models.backends.base.SplitBlocks`; each answers
    # "not here" (None / False) for a backend or block without it, so callers can fall back to
    # running whole blocks.
    def output_projection(self, layer: int) -> Optional[torch.nn.Linear]:
        """Block ``layer``'s attention output projection when pruning a head there equals removing
        its slice's share of that linear map (see ``SplitBlocks.output_projection``); else None."""
        fn = getattr(self.backend, "output_projection", None)
        return fn(layer) if fn is not None else None

    def finish_block(self, layer: int, h: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        """Block ``layer``'s output from its input ``h`` and its attention output ``attn_out`` (the
        output projection's result): the block after its attention, for blocks with an
        :meth:`output_projection`."""
        if self.output_projection(layer) is None:
            raise NotImplementedError(f"{self.name}: block {layer} cannot be finished from its attention output; run it whole")
        return self.backend.finish_block(layer, h, attn_out)  # type: ignore[attr-defined]

    def can_run_queries(self, layer: int) -> bool:
        """Whether :meth:`run_block_queries` can run block ``layer``."""
        fn = getattr(self.backend, "can_run_queries", None)
        return bool(fn(layer)) if fn is not None else False

    def run_block_queries(self, layer: int, h: torch.Tensor, n: int) -> torch.Tensor:
        """Block ``layer`` on ``h`` with only the first ``n`` tokens as queries, ``(B, n, D)``: what
        ``run_blocks(h, layer, layer + 1)[:, :n]`` gives, at the cost of the keys and values of the
        other tokens only. The block runs unpruned: no plan may be installed for it."""
        if not self.can_run_queries(layer):
            raise NotImplementedError(f"{self.name}: block {layer} cannot run a subset of its queries; run it whole")
        if self.runtime.plan_for(layer) is not None:
            raise ValueError(f"run_block_queries runs block {layer} unpruned, but a plan is installed for it")
        if not 1 <= n <= h.shape[1]:
            raise ValueError(f"n must be between 1 and the {h.shape[1]} tokens of h, got {n}")
        return self.backend.run_block_queries(layer, h, n)  # type: ignore[attr-defined]

    # ------------------------------------------- attention inside the readout
    @property
    def readout_layers(self) -> list[torch.nn.Module]:
        """The attention modules inside the readout, as readout layers ``0..R-1``: CaiT's
        class-attention blocks, an attention-pooling head (timm ``AttentionPoolLatent``); empty for
        a CLS or mean-pooling readout. See :mod:`vitscope.capture.readout_layers`."""
        fn = getattr(self.backend, "readout_modules", None)
        return list(fn(through_embedding=self.readout_head is not None)) if fn is not None else []

    def readout_layout(self, index: int) -> TokenLayout:
        """The key tokens of readout layer ``index``: for CaiT's class attention ``[CLS, patches]``
        (CLS at 0, its own layout: the analysed layers have no CLS), for attention pooling the last
        block's tokens (:attr:`layout`)."""
        from vitscope.capture.readout_layers import readout_kind

        m = self._readout_layer(index)
        if readout_kind(m) == "class_attention":
            lay = self.layout
            return TokenLayout(1, 0, None, (), lay.grid, lay.patch_size)
        return self.layout

    def _readout_layer(self, index: int) -> torch.nn.Module:
        layers = self.readout_layers
        if not 0 <= index < len(layers):
            raise ValueError(f"readout layer {index} out of range: {self.name} has {len(layers)} readout attention layer(s)"
                             + ("" if layers else " (its readout reads a CLS token or a mean, not attention)"))
        return layers[index]

    @torch.no_grad()
    def readout_attention(self, x: Inputs) -> list[torch.Tensor]:
        """Each readout layer's attention ``(B, H, Q, K)`` (Q queries: CaiT's CLS, or the pooling
        latents; K keys per :meth:`readout_layout`), computed as timm's unfused path does."""
        from vitscope.capture.readout_layers import ReadoutPlan, readout_plans

        layers = self.readout_layers
        if not layers:
            self._readout_layer(0)  # raises, saying why
        maps: dict[int, torch.Tensor] = {}
        with readout_plans(layers, {i: ReadoutPlan(on_attention=maps.__setitem__) for i in range(len(layers))}):
            self.readout(self.run_blocks(self.embed(x)))
        return [maps[i] for i in range(len(layers))]

    def readout_row(self) -> Optional[torch.Tensor]:
        """How the readout reads the last block's tokens, as weights over them ``(T,)`` float64: one-hot
        at the CLS token for a CLS readout, uniform over the pooled tokens for mean pooling; None for a
        readout that pools by attention (its query's attention is outside the analysed layers). The
        explanations' row (``vitscope.explain``)."""
        fn = getattr(self.backend, "pooling", None)
        cls = self.layout.cls_index
        pooling = fn() if fn is not None else (("token", cls) if cls is not None else None)
        if pooling is None:
            return None
        kind, index = pooling
        row = torch.zeros(self.num_tokens, dtype=torch.float64)
        if kind == "token":
            row[index] = 1.0
        else:  # "mean" over tokens index..T-1
            row[index:] = 1.0 / (self.num_tokens - index)
        return row

    def readout_tokens(self) -> Optional[int]:
        """``n`` when :meth:`readout` reads only the first ``n`` tokens of the last block's output
        (CLS: 1; CLS + distillation token: 2), so it can be given just those; None otherwise."""
        fn = getattr(self.backend, "readout_tokens", None)
        n = fn() if fn is not None and self.readout_head is None else None  # (a readout head reads the pooled embedding)
        return int(n) if n else None

    def plans_for_masks(self, masks: Optional[MaskSpec]) -> dict[int, LayerPlan]:
        compiled = compile_masks(
            masks, num_layers=self.num_layers, num_heads=self.num_heads, layout=self.layout, device=self.device
        )
        return {layer: LayerPlan(keep=keep, head_gate=gate) for layer, (keep, gate) in compiled.items()}

    # ------------------------------------------------------------ public API
    @torch.no_grad()
    def logits(self, x: Inputs, masks: Optional[MaskSpec] = None) -> torch.Tensor:
        """Class logits ``(B, C)``, with ``masks`` multiplied into the post-softmax attention.

        ``masks`` maps ``(layer, head)`` (``head=None``: every head of the layer) to a region:
        ``"all"``, ``"cls"``, ``"patch"``, ``"cls_cross"``, ``"cls_self"`` or a boolean ``(T, T)``
        / ``(B, T, T)`` tensor (True = pruned). No renormalisation. Without masks this is the plain
        model forward.
        """
        x = self._input(x)
        self._require_head()
        if not masks and self.readout_head is None:
            return self.backend.forward(x)
        plans = self.plans_for_masks(masks)
        return self.readout(self.run_blocks(self.backend.embed(x), plans=plans))

    @torch.no_grad()
    def embeddings(self, x: Inputs, masks: Optional[MaskSpec] = None) -> torch.Tensor:
        """The pooled image embedding ``(B, D)`` (see :meth:`embedding`), with ``masks`` as in
        :meth:`logits`. Defined for every model, with or without a classifier."""
        x = self._input(x)
        return self.embedding(self.run_blocks(self.backend.embed(x), plans=self.plans_for_masks(masks)))

    @torch.no_grad()
    def attention(self, x: Inputs, layers: Optional[Sequence[int]] = None, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Every post-softmax attention map, ``(B, L, H, T, T)`` (or ``(B, len(layers), H, T, T)``).

        ``out``: a tensor returned by an earlier call with the same shapes, to be overwritten.
        Reusing it in a loop over batches saves allocating (and the OS zeroing) a fresh
        ``B·L·H·T²`` buffer for every batch.
        """
        x = self._input(x)
        sel = self._layers(layers)
        index = {layer: i for i, layer in enumerate(sel)}
        # Layer-major storage: each layer's maps are written in place by the kernel (no copy);
        # the returned tensor is a (B, L, H, T, T) view of it.
        dtype = next(self.module.parameters()).dtype
        shape = (len(sel), x.shape[0], self.num_heads, self.num_tokens, self.num_tokens)
        if out is not None:
            store = out.transpose(0, 1)
            if tuple(store.shape) != shape or not store.is_contiguous() or store.dtype != dtype or store.device != x.device:
                raise ValueError(f"out must be a tensor returned by an earlier attention() call of shape {(shape[1], shape[0], *shape[2:])}")
        else:
            store = torch.empty(shape, device=x.device, dtype=dtype)
        seen: set[int] = set()

        def mark(layer: int, attn: torch.Tensor) -> None:
            if attn.data_ptr() != store[index[layer]].data_ptr():
                store[index[layer]] = attn
            seen.add(layer)

        plans = {layer: LayerPlan(on_attention=mark, buffer=store[index[layer]]) for layer in sel}
        h = self.backend.embed(x)
        self.run_blocks(h, 0, max(sel) + 1, plans=plans)
        self._check_seen(seen, sel)
        return store.transpose(0, 1)

    def stream(
        self,
        x: Inputs,
        on_attention: Optional[Callable[[int, torch.Tensor], None]] = None,
        *,
        layers: Optional[Sequence[int]] = None,
        on_gradient: Optional[Callable[[int, torch.Tensor, torch.Tensor], None]] = None,
        targets: Optional[torch.Tensor] = None,
        masks: Optional[MaskSpec] = None,
        maps: str = "effective",
    ) -> torch.Tensor:
        """Run the model once and hand each layer's attention to callbacks, batch by batch.

        ``on_attention(layer, attn)`` is called during the forward pass with ``(B, H, T, T)``;
        the map is not kept afterwards, so memory stays at one layer's maps. With ``on_gradient``,
        the summed cross-entropy against ``targets`` (default: the model's own predictions) is
        back-propagated and ``on_gradient(layer, attn, grad)`` receives ``d loss / d attn`` for each
        layer (last layer first); each image's gradient is that of its own loss. Returns the logits.

        ``maps``: ``"effective"`` (the default) hands ``on_attention`` the matrix that multiplies
        the values, masks included; ``"softmax"`` each head's own softmax, which differs only for
        talking-heads attention (CaiT), where it is the distribution over keys before the heads are
        mixed — what distance and pattern measures need. ``"softmax"`` takes no ``masks``.
        """
        if maps not in ("effective", "softmax"):
            raise ValueError(f"maps={maps!r}: use 'effective' (the matrix that multiplies v) or 'softmax' (each head's own softmax)")
        if maps == "softmax" and masks:
            raise ValueError("maps='softmax' reports each head's softmax before any mask; pass masks with maps='effective'")
        x = self._input(x)
        sel = self._layers(layers)
        base = self.plans_for_masks(masks)
        seen: set[int] = set()

        def seen_attention(layer: int, attn: torch.Tensor) -> None:
            seen.add(layer)
            if on_attention is not None:
                on_attention(layer, attn)

        plans = dict(base)
        for layer in sel:
            p = base.get(layer, LayerPlan())
            plans[layer] = LayerPlan(keep=p.keep, head_gate=p.head_gate, on_attention=seen_attention, on_gradient=on_gradient,
                                     report_softmax=maps == "softmax")  # fmt: skip
        grad = on_gradient is not None
        with torch.set_grad_enabled(grad):
            h = self.backend.embed(x)
            if grad:
                h = h.detach().requires_grad_(True)
            logits = self.readout(self.run_blocks(h, plans=plans))
            self._check_seen(seen, sel)
            if grad:
                if targets is None:
                    targets = logits.argmax(-1)
                loss = F.cross_entropy(logits, targets.to(logits.device), reduction="sum")
                loss.backward()
        return logits.detach()

    def iter_attention(self, x: Inputs, layers: Optional[Sequence[int]] = None) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield ``(layer, attn)`` one layer at a time; the forward advances as you iterate."""
        x = self._input(x)
        sel = set(self._layers(layers))
        with torch.no_grad():
            h = self.backend.embed(x)
            for i in range(self.num_layers if not sel else max(sel) + 1):
                got: list[torch.Tensor] = []
                plans = {i: LayerPlan(on_attention=lambda _l, a: got.append(a))} if i in sel else {}
                h = self.run_blocks(h, i, i + 1, plans=plans)
                if i in sel:
                    if not got:
                        raise CaptureError(f"layer {i} ran without reaching vitscope's attention kernel")
                    yield i, got[0]

    @torch.no_grad()
    def run_with_cache(self, x: Inputs, names: Optional[Sequence[str]] = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Logits and a cache of named activations (all hook points when ``names`` is None)."""
        x = self._input(x)
        want = set(names) if names is not None else None
        valid = {"embed"} | {f"blocks.{l}.attn.pattern" for l in range(self.num_layers)} | {
            f"blocks.{l}.out" for l in range(self.num_layers)
        }
        if want is not None and not want <= valid:
            bad = sorted(want - valid)
            raise KeyError(f"unknown hook point(s) {bad}; valid: 'embed', 'blocks.<l>.attn.pattern', 'blocks.<l>.out' for l < {self.num_layers}")
        cache: dict[str, torch.Tensor] = {}

        def wanted(name: str) -> bool:
            return want is None or name in want

        h = self.backend.embed(x)
        if wanted("embed"):
            cache["embed"] = h
        plans = {
            l: LayerPlan(on_attention=lambda layer, a: cache.__setitem__(f"blocks.{layer}.attn.pattern", a))
            for l in range(self.num_layers)
            if wanted(f"blocks.{l}.attn.pattern")
        }

        def on_block(l: int, out: torch.Tensor) -> None:
            if wanted(f"blocks.{l}.out"):
                cache[f"blocks.{l}.out"] = out

        logits = self.readout(self.run_blocks(h, plans=plans, on_block=on_block)) if self.num_classes else None
        self._check_seen({int(k.split(".")[1]) for k in cache if k.endswith("pattern")}, sorted(plans))
        return logits, cache  # type: ignore[return-value]

    # ---------------------------------------------------------------- helpers
    def _layers(self, layers: Optional[Sequence[int]]) -> list[int]:
        return select_layers(layers, self.num_layers, self.name)

    def _check_seen(self, seen: set[int], wanted: Sequence[int]) -> None:
        missing = sorted(set(wanted) - seen)
        if missing:
            raise CaptureError(
                f"captured {len(set(wanted)) - len(missing)} of {len(wanted)} attention maps: layers {missing} never "
                "reached vitscope's attention kernel (their attention module bypasses it). No partial result is returned."
            )

    def _require_head(self) -> None:
        if not self.num_classes:
            raise ValueError(f"{self.name} has no classification head, so it has no logits; load a model with a classifier")

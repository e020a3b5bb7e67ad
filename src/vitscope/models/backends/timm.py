"""timm Vision Transformers: ``VisionTransformer`` (ViT, DeiT, registers), ``Eva`` (EVA, EVA-02,
RoPE-ViT, DINOv3 and the other rotary models built on it), ``Beit`` (relative position bias) and
``Cait`` (talking-heads self-attention; its class-attention blocks are part of the readout).

Each attention class gets a forward of its own that mirrors timm's line by line up to the point where
``q, k, v`` (and the rotary embedding, the relative position bias) are ready, hands them to
:class:`~vitscope.capture.runtime.AttentionRuntime`, and finishes the module exactly as timm does.
With no plan for the layer, the module's original (fused) forward runs untouched.
"""

from __future__ import annotations

import types
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from vitscope.capture.runtime import AttentionRuntime, LayerPlan, with_model_mask
from vitscope.core.layout import TokenLayout
from vitscope.models.errors import UnsupportedModelError

_WINDOWED_HINT = (
    " Windowed attention (Swin and similar) is not supported yet: vitscope's analyses need every "
    "token to attend to every token."
)


def _join_mask(plan: LayerPlan, attn_mask: Optional[torch.Tensor], is_causal: bool = False) -> tuple[LayerPlan, Optional[torch.Tensor]]:
    """The model's own ``attn_mask`` under a plan (see :func:`with_model_mask`); causal attention is refused."""
    if is_causal:
        raise NotImplementedError("vitscope analyses bidirectional attention only; this call asked for causal attention")
    return with_model_mask(plan, attn_mask)


def _dropout(attn: nn.Module) -> float:
    return attn.attn_drop.p if attn.training else 0.0


# ----------------------------------------------------------------- attention forwards
def _vit_attention_forward(runtime: AttentionRuntime, layer: int, original):
    """``timm.layers.Attention`` (VisionTransformer)."""

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False, **kw):
        plan = runtime.plan_for(layer)
        if plan is None:
            return original(x, attn_mask=attn_mask, is_causal=is_causal, **kw) if (attn_mask is not None or is_causal or kw) else original(x)
        plan, bias = _join_mask(plan, attn_mask, is_causal)
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if getattr(self, "gate", None) is not None else None
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        x = runtime.attend(plan, layer, q, k, v, self.scale, _dropout(self), bias=bias)
        x = x.transpose(1, 2).reshape(B, N, self.num_heads * self.head_dim)
        x = self.norm(x) if hasattr(self, "norm") else x
        if gate is not None:
            x = x * gate
        x = self.proj(x)
        return self.proj_drop(x)

    return forward


def _rope_qk(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rope: Optional[torch.Tensor]):
    """Rotary embedding on the patch tokens only (prefix tokens are left as they are), as timm does."""
    if rope is None:
        return q, k
    from timm.layers import apply_rot_embed_cat

    npt = self.num_prefix_tokens
    half = getattr(self, "rotate_half", False)
    q = torch.cat([q[:, :, :npt, :], apply_rot_embed_cat(q[:, :, npt:, :], rope, half=half)], dim=2).type_as(v)
    k = torch.cat([k[:, :, :npt, :], apply_rot_embed_cat(k[:, :, npt:, :], rope, half=half)], dim=2).type_as(v)
    return q, k


def _eva_qkv(self: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``EvaAttention``'s (and BEiT's) q, k, v ``(B, H, N, d)``: fused or separate projections,
    q/v biases (no k bias)."""
    B, N, _ = x.shape
    if self.qkv is None:
        return tuple(proj(x).reshape(B, N, self.num_heads, -1).transpose(1, 2) for proj in (self.q_proj, self.k_proj, self.v_proj))  # type: ignore[return-value]
    if self.q_bias is None:
        qkv = self.qkv(x)
    else:
        qkv_bias = torch.cat((self.q_bias, self.k_bias, self.v_bias))
        if self.qkv_bias_separate:
            qkv = self.qkv(x)
            qkv += qkv_bias
        else:
            qkv = F.linear(x, weight=self.qkv.weight, bias=qkv_bias)
    q, k, v = qkv.reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    return q, k, v


def _rope_qkv(self: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``AttentionRope``'s q, k, v ``(B, H, N, d)``, with grouped-query key/value heads repeated as timm does."""
    B, N, _ = x.shape
    if self.qkv is not None:
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    else:
        q = self.q_proj(x).reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).reshape(B, N, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).reshape(B, N, self.num_kv_heads, self.head_dim).transpose(1, 2)
    return q, k, v


def _rotary_attention_forward(qkv: Callable[[nn.Module, torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]):
    """The patched forward of a rotary attention module (EVA's and ``AttentionRope``): its own
    projections (``qkv``), then q/k norm, rotary embedding on the patch tokens, grouped-query heads
    where the module has them, vitscope's kernel, sub-LN ``norm``, gate and output projection — in
    timm's order."""

    def patch(runtime: AttentionRuntime, layer: int, original):
        def forward(self, x: torch.Tensor, rope: Optional[torch.Tensor] = None, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False):
            plan = runtime.plan_for(layer)
            if plan is None:
                return original(x, rope=rope, attn_mask=attn_mask, is_causal=is_causal)
            plan, bias = _join_mask(plan, attn_mask, is_causal)
            B, N, _ = x.shape
            gate = self.gate(x).sigmoid() if self.gate is not None else None
            q, k, v = qkv(self, x)
            q, k = self.q_norm(q), self.k_norm(k)
            q, k = _rope_qk(self, q, k, v, rope)
            if getattr(self, "num_kv_groups", 1) > 1:
                k = k.repeat_interleave(self.num_kv_groups, dim=1)
                v = v.repeat_interleave(self.num_kv_groups, dim=1)
            x = runtime.attend(plan, layer, q, k, v, self.scale, _dropout(self), bias=bias)
            x = x.transpose(1, 2).reshape(B, N, -1)
            x = self.norm(x)
            if gate is not None:
                x = x * gate
            x = self.proj(x)
            return self.proj_drop(x)

        return forward

    return patch


#: ``timm.models.eva.EvaAttention``: q/v biases (no k bias), q/k norm, rotary embedding, sub-LN.
_eva_attention_forward = _rotary_attention_forward(_eva_qkv)
#: ``timm.layers.AttentionRope`` (RoPE-ViT, DINOv3, ...): like EVA's, plus grouped-query heads.
_rope_attention_forward = _rotary_attention_forward(_rope_qkv)


def _beit_attention_forward(runtime: AttentionRuntime, layer: int, original):
    """``timm.models.beit.Attention``: q/v biases, per-layer and/or shared relative position bias."""

    def forward(self, x: torch.Tensor, shared_rel_pos_bias: Optional[torch.Tensor] = None):
        plan = runtime.plan_for(layer)
        if plan is None:
            return original(x, shared_rel_pos_bias=shared_rel_pos_bias)
        B, N, C = x.shape
        q, k, v = _eva_qkv(self, x)  # BEiT's projection has EVA's q/v biases
        # the bias exactly as timm's fused path forms it
        rel_pos_bias = None
        if self.relative_position_bias_table is not None:
            rel_pos_bias = self._get_rel_pos_bias()
            if shared_rel_pos_bias is not None:
                rel_pos_bias = rel_pos_bias + shared_rel_pos_bias
        elif shared_rel_pos_bias is not None:
            rel_pos_bias = shared_rel_pos_bias
        x = runtime.attend(plan, layer, q, k, v, self.scale, _dropout(self), bias=rel_pos_bias)
        x = x.transpose(1, 2).reshape(B, N, C)
        x = self.proj(x)
        return self.proj_drop(x)

    return forward


def _talking_heads_forward(runtime: AttentionRuntime, layer: int, original):
    """``timm.models.cait.TalkingHeadAttn``: heads are mixed by ``proj_l`` before the softmax and by
    ``proj_w`` after it. The map vitscope reports and masks for head ``h`` is row ``h`` after
    ``proj_w``: the matrix that multiplies head ``h``'s values."""

    def forward(self, x: torch.Tensor):
        plan = runtime.plan_for(layer)
        if plan is None:
            return original(x)
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        x = runtime.attend(
            plan,
            layer,
            q,
            k,
            v,
            self.scale,
            _dropout(self),
            pre_softmax=lambda a: self.proj_l(a.permute(0, 2, 3, 1)).permute(0, 3, 1, 2),
            post_softmax=lambda a: self.proj_w(a.permute(0, 2, 3, 1)).permute(0, 3, 1, 2),
        )
        x = x.transpose(1, 2).reshape(B, N, C)
        x = self.proj(x)
        return self.proj_drop(x)

    return forward


# ----------------------------------------------------------------------- backends
class TimmBackend:
    """Adapts a timm ``VisionTransformer`` to vitscope's uniform interface (:class:`~vitscope.models.backends.base.Backend`).

    :func:`timm_backend` picks this class or the one for another timm family.
    """

    library = "timm"
    #: Model class name of the family, as the error messages and docs/models.md name it.
    family = "VisionTransformer"

    def __init__(self, model: nn.Module) -> None:
        from timm.models.vision_transformer import VisionTransformer

        if not isinstance(model, VisionTransformer):
            _refuse(model)
        self._setup(model, list(model.blocks))

    def _attention_forwards(self) -> dict[type, Callable]:
        from timm.layers import Attention

        return {Attention: _vit_attention_forward}

    def _setup(self, model: nn.Module, blocks: list[nn.Module]) -> None:
        name = type(model).__name__
        if not blocks:
            raise UnsupportedModelError(f"{name} has no attention blocks to analyse")
        forwards = self._attention_forwards()
        for i, blk in enumerate(blocks):
            attn = getattr(blk, "attn", None)
            if type(attn) not in forwards:
                known = ", ".join(sorted(c.__name__ for c in forwards))
                raise UnsupportedModelError(
                    f"block {i} of {name} uses attention class {type(attn).__name__}; for timm's {self.family} "
                    f"vitscope supports {known}. Use a model whose blocks use one of these (docs/models.md lists "
                    "the supported families)."
                )
        self.module = model.eval()
        self.blocks = blocks
        self.num_heads = blocks[0].attn.num_heads
        self.num_classes: Optional[int] = getattr(model, "num_classes", None) or None

    def install(self, runtime: AttentionRuntime) -> None:
        forwards = self._attention_forwards()
        for i, blk in enumerate(self.blocks):
            attn = blk.attn
            original = getattr(attn, "_vitscope_original_forward", None) or attn.forward
            attn._vitscope_original_forward = original
            attn.forward = types.MethodType(forwards[type(attn)](runtime, i, original), attn)

    def layout(self, input_size: Optional[tuple[int, int, int]] = None) -> TokenLayout:
        """The token layout (a timm ViT knows its grid; ``input_size`` is accepted for the protocol)."""
        return timm_layout(self.module)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        m = self.module
        return m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x))))

    def run_block(self, i: int, h: torch.Tensor) -> torch.Tensor:
        return self.blocks[i](h)

    def _final(self, h: torch.Tensor) -> torch.Tensor:
        """Residual stream after the last block -> the sequence ``forward_head`` takes."""
        return self.module.norm(h)

    def readout(self, h: torch.Tensor) -> torch.Tensor:
        return self.module.forward_head(self._final(h))

    def embedding(self, h: torch.Tensor) -> torch.Tensor:
        """timm's pooled pre-logits features ``(B, D)`` (``forward_head(..., pre_logits=True)``)."""
        return self.module.forward_head(self._final(h), pre_logits=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)

    # ------------------------------------------- pieces of a block (SplitBlocks)
    def _plain_block(self, i: int) -> Optional[nn.Module]:
        """Block ``i`` when it is timm's pre-norm ``Block`` with a ``timm.layers.Attention``, the only
        layout whose pieces :meth:`finish_block` and :meth:`run_block_queries` mirror; else None.
        (Exact classes: a subclass may change the forward.)"""
        from timm.layers import Attention
        from timm.models.vision_transformer import Block

        blk = self.blocks[i]
        return blk if type(blk) is Block and type(blk.attn) is Attention else None

    def output_projection(self, i: int) -> Optional[nn.Linear]:
        """``attn.proj`` of a plain block whose attention has no sub-LN ``norm`` between the heads'
        contexts and the projection (a norm over all heads would make pruning one head change the
        others' share); the optional sigmoid gate is elementwise, so it keeps heads apart."""
        blk = self._plain_block(i)
        if blk is None or not isinstance(getattr(blk.attn, "norm", None), (nn.Identity, type(None))):
            return None
        return blk.attn.proj

    def finish_block(self, i: int, h: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        blk = self._plain_block(i)
        if blk is None:
            raise NotImplementedError(f"block {i} of {type(self.module).__name__} is not timm's plain Block; run it whole")
        x = h + blk.drop_path1(blk.ls1(attn_out))
        return x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))

    def can_run_queries(self, i: int) -> bool:
        return self._plain_block(i) is not None

    def run_block_queries(self, i: int, h: torch.Tensor, n: int) -> torch.Tensor:
        """Mirrors ``Block.forward`` / ``Attention.forward`` with the query projection, attention,
        output projection and MLP on the first ``n`` tokens only."""
        blk = self._plain_block(i)
        if blk is None:
            raise NotImplementedError(f"block {i} of {type(self.module).__name__} is not timm's plain Block; run it whole")
        a = blk.attn
        B, T, _ = h.shape
        d = a.num_heads * a.head_dim
        y = blk.norm1(h)
        w, b = a.qkv.weight, a.qkv.bias
        q = F.linear(y[:, :n], w[:d], None if b is None else b[:d]).reshape(B, n, a.num_heads, a.head_dim).transpose(1, 2)
        kv = F.linear(y, w[d:], None if b is None else b[d:]).reshape(B, T, 2, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)
        k, v = kv.unbind(0)
        q, k = a.q_norm(q), a.k_norm(k)
        ctx = F.scaled_dot_product_attention(q, k, v, dropout_p=_dropout(a), scale=a.scale)
        ctx = ctx.transpose(1, 2).reshape(B, n, d)
        ctx = a.norm(ctx) if hasattr(a, "norm") else ctx
        if getattr(a, "gate", None) is not None:
            ctx = ctx * a.gate(y[:, :n]).sigmoid()
        x = h[:, :n] + blk.drop_path1(blk.ls1(a.proj_drop(a.proj(ctx))))
        return x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))

    def readout_modules(self, through_embedding: bool = False) -> list[nn.Module]:
        """The attention-pooling head (``attn_pool``), when the model reads out through one (its
        classifier and its embedding both do)."""
        from vitscope.capture.readout_layers import readout_kind

        pool = getattr(self.module, "attn_pool", None)
        return [pool] if pool is not None and readout_kind(pool) is not None else []

    def pooling(self) -> Optional[tuple[str, int]]:
        """How ``forward_head`` pools the tokens: ``("token", 0)`` (CLS), ``("mean", first)`` (the mean
        of tokens ``first..``, global average pooling), or None (attention pooling, max pooling)."""
        m = self.module
        if getattr(m, "attn_pool", None) is not None:
            return None
        pool = getattr(m, "global_pool", None)
        if pool == "token" and self.layout().cls_index is not None:
            return ("token", int(self.layout().cls_index))
        if pool == "avg":
            return ("mean", int(getattr(m, "num_prefix_tokens", 0)))
        return None

    def readout_tokens(self) -> Optional[int]:
        """1 for a ``VisionTransformer`` that reads its CLS token (``global_pool='token'``, no
        attention pooling), 2 for DeiT's distilled model (CLS and distillation token); None for
        average / max / attention pooling and for families whose readout runs more blocks (CaiT)."""
        from timm.models.deit import VisionTransformerDistilled
        from timm.models.vision_transformer import VisionTransformer

        m = self.module
        if type(self)._final is not TimmBackend._final:
            return None
        if type(m).forward_head is VisionTransformerDistilled.forward_head:
            return 2
        token_pool = (
            type(m).forward_head is VisionTransformer.forward_head
            and getattr(type(m), "pool", None) is getattr(VisionTransformer, "pool", None)
            and getattr(m, "attn_pool", None) is None
            and getattr(m, "global_pool", None) == "token"
            and getattr(m, "cls_token", None) is not None
        )
        return 1 if token_pool else None


class EvaBackend(TimmBackend):
    """timm ``Eva``: EVA, EVA-02 and the rotary-embedding ViTs built on it (RoPE-ViT, DINOv3, PE, ...).

    ``Eva._pos_embed`` returns the rotary embedding along with the tokens; :meth:`embed` keeps it for
    the token count it was made for and :meth:`run_block` passes it to every block, as
    ``Eva.forward_features`` does.
    """

    family = "Eva"

    def __init__(self, model: nn.Module) -> None:
        self._setup(model, list(model.blocks))
        self._rope: Optional[tuple[int, Any]] = None

    def _attention_forwards(self) -> dict[type, Callable]:
        from timm.layers import AttentionRope
        from timm.models.eva import EvaAttention

        return {EvaAttention: _eva_attention_forward, AttentionRope: _rope_attention_forward}

    def layout(self, input_size: Optional[tuple[int, int, int]] = None) -> TokenLayout:
        m = self.module
        grid = tuple(int(g) for g in m.patch_embed.grid_size)
        if input_size is not None and getattr(m, "dynamic_img_size", False):
            grid = tuple(int(g) for g in m.patch_embed.dynamic_feat_size(tuple(input_size[1:])))
        return timm_layout(m, grid=grid)  # type: ignore[arg-type]

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        m = self.module
        h, rope = m._pos_embed(m.patch_embed(x))
        h = m.norm_pre(h)
        self._rope = (h.shape[1], rope)
        return h

    def _rope_for(self, h: torch.Tensor) -> Any:
        m = self.module
        if m.rope is None:
            return None
        if self._rope is not None and self._rope[0] == h.shape[1]:
            return self._rope[1]
        grid = tuple(m.patch_embed.grid_size)
        if h.shape[1] != m.num_prefix_tokens + grid[0] * grid[1]:
            raise ValueError(
                f"{type(m).__name__}: its rotary position embedding is made for the token grid of embed(); got "
                f"{h.shape[1]} tokens, which no embed() call produced. Run the blocks on the full sequence "
                "(token dropping is not supported for rotary models)."
            )
        rope = m.rope.get_embed() if hasattr(m.rope, "feat_shape") and not m.dynamic_img_size else m.rope.get_embed(shape=grid)
        self._rope = (h.shape[1], rope)
        return rope

    def run_block(self, i: int, h: torch.Tensor) -> torch.Tensor:
        rope = self._rope_for(h)
        if rope is not None and getattr(self.module, "rope_mixed", False):
            rope = rope[i]  # depth-dependent embedding (RoPE-Mixed)
        return self.blocks[i](h, rope=rope)


class BeitBackend(TimmBackend):
    """timm ``Beit``: relative position bias per layer and/or shared by all layers."""

    family = "Beit"

    def __init__(self, model: nn.Module) -> None:
        self._setup(model, list(model.blocks))

    def _attention_forwards(self) -> dict[type, Callable]:
        from timm.models.beit import Attention

        return {Attention: _beit_attention_forward}

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        m = self.module
        x = m.patch_embed(x)
        x = torch.cat((m.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        if m.pos_embed is not None:
            x = x + m.pos_embed
        return m.pos_drop(x)

    def run_block(self, i: int, h: torch.Tensor) -> torch.Tensor:
        m = self.module
        grid = tuple(m.patch_embed.grid_size)
        if h.shape[1] != 1 + grid[0] * grid[1]:
            raise ValueError(
                f"{type(m).__name__}: its relative position bias is made for {1 + grid[0] * grid[1]} tokens (CLS + "
                f"{grid[0]}x{grid[1]} patches), got {h.shape[1]}. Run the blocks on the full sequence (token dropping "
                "is not supported for relative-position-bias models)."
            )
        shared = m.rel_pos_bias() if m.rel_pos_bias is not None else None
        return self.blocks[i](h, shared_rel_pos_bias=shared)


class CaitBackend(TimmBackend):
    """timm ``Cait``: the analysed layers are the talking-heads self-attention blocks (``blocks``,
    patch tokens only); the class-attention blocks (``blocks_token_only``), where the CLS token alone
    queries the patches, are part of the readout."""

    family = "Cait"

    def __init__(self, model: nn.Module) -> None:
        self._setup(model, list(model.blocks))

    def _attention_forwards(self) -> dict[type, Callable]:
        from timm.models.cait import TalkingHeadAttn

        return {TalkingHeadAttn: _talking_heads_forward}

    def layout(self, input_size: Optional[tuple[int, int, int]] = None) -> TokenLayout:
        pe = self.module.patch_embed
        grid = tuple(int(g) for g in pe.grid_size)
        return TokenLayout(0, None, None, (), grid, tuple(int(p) for p in pe.patch_size))  # type: ignore[arg-type]

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        m = self.module
        return m.pos_drop(m.patch_embed(x) + m.pos_embed)

    def pooling(self) -> None:
        """None: the class token enters in the class-attention blocks, outside the analysed layers."""
        return None

    def readout_modules(self, through_embedding: bool = False) -> list[nn.Module]:
        """The class-attention of each ``blocks_token_only`` block (CLS queries ``[CLS, patches]``)."""
        blocks = self.module.blocks_token_only
        return [blk.attn for blk in blocks] if blocks is not None else []

    def _final(self, h: torch.Tensor) -> torch.Tensor:
        m = self.module
        if m.blocks_token_only is not None:
            h = m.forward_cls(h)
        return m.norm(h)


def timm_backend(model: nn.Module) -> TimmBackend:
    """The backend for a timm model: by its class (``VisionTransformer``, ``Eva``, ``Beit``, ``Cait``
    and their subclasses), else :class:`UnsupportedModelError` saying what is supported."""
    from timm.models.beit import Beit
    from timm.models.cait import Cait
    from timm.models.eva import Eva
    from timm.models.vision_transformer import VisionTransformer

    for cls, backend in ((VisionTransformer, TimmBackend), (Eva, EvaBackend), (Beit, BeitBackend), (Cait, CaitBackend)):
        if isinstance(model, cls):
            return backend(model)
    _refuse(model)
    raise AssertionError  # unreachable


def _refuse(model: nn.Module) -> None:
    name = type(model).__name__
    windowed = "swin" in name.lower() or (hasattr(model, "layers") and not hasattr(model, "blocks"))
    raise UnsupportedModelError(
        f"cannot analyse timm model class {name}: vitscope supports timm's VisionTransformer (vit_*, deit_*), "
        "Eva (eva02_*, *_rope_*, *_dinov3*), Beit (beit*) and Cait (cait_*) families; see docs/models.md."
        + (_WINDOWED_HINT if windowed else "")
    )


def timm_layout(m: nn.Module, grid: Optional[tuple[int, int]] = None) -> TokenLayout:
    """The token layout of a timm ViT from its attributes alone (no forward): CLS, then the
    distillation token, then registers, then the patch grid (``grid`` overrides the patch embedding's)."""
    has_cls = getattr(m, "cls_token", None) is not None
    dist = getattr(m, "dist_token", None) is not None
    n_reg = getattr(m, "num_reg_tokens", None)
    if n_reg is None:
        reg = getattr(m, "reg_token", None)  # Eva keeps only the parameter
        n_reg = int(reg.shape[1]) if reg is not None else 0
    n_reg = int(n_reg or 0)
    idx = 0
    cls_index = None
    if has_cls:
        cls_index, idx = 0, 1
    dist_index = None
    if dist:
        dist_index, idx = idx, idx + 1
    regs = tuple(range(idx, idx + n_reg))
    num_prefix = int(m.num_prefix_tokens)
    grid = grid or tuple(int(g) for g in m.patch_embed.grid_size)  # type: ignore[assignment]
    patch = tuple(int(p) for p in m.patch_embed.patch_size)
    return TokenLayout(num_prefix, cls_index, dist_index, regs, grid, patch)  # type: ignore[arg-type]

"""What a model library must provide for :class:`~vitscope.ViT`: the :class:`Backend` protocol.

One implementation per library (``backends.timm.TimmBackend`` and its per-family subclasses,
``backends.hf.HFBackend``). A new family implements these members and routes its attention module's
``q, k, v`` through ``AttentionRuntime.attend`` in :meth:`Backend.install`; see docs/architecture.md
and docs/models.md. :class:`SplitBlocks` lists optional members that let analyses run parts of a
block (the head sweep's shortcuts); a backend without them is still complete.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Protocol, Sequence, runtime_checkable

if TYPE_CHECKING:
    import torch
    from torch import nn

    from vitscope.capture.runtime import AttentionRuntime
    from vitscope.core.layout import TokenLayout


@runtime_checkable
class Backend(Protocol):
    """A ViT of one library, cut into the pieces every analysis needs."""

    #: ``"timm"``, ``"transformers"``, ...
    library: str
    #: The whole model (eval mode).
    module: "nn.Module"
    #: The transformer blocks, in order (``len(blocks)`` is the number of layers).
    blocks: Sequence["nn.Module"]
    num_heads: int
    #: Classes of the classifier head, or None for a backbone without one.
    num_classes: Optional[int]

    def install(self, runtime: "AttentionRuntime") -> None:
        """Make every block's attention call ``runtime`` (which runs the fused kernel when idle)."""

    def layout(self, input_size: tuple[int, int, int]) -> "TokenLayout":
        """The token sequence for inputs of ``input_size`` ``(C, H, W)``."""

    def embed(self, x: "torch.Tensor") -> "torch.Tensor":
        """Preprocessed images ``(B, C, H, W)`` -> tokens entering block 0 ``(B, T, D)``."""

    def run_block(self, i: int, h: "torch.Tensor") -> "torch.Tensor":
        """Block ``i`` on the residual stream ``h``."""

    def readout(self, h: "torch.Tensor") -> "torch.Tensor":
        """Residual stream after the last block -> class logits (for a backbone without a
        classifier: its pooled embedding, as :meth:`embedding`)."""

    def embedding(self, h: "torch.Tensor") -> "torch.Tensor":
        """Residual stream after the last block -> the model's pooled image embedding ``(B, D)``:
        what the library itself calls the pooled / pre-logits features (CLS after the final norm,
        the pooler output, or a mean over tokens; docs/models.md says which per family)."""

    def forward(self, x: "torch.Tensor") -> "torch.Tensor":
        """The library's own forward (logits; a backbone's pooled embedding), untouched by vitscope."""


@runtime_checkable
class SplitBlocks(Protocol):
    """Optional members of a backend whose blocks can be run in pieces.

    Pruning one head changes a block only from its attention output on, and a readout that reads
    the CLS token (and the distillation token) needs the last block's output only there; a backend
    that can run those pieces alone lets :func:`~vitscope.analysis.importance.head_sweep` skip the
    rest. Each member answers per block, so a backend can offer a piece for the blocks of the layout
    it knows and decline the others (the sweep then runs the whole block there). A backend without
    these members gets the general path everywhere.
    """

    def output_projection(self, i: int) -> "Optional[nn.Linear]":
        """The linear layer that maps block ``i``'s per-head contexts, side by side (head ``h`` in
        channels ``h * d_head : (h + 1) * d_head``, after any head gate), to what the attention module
        returns, with nothing but (eval-mode) dropout after it. ``None`` where the block is not of
        that form (a norm over all heads' contexts before the projection, another block layout):
        there pruning a head is not a subtraction of its slice's share of the projection."""

    def finish_block(self, i: int, h: "torch.Tensor", attn_out: "torch.Tensor") -> "torch.Tensor":
        """Block ``i``'s output from its input ``h`` and its attention module's output ``attn_out``
        ``(B, T, D)``: the residual, layer scale and MLP half of the block, without recomputing the
        attention. Only for blocks that have an :meth:`output_projection`."""

    def can_run_queries(self, i: int) -> bool:
        """Whether :meth:`run_block_queries` can run block ``i``."""

    def run_block_queries(self, i: int, h: "torch.Tensor", n: int) -> "torch.Tensor":
        """Block ``i`` with only the first ``n`` tokens as queries: keys and values from every token
        of ``h``, output ``(B, n, D)`` equal to ``run_block(i, h)[:, :n]`` (no vitscope plan applies)."""

    def readout_tokens(self) -> Optional[int]:
        """``n`` when :meth:`Backend.readout` reads only tokens ``0..n-1`` of the last block's output
        (a CLS readout: 1; CLS + distillation token: 2), so it may be given just those ``(B, n, D)``;
        ``None`` when it reads more (a mean over the patches, attention pooling, ...)."""

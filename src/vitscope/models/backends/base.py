"""What a model library must provide for :class:`~vitscope.ViT`: the :class:`Backend` protocol.

One implementation per library (``backends.timm.TimmBackend`` and its per-family subclasses,
``backends.hf.HFBackend``). A new family implements these members and routes its attention module's
``q, k, v`` through ``AttentionRuntime.attend`` in :meth:`Backend.install`; see docs/architecture.md
and docs/models.md.
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

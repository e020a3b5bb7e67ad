"""Where each token sits in a ViT's sequence: :class:`~vitscope.core.layout.TokenLayout` (it lives in
the core, which every layer may use)."""

from vitscope.core.layout import TokenLayout

__all__ = ["TokenLayout"]

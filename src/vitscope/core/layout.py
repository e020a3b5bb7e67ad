"""Where each token sits in a ViT's sequence."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    import numpy as np
    import torch


@dataclass(frozen=True)
class TokenLayout:
    """The token sequence of a ViT: prefix tokens (CLS, distillation, registers) then the patch grid.

    Attributes:
        num_prefix: tokens before the patches (CLS + distillation + registers).
        cls_index: position of the CLS token, or ``None`` for models that pool patches.
        dist_index: position of the distillation token (DeiT distilled), or ``None``.
        register_indices: positions of register tokens (may be empty).
        grid: patch grid as ``(rows, cols)``.
        patch_size: patch side in pixels ``(height, width)``.
    """

    num_prefix: int
    cls_index: Optional[int]
    dist_index: Optional[int]
    register_indices: tuple[int, ...]
    grid: tuple[int, int]
    patch_size: tuple[int, int]

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def num_tokens(self) -> int:
        return self.num_prefix + self.num_patches

    @property
    def patch_slice(self) -> slice:
        return slice(self.num_prefix, self.num_tokens)

    @property
    def image_size(self) -> tuple[int, int]:
        return (self.grid[0] * self.patch_size[0], self.grid[1] * self.patch_size[1])

    def patch_grid(self) -> "np.ndarray":
        """``(P, 2)`` int64 array of (row, col) for each patch token, in sequence order."""
        import numpy as np

        rows, cols = self.grid
        return np.stack([np.repeat(np.arange(rows), cols), np.tile(np.arange(cols), rows)], axis=1).astype(np.int64)

    def patch_positions(self) -> "torch.Tensor":
        """:meth:`patch_grid` as a long tensor (for code that works in torch)."""
        import torch  # here, not at the top: reading a run's layout needs no torch

        return torch.from_numpy(self.patch_grid())

    def to_dict(self) -> dict:
        """The layout as the run manifest stores it (``model.layout``), with the token count."""
        return {
            "num_prefix": self.num_prefix,
            "cls_index": self.cls_index,
            "dist_index": self.dist_index,
            "register_indices": list(self.register_indices),
            "grid": list(self.grid),
            "patch_size": list(self.patch_size),
            "num_tokens": self.num_tokens,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "TokenLayout":
        """Inverse of :meth:`to_dict` (``num_tokens`` is derived, so it is ignored)."""
        return cls(
            num_prefix=int(d["num_prefix"]),
            cls_index=d.get("cls_index"),
            dist_index=d.get("dist_index"),
            register_indices=tuple(d.get("register_indices") or ()),
            grid=(int(d["grid"][0]), int(d["grid"][1])),
            patch_size=(int(d["patch_size"][0]), int(d["patch_size"][1])),
        )

    def describe(self) -> str:
        parts = []
        if self.cls_index is not None:
            parts.append("CLS")
        if self.dist_index is not None:
            parts.append("distillation")
        if self.register_indices:
            parts.append(f"{len(self.register_indices)} registers")
        parts.append(f"{self.grid[0]}x{self.grid[1]} patches of {self.patch_size[0]}x{self.patch_size[1]} px")
        return f"{self.num_tokens} tokens: " + " + ".join(parts)

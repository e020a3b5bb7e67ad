"""Seeded per-epoch augmentation (drawn per dataset index, so it does not depend on the batch split or process count) and normalisation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F


def derive_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (e.g. seed, epoch, rank)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0]) & ((1 << 63) - 1)


@dataclass
class EpochAugmentation:
    """Random crop offsets and flips drawn once per epoch for every dataset index.

    Drawing by index (not by batch) makes the augmentation independent of batch order, batch split
    and number of processes.
    """

    offsets: torch.Tensor  # (N, 2) int64: top, left in the padded image, in [0, 2 * padding]
    flips: torch.Tensor  # (N,) bool
    padding: int

    @classmethod
    def draw(cls, n: int, padding: int, hflip: bool, seed: int) -> "EpochAugmentation":
        g = torch.Generator().manual_seed(seed)
        offsets = torch.randint(0, 2 * padding + 1, (n, 2), generator=g)
        flips = torch.rand(n, generator=g) < 0.5 if hflip else torch.zeros(n, dtype=torch.bool)
        return cls(offsets, flips, padding)

    def apply(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Augment a batch ``x`` (B, C, H, W) whose items are dataset items ``index`` (B,)."""
        index = index.cpu()
        B, C, H, W = x.shape
        p = self.padding
        if p > 0:
            xp = F.pad(x, (p, p, p, p))
            off = self.offsets[index].to(x.device)
            rows = off[:, 0, None] + torch.arange(H, device=x.device)  # (B, H)
            cols = off[:, 1, None] + torch.arange(W, device=x.device)  # (B, W)
            b = torch.arange(B, device=x.device)[:, None, None, None]
            c = torch.arange(C, device=x.device)[None, :, None, None]
            x = xp[b, c, rows[:, None, :, None], cols[:, None, None, :]]
        flip = self.flips[index].to(x.device)[:, None, None, None]
        return torch.where(flip, x.flip(-1), x)


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 ``(B, C, H, W)`` -> float32, scaled to [0, 1] then standardised per channel."""
    m = torch.tensor(mean, dtype=torch.float32, device=x.device)[None, :, None, None]
    s = torch.tensor(std, dtype=torch.float32, device=x.device)[None, :, None, None]
    return (x.float() / 255.0 - m) / s

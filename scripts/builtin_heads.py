#!/usr/bin/env python
"""How different the built-in model's heads are: per-head attention strength on the embedded sample.

Prints, for every head, the hop-profile entropy (ln 7 = 1.95 is uniform over distance on the 7x7
grid), the mean Chebyshev distance to the attended patches (patch queries, attention renormalised over
patch keys, in patches; uniform attention gives 3.22) and the
CLS->CLS attention, each averaged over 60 of the embedded sample images (every 5th), then the range
over heads — the numbers docs/builtin-model.md records for a recipe.

Usage: ``python scripts/builtin_heads.py [WEIGHTS.safetensors]`` (default: the packaged weights).
"""

from __future__ import annotations

import math
import sys

import numpy as np
import torch


def head_table(spec: str) -> dict[str, np.ndarray]:
    import vitscope
    from vitscope.analysis.strength import attention_strength, hop_distance_matrix
    from vitscope.data import embedded_sample, iter_batches

    vit = vitscope.load_model(spec, device="cpu")
    images = embedded_sample()[::5]
    per_layer: list[list[dict[str, np.ndarray]]] = [[] for _ in range(vit.num_layers)]
    hops = hop_distance_matrix(vit.layout).float()
    ps = vit.layout.patch_slice

    def measure(layer: int, attn: torch.Tensor) -> None:
        d = attention_strength(attn, vit.layout)
        # Chebyshev distance of patch queries to the patches they attend to, weighted by the
        # attention renormalised over patch keys, averaged over queries.
        app = attn[:, :, ps, ps]
        app = app / app.sum(dim=-1, keepdim=True)
        d["chebyshev"] = (app * hops).sum(dim=-1).mean(dim=-1).numpy()
        per_layer[layer].append(d)

    with torch.no_grad():
        for batch in iter_batches(images, vit.preprocessing, batch_size=30):
            vit.stream(batch.x, measure)
    out = {}
    for key in ("entropy", "chebyshev", "cls_self"):
        out[key] = np.stack([np.concatenate([d[key] for d in layer]).mean(axis=0) for layer in per_layer])  # (L, H)
    return out


def main() -> None:
    spec = sys.argv[1] if len(sys.argv) > 1 else "fmnist_vit_tiny"
    table = head_table(spec)
    L, H = table["entropy"].shape
    print(f"{spec}: 60 sample images, {L} layers x {H} heads (uniform entropy ln 7 = {math.log(7):.2f})")
    print("layer head  entropy  chebyshev  cls_self")
    for l in range(L):
        for h in range(H):
            print(f"{l:5d} {h:4d}  {table['entropy'][l, h]:7.2f}  {table['chebyshev'][l, h]:9.2f}  {table['cls_self'][l, h]:8.2f}")
    for key, values in table.items():
        print(f"{key}: {values.min():.2f} - {values.max():.2f}")


if __name__ == "__main__":
    main()

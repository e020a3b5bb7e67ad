"""Final step 7: a masked-attention model's (WinfT's) masks, kept in the run."""

from __future__ import annotations

import numpy as np

from vitscope.pipeline.context import RunContext


def model_masks(ctx: RunContext) -> None:
    """A masked-attention model's (WinfT's) allowed keys as ``winft_masks`` ``(L, P, P)`` uint8, so
    the run shows the masks it was analysed under without the weights file."""
    module = ctx.vit.module
    if not callable(getattr(module, "allowed_masks", None)) or ctx.store.has_array("winft_masks"):
        return
    from vitscope.models.winft import mask_stats

    lay = ctx.vit.layout
    masks = module.allowed_masks().bool().cpu()
    stats = mask_stats(masks, lay)
    patch = masks[:, lay.patch_slice, lay.patch_slice].numpy().astype(np.uint8)
    ctx.store.write_array("winft_masks", patch, chunks=(1, *patch.shape[1:]), attrs={
        "dims": ["layer", "query_patch", "key_patch"], "what": "1 where the patch query may attend to the patch key",
        "keys_per_query_by_layer": [float(v) for v in stats["keys_per_query_by_layer"]],
        "keys_per_query": float(stats["keys_per_query"]), "sparsity": float(stats["sparsity"]),
    })

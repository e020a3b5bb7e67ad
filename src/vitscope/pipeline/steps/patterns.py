"""Final step 4: the attention-pattern catalogues (one per map kind: patch block, offsets, CLS).

Autoencoder codes, 2-D projection, density and clusters with decoded prototypes, each written
before the next starts, then the ``patterns`` / ``pattern_clusters`` rows and each head's
dominant cluster read back from the arrays.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from vitscope.pipeline.batch import patterns_module
from vitscope.pipeline.context import RunContext
from vitscope.store import files


def patterns(ctx: RunContext, kind: str, input_kind: str, images: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Autoencoder codes, projection, density and clusters of one catalogue; tables from the arrays."""
    catalogue_arrays(ctx, kind, input_kind)
    return pattern_tables(ctx, kind, images)


def catalogue_arrays(ctx: RunContext, kind: str, input_kind: str) -> None:
    """The arrays of one catalogue, in two resumable sub-steps: the latent codes
    (``patterns/<kind>/codes``, with the trained weights in ``work/``) and the catalogue (embedding,
    clusters, density, decoded prototypes; ``patterns/<kind>/prototypes`` is written last and marks
    it done). Catalogues are independent: a parallel job trains one per rank.
    """
    P = patterns_module()
    st, s = ctx.store, ctx.settings
    pre = f"patterns/{kind}"
    inputs = st.array(f"pattern_inputs/{input_kind}")
    N, L, H = (int(v) for v in inputs.shape[:3])
    M = N * L * H
    ae = None
    state_path = st.work_path(f"autoencoder_{kind}.pt")
    if not st.has_array(f"{pre}/codes"):
        maps = np.asarray(inputs[...]).reshape(M, *inputs.shape[3:])
        ae = P.train_autoencoder(maps, latent_dim=s.latent_dim, epochs=s.ae_epochs, seed=s.seed, max_train=s.ae_max_maps or M,
                                 min_steps=s.ae_min_steps)
        del maps
        save_state(ae.state_dict(), state_path)
        codes = np.asarray(ae.codes, dtype=np.float32)
        st.write_array(f"{pre}/codes", codes.reshape(N, L, H, -1), chunks=(min(N, 256), 1, H, codes.shape[-1]),
                       attrs={"dims": ["image", "layer", "head", "latent"], "image_order": "images.parquet rows", "input": input_kind})
    if not st.has_array(f"{pre}/prototypes"):
        codes = np.asarray(st.array(f"{pre}/codes")[...], dtype=np.float32).reshape(M, -1)
        if ae is None:
            ae = P.AutoencoderResult.from_state_dict(load_state(state_path))
        cat = P.catalogue_patterns(codes, n_clusters=min(s.n_clusters, M), seed=s.seed, projection=s.projection, autoencoder=ae)
        prototypes = np.asarray(cat.prototypes, dtype=np.float32)
        names = [P.describe_prototype(p, kind=input_kind, grid=tuple(ctx.vit.layout.grid)) for p in prototypes]
        gx, gy = np.asarray(cat.grid_x, dtype=float), np.asarray(cat.grid_y, dtype=float)
        st.write_array(f"{pre}/embedding", np.asarray(cat.embedding, dtype=np.float32).reshape(N, L, H, 2),
                       attrs={"dims": ["image", "layer", "head", "xy"], "projection": s.projection})
        st.write_array(f"{pre}/cluster", np.asarray(cat.labels, dtype=np.int32).reshape(N, L, H),
                       attrs={"dims": ["image", "layer", "head"], "names": names})
        st.write_array(f"{pre}/centroids", np.asarray(cat.centroids, dtype=np.float32), attrs={"dims": ["cluster", "latent"]})
        st.write_array(f"{pre}/density", np.asarray(cat.density, dtype=np.float32),
                       attrs={"dims": ["y", "x"], "extent": [float(gx[0]), float(gx[-1]), float(gy[0]), float(gy[-1])],
                              "grid_x": gx.tolist(), "grid_y": gy.tolist()})
        st.write_array(f"{pre}/prototypes", prototypes,
                       attrs={"dims": ["cluster", "channel", "y", "x"], "names": names, "input": input_kind})


def pattern_tables(ctx: RunContext, kind: str, images: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """``patterns`` rows, ``pattern_clusters`` rows and each head's dominant cluster, from the arrays."""
    P = patterns_module()
    st = ctx.store
    pre = f"patterns/{kind}"
    emb = np.asarray(st.array(f"{pre}/embedding")[...], dtype=np.float64)
    lab_arr = st.array(f"{pre}/cluster")
    lab = np.asarray(lab_arr[...], dtype=np.int64)
    names = list(lab_arr.attrs["names"])  # type: ignore[arg-type]
    N, L, H = lab.shape
    maps = pd.DataFrame(
        {
            "kind": kind,
            "image_id": np.repeat(images["image_id"].to_numpy(dtype=np.int64), L * H),
            "layer": np.tile(np.repeat(np.arange(L, dtype=np.int64), H), N),
            "head": np.tile(np.arange(H, dtype=np.int64), N * L),
            "x": emb[..., 0].reshape(-1),
            "y": emb[..., 1].reshape(-1),
            "cluster": lab.reshape(-1),
        }
    )
    K = len(names)
    g = maps.groupby("cluster")
    size = g.size().reindex(range(K), fill_value=0)
    clusters = pd.DataFrame(
        {
            "kind": kind,
            "cluster": np.arange(K, dtype=np.int64),
            "size": size.to_numpy(dtype=np.int64),
            "share": size.to_numpy(dtype=np.float64) / max(1, len(maps)),
            "name": names,
            "x": g["x"].mean().reindex(range(K)).to_numpy(),
            "y": g["y"].mean().reindex(range(K)).to_numpy(),
        }
    )
    prefix = "pattern" if kind == "patch" else f"{kind}_pattern"
    dom = P.dominant_cluster(lab)
    dominant = pd.DataFrame(
        {
            "layer": dom["layer"].to_numpy(dtype=np.int64),
            "head": dom["head"].to_numpy(dtype=np.int64),
            f"{prefix}_cluster": dom["cluster"].to_numpy(dtype=np.int64),
            f"{prefix}_name": [names[int(c)] for c in dom["cluster"]],
            f"{prefix}_share": dom["share"].to_numpy(dtype=np.float64),
        }
    )
    return maps, clusters, dominant


def save_state(state: dict[str, Any], path: Path) -> None:
    """Trained weights into the run's work folder, atomically (a resume skips the training)."""
    tmp = files.tmp_sibling(path)
    torch.save(state, tmp)
    files.publish(tmp, path)


def load_state(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)

"""What a run records about its model and images, handed to the store's manifest schema."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from vitscope.analysis.settings import AnalyzeSettings
from vitscope.store.manifest import new_run_manifest

if TYPE_CHECKING:  # pragma: no cover
    from vitscope.data import ImageSet
    from vitscope.models.vit import ViT


def check_labels(image_set: "ImageSet", vit: "ViT") -> None:
    """Refuse labels outside the model's classes (they would index past its logits)."""
    n = int(vit.num_classes or 0)
    for rec in image_set.records:
        if rec.label is not None and not 0 <= rec.label < n:
            raise ValueError(
                f"image {rec.location} has label {rec.label}, but {vit.name} has {n} classes (0..{n - 1}); "
                "check that the labels file uses the model's class indices"
            )


def _file_size(path: Path) -> Optional[int]:
    try:
        return path.stat().st_size
    except OSError:
        return None


def run_manifest(
    vit: "ViT",
    image_set: "ImageSet",
    settings: AnalyzeSettings,
    *,
    source: Any,
    labels: Any,
    limit: Optional[int],
    command: Optional[str],
) -> dict[str, Any]:
    """The manifest of a run of ``vit`` over ``image_set`` with ``settings``, starting now."""
    records = [
        {"image_id": r.image_id, "path": str(r.path), "label": r.label, "size": _file_size(Path(r.path)),
         **({"member": r.member} if r.member is not None else {})}
        for r in image_set.records
    ]
    state_sha = vit.state_sha256()
    model = {
        "spec": vit.spec,
        "name": vit.name,
        "library": vit.library,
        "weights_sha256": vit.weights_sha256,
        "state_sha256": state_sha,
        "dtype": str(vit.dtype).removeprefix("torch."),
        "device_type": vit.device.type,
        "weights": getattr(vit, "weights_path", None),
        "num_layers": vit.num_layers,
        "num_heads": vit.num_heads,
        "num_classes": vit.num_classes,
        "layout": vit.layout.to_dict(),
        "preprocessing": vit.preprocessing.to_dict(),
        "class_names": vit.class_names,
    }
    images = {
        "source": str(source) if not isinstance(source, (list, tuple)) else f"{len(source)} files",
        "labels": str(labels) if isinstance(labels, (str, Path)) else (None if labels is None else "given in the call"),
        "limit": limit,
        "count": len(records),
        "class_names": image_set.class_names,
        "records": records,
    }
    return new_run_manifest(
        model=model,
        images=images,
        settings={**settings.to_dict(), "device": vit.device.type},
        # The loaded weights themselves (not only a file's hash, absent for hub ids and in-memory
        # modules), their dtype and the device type decide every number.
        model_identity={"spec": vit.spec, "weights_sha256": vit.weights_sha256, "state_sha256": state_sha,
                        "dtype": model["dtype"], "device_type": model["device_type"]},
        chunk_size=settings.batch_size,
        n_chunks=math.ceil(len(records) / settings.batch_size),
        command=command,
    )

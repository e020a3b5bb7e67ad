"""Weight files (vitscope.models.weights): the self-describing safetensors format, read and written
in one module, and the errors a user sees for files that are not vitscope's."""

from __future__ import annotations

import json

import pytest
import timm
import torch

import vitscope
from vitscope.models.errors import ModelLoadError
from vitscope.models.weights import (
    META_ARCH,
    META_CLASSES,
    WeightsMetadata,
    file_sha256,
    read_state_dict,
    read_weights_metadata,
    write_weights,
)

ARGS = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "num_classes": 3}
ARCH = "vit_tiny_patch16_224"


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(ARCH, pretrained=False, **ARGS).eval()


def test_round_trip_keeps_metadata_and_weights(tmp_path):
    model = _model()
    cfg = {"input_size": [3, 32, 32], "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
    meta = WeightsMetadata(arch=ARCH, model_args=ARGS, pretrained_cfg=cfg, class_names=["a", "b", "c"], extra={"run": "x1"})
    path = write_weights(model, tmp_path / "m.safetensors", meta)
    assert read_weights_metadata(path) == meta
    # The raw header uses the documented keys (other tools read them without vitscope).
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        raw = f.metadata()
    assert raw[META_ARCH] == ARCH and json.loads(raw[META_CLASSES]) == ["a", "b", "c"] and raw["run"] == "x1"
    state = read_state_dict(path)
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    # load_model rebuilds the same network from the file alone.
    vit = vitscope.load_model(str(path), device="cpu")
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(vit.module(x), model(x), rtol=0, atol=0)
    assert vit.class_names == ["a", "b", "c"] and vit.weights_sha256 == file_sha256(path)


def test_nested_pth_checkpoints_are_unwrapped(tmp_path):
    model = _model()
    for key in ("state_dict", "model", "model_ema"):
        path = tmp_path / f"{key}.pth"
        torch.save({key: {f"module.{k}": v for k, v in model.state_dict().items()}, "epoch": 3}, path)
        state = read_state_dict(path)
        assert state.keys() == model.state_dict().keys()


def test_files_that_are_not_vitscope_weights_get_clear_errors(tmp_path):
    from safetensors.torch import save_file

    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    with pytest.raises(ModelLoadError, match="no vitscope architecture metadata.*load_model"):
        read_weights_metadata(plain)
    with pytest.raises(ModelLoadError, match="does not say which architecture"):
        read_weights_metadata(tmp_path / "m.pth")
    truncated = tmp_path / "cut.safetensors"
    write_weights(_model(), truncated, WeightsMetadata(arch=ARCH, model_args=ARGS))
    truncated.write_bytes(truncated.read_bytes()[:5])
    with pytest.raises(ModelLoadError, match="cut.safetensors.*complete"):
        read_weights_metadata(truncated)
    with pytest.raises(ModelLoadError, match="does not exist"):
        read_state_dict(tmp_path / "missing.safetensors")
    with pytest.raises(ModelLoadError, match="must end in .safetensors"):
        write_weights(_model(), tmp_path / "m.bin", WeightsMetadata(arch=ARCH))

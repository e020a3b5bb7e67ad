"""Half-precision attention streams (``--dtype bfloat16|float16``) against float32 on DeiT-Tiny and
real photos, within the tolerances docs/precision.md states; the pruning measures are untouched.
And the same batch on CUDA (where present) against the CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vitscope.pipeline.batch import analyze_batch

#: quantity -> (bfloat16, float16) largest absolute difference allowed (docs/precision.md)
TOLERANCE = {
    "entropy": (2e-2, 5e-3),
    "cls_self": (3e-2, 5e-3),
    "cls_to_patch": (3e-2, 5e-3),
    "patch_to_cls": (2e-2, 3e-3),
    "mean_distance": (1.5, 0.4),  # pixels, of about 30-110
    "hop_profile": (3e-3, 5e-4),
}
EXACT = ("pruned_prob", "pruned_loss", "pruned_correct", "layer_change", "layer_rel_l2", "taylor")


@pytest.fixture(scope="module")
def batch(deit_tiny, imagenet_images):
    paths, labels = imagenet_images
    x = deit_tiny.preprocess(paths[:8])
    y = torch.tensor(labels[:8])
    return x, y, analyze_batch(deit_tiny, x, y, list(range(8)))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_stream_within_stated_tolerances(deit_tiny, batch, dtype):
    x, y, ref = batch
    got = analyze_batch(deit_tiny, x, y, list(range(8)), stream_dtype=dtype)
    col = 0 if dtype == "bfloat16" else 1
    for name, tol in TOLERANCE.items():
        if name == "hop_profile":
            diff = np.abs(np.stack(got.image_heads[name]) - np.stack(ref.image_heads[name])).max()
        else:
            diff = np.abs(got.image_heads[name].to_numpy() - ref.image_heads[name].to_numpy()).max()
        assert diff <= tol[col], (dtype, name, diff)
        assert diff > 0 or name == "hop_profile", (dtype, name)  # half precision did run
    mean_diff = np.abs(got.arrays["attention_sum"] - ref.arrays["attention_sum"]).max() / len(y)
    assert mean_diff <= (4e-2, 1e-2)[col], mean_diff  # the mean map over these 8 images
    for kind in ("offset", "patch", "cls"):
        a, b = got.arrays[f"pattern_inputs/{kind}"].astype(np.float64), ref.arrays[f"pattern_inputs/{kind}"].astype(np.float64)
        assert np.corrcoef(a.ravel(), b.ravel())[0, 1] >= 0.99, (dtype, kind)
    for name in EXACT:  # pruning and Taylor are float32 whatever the stream's precision
        assert np.array_equal(got.image_heads[name].to_numpy(), ref.image_heads[name].to_numpy()), name


def test_stream_dtype_setting_is_validated():
    from vitscope.analysis.settings import AnalyzeSettings

    with pytest.raises(ValueError, match="stream_dtype must be one of float32, bfloat16, float16"):
        AnalyzeSettings(stream_dtype="float64").validate()
    assert "stream_dtype" not in AnalyzeSettings().to_dict()  # float32 runs keep their old fingerprint


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (runs wherever one is present)")
def test_cuda_batch_equals_cpu(deit_tiny, batch):
    import copy

    x, y, ref = batch
    gpu = copy.deepcopy(deit_tiny).to("cuda")
    got = analyze_batch(gpu, x.cuda(), y.cuda(), list(range(8)))
    for name in ("pruned_prob", "layer_change", "entropy", "cls_to_patch"):
        np.testing.assert_allclose(got.image_heads[name].to_numpy(dtype=float), ref.image_heads[name].to_numpy(dtype=float), atol=1e-4, rtol=1e-3)
    half = analyze_batch(gpu, x.cuda(), y.cuda(), list(range(8)), stream_dtype="bfloat16")
    assert np.abs(half.image_heads["entropy"].to_numpy() - ref.image_heads["entropy"].to_numpy()).max() <= TOLERANCE["entropy"][0]

"""A preprocessed float tensor is a model input, never an image to preprocess again."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import vitscope


@pytest.fixture(scope="module")
def vit():
    return vitscope.load_model("fmnist_vit_tiny")


def test_one_preprocessed_image_equals_its_batch_and_the_timm_forward(vit):
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8))
    x = vit.preprocess(img)[0]  # (1, 28, 28), normalised
    assert x.shape == (1, 28, 28) and x.min() < 0
    with torch.no_grad():
        reference = vit.module(x[None])  # timm's own forward on the batch
    torch.testing.assert_close(vit.logits(x), reference, rtol=0, atol=1e-6)
    torch.testing.assert_close(vit.logits(x[None]), reference, rtol=0, atol=1e-6)
    torch.testing.assert_close(vit.logits([x, x]), torch.cat([reference, reference]), rtol=0, atol=1e-6)
    torch.testing.assert_close(vit.attention(x), vit.attention(x[None]), rtol=0, atol=0)


def test_images_are_still_preprocessed(vit):
    pixels = np.random.default_rng(1).integers(0, 256, (28, 28), dtype=np.uint8)
    expected = vit.preprocess(Image.fromarray(pixels))
    torch.testing.assert_close(vit.preprocess(torch.from_numpy(pixels[None])), expected)  # uint8 tensor: an image
    torch.testing.assert_close(vit.preprocess(pixels), expected)  # numpy array: an image


def test_float_tensor_of_the_wrong_shape_is_refused(vit):
    with pytest.raises(ValueError, match=r"preprocessed model input of shape \(1, H, W\).*\(28, 28, 3\).*uint8 tensor"):
        vit.logits(torch.rand(28, 28, 3))

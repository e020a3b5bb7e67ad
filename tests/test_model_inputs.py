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


def _pixels(seed: int, shape=(28, 28)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def test_every_pixel_form_means_the_same_image(vit):
    """One image given as PIL, numpy HW / HWC / CHW, float numpy in [0,1] and [0,255], uint8 tensor
    HW / CHW / HWC: the same model input as the PIL image through the model's own pipeline."""
    px = _pixels(2)
    expected = vit.preprocess(Image.fromarray(px))
    forms = {
        "numpy HW": px,
        "numpy HWC": px[:, :, None],
        "numpy CHW": px[None],
        "numpy float [0,255]": px.astype(np.float64),
        "numpy float [0,1]": px.astype(np.float64) / 255.0,
        "uint8 tensor HW": torch.from_numpy(px),
        "uint8 tensor CHW": torch.from_numpy(px[None]),
        "uint8 tensor HWC": torch.from_numpy(px[:, :, None]),
    }
    for name, form in forms.items():
        got = vit.preprocess(form)
        # [0,1] floats go through x * 255 and truncation, which can lose one grey level
        tol = 1.0 / 255 / 0.3530 + 1e-6 if "[0,1]" in name else 0.0
        torch.testing.assert_close(got, expected, rtol=0, atol=tol, msg=name)


def test_every_batch_form_is_preprocessed_image_by_image(vit):
    """Batches: a list of PIL images, a 4-d uint8 numpy array (B,H,W,C), a 4-d uint8 tensor
    (B,C,H,W) — each image preprocessed, never a cast of the pixels to float."""
    pxs = [_pixels(s) for s in (3, 4, 5)]
    expected = torch.cat([vit.preprocess(Image.fromarray(p)) for p in pxs])
    stack = np.stack(pxs)
    for name, form in {
        "list of PIL": [Image.fromarray(p) for p in pxs],
        "numpy BHWC uint8": stack[..., None],
        "uint8 tensor BCHW": torch.from_numpy(stack[:, None]),
        "uint8 tensor BHWC": torch.from_numpy(stack[..., None]),
        "list of uint8 tensors": [torch.from_numpy(p) for p in pxs],
    }.items():
        torch.testing.assert_close(vit.preprocess(form), expected, rtol=0, atol=0, msg=name)
    # the same batch through logits equals the model's forward on the preprocessed batch
    with torch.no_grad():
        reference = vit.module(expected)
    torch.testing.assert_close(vit.logits(torch.from_numpy(stack[:, None])), reference, rtol=0, atol=1e-6)


def test_ambiguous_float_arrays_and_batches_are_refused(vit):
    x = vit.preprocess(Image.fromarray(_pixels(6)))  # (1, 1, 28, 28), normalised: has negatives
    with pytest.raises(ValueError, match=r"values in \[0, 1\] or \[0, 255\].*float torch tensor"):
        vit.logits(x[0].numpy())  # a preprocessed input as numpy: not pixels
    with pytest.raises(ValueError, match=r"NaN or inf"):
        vit.preprocess(np.full((28, 28), np.nan))
    with pytest.raises(ValueError, match=r"preprocessed batch with C = 1.*\(2, 28, 28, 1\).*uint8"):
        vit.logits(torch.rand(2, 28, 28, 1))  # a float BHWC batch is not a model input

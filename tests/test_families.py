"""More ViT families, each checked against its own library: exact capture with the model's own
forward left fused, whole-head pruning against zeroing the head's context slice, and the layout.

Every model is a tiny random-weight instance built from the library's own classes and configs.
"""

from __future__ import annotations

import copy

import pytest
import torch

import vitscope
from vitscope.capture.runtime import AttentionRuntime, LayerPlan

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 5e-5


# --------------------------------------------------------------------------- runtime
def test_runtime_additive_bias_on_every_path():
    """A float bias joins the scores before the softmax: tracking, in-place and fused idle paths."""
    torch.manual_seed(0)
    B, H, T, D = 2, 3, 7, 4
    q, k, v = torch.randn(3, B, H, T, D).unbind(0)
    bias = torch.randn(1, H, T, T)
    allowed = torch.rand(T, T) > 0.3
    allowed[:, 0] = True
    rt = AttentionRuntime(1)
    scores = (q * 0.5) @ k.transpose(-2, -1) + bias
    want = scores.softmax(-1)
    seen = {}
    out = rt.attend(LayerPlan(on_attention=lambda l, a: seen.__setitem__("inplace", a)), 0, q, k, v, 0.5, bias=bias)
    assert (seen["inplace"] - want).abs().max() < 1e-6 and (out - want @ v).abs().max() < 1e-6
    qg = q.clone().requires_grad_(True)
    rt.attend(LayerPlan(on_attention=lambda l, a: seen.__setitem__("tracking", a)), 0, qg, k, v, 0.5, bias=bias)
    assert (seen["tracking"] - want).abs().max() < 1e-6
    gated = want @ v
    gated[:, 1] = 0
    assert (rt.attend(LayerPlan(head_gate=torch.tensor([[1.0, 0.0, 1.0]])), 0, q, k, v, 0.5, bias=bias) - gated).abs().max() < 1e-6
    masked = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    assert (rt.attend(LayerPlan(allowed=allowed), 0, q, k, v, 0.5, bias=bias) - masked @ v).abs().max() < 1e-6
    rt.attend(LayerPlan(allowed=allowed, on_attention=lambda l, a: seen.__setitem__("both", a)), 0, q, k, v, 0.5, bias=bias)
    assert (seen["both"] - masked).abs().max() < 1e-6
    # no bias: the in-place path is bit-identical to before (one GEMM, one softmax)
    rt.attend(LayerPlan(on_attention=lambda l, a: seen.__setitem__("plain", a)), 0, q, k, v, 0.5)
    assert torch.equal(seen["plain"], torch.softmax(torch.baddbmm(torch.empty(B * H, T, T), q.reshape(-1, T, D), k.reshape(-1, T, D).transpose(1, 2), beta=0.0, alpha=0.5), -1).view(B, H, T, T))

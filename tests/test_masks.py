"""Partial-pruning regions on every token layout, checked cell by cell against a construction
from each token's role (CLS, distillation, register, patch) written here."""

from __future__ import annotations

import itertools

import pytest
import torch

from vitscope.capture.masks import REGIONS, region_matrix, regions_for
from vitscope.core.layout import TokenLayout

LAYOUTS = {
    "vit (CLS)": TokenLayout(1, 0, None, (), (3, 3), (16, 16)),
    "deit distilled (CLS, dist)": TokenLayout(2, 0, 1, (), (3, 3), (16, 16)),
    "dinov2 registers (CLS, 4 registers)": TokenLayout(5, 0, None, (1, 2, 3, 4), (2, 3), (14, 14)),
    "siglip (no prefix)": TokenLayout(0, None, None, (), (3, 3), (16, 16)),
    "no CLS, registers": TokenLayout(2, None, None, (0, 1), (2, 2), (16, 16)),
}


def _role(layout: TokenLayout, t: int) -> str:
    if t == layout.cls_index:
        return "cls"
    if t == layout.dist_index:
        return "dist"
    if t in layout.register_indices:
        return "register"
    assert t >= layout.num_prefix
    return "patch"


def _expected(region: str, layout: TokenLayout) -> torch.Tensor:
    """The region from the roles of each cell's query and key, one cell at a time."""
    T = layout.num_tokens
    m = torch.zeros(T, T, dtype=torch.bool)
    for q, k in itertools.product(range(T), range(T)):
        rq, rk = _role(layout, q), _role(layout, k)
        m[q, k] = {
            "all": True,
            "cls": rq == "cls" or rk == "cls",
            "patch": rq == "patch" and rk == "patch",
            "cls_cross": (rq == "cls") != (rk == "cls"),
            "cls_self": rq == "cls" and rk == "cls",
        }[region]
    return m


@pytest.mark.parametrize("name", LAYOUTS)
def test_regions_are_the_cells_their_definition_names(name):
    layout = LAYOUTS[name]
    have = regions_for(layout)
    assert have == (REGIONS if layout.cls_index is not None else ("all", "patch"))
    for region in have:
        assert torch.equal(region_matrix(region, layout), _expected(region, layout)), (name, region)


def test_prefix_tokens_other_than_cls_are_pruned_only_by_all():
    layout = LAYOUTS["dinov2 registers (CLS, 4 registers)"]
    reg = list(layout.register_indices)
    for region in ("patch", "cls_cross", "cls_self"):
        m = region_matrix(region, layout)
        # a register's row and column outside the CLS cells stay untouched
        assert not m[reg][:, [t for t in range(layout.num_tokens) if t != 0]].any(), region
    assert region_matrix("cls", layout)[reg, 0].all() and region_matrix("cls", layout)[0, reg].all()


def test_cls_regions_on_a_model_without_cls_say_which_exist():
    with pytest.raises(ValueError, match="needs a CLS token.*'all', 'patch'"):
        region_matrix("cls_cross", LAYOUTS["siglip (no prefix)"])


def test_partial_pruning_on_a_model_without_cls_has_modes_1_2_4():
    """A SigLIP-like model (no prefix token, mean pooling): the modes that exist, numbered as in the
    paper, each equal to the masked forward of its region."""
    from timm.models.vision_transformer import VisionTransformer

    import vitscope

    torch.manual_seed(0)
    model = VisionTransformer(img_size=32, patch_size=8, num_classes=4, embed_dim=32, depth=2, num_heads=2, class_token=False, global_pool="avg")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    vit = vitscope.load_model(model.eval(), device="cpu")
    assert vit.layout.cls_index is None
    x = torch.randn(1, 3, 32, 32)
    df = vitscope.partial_pruning(vit, x, 1, 0, label=2)
    assert list(df["mode"]) == [1, 2, 4] and list(df["region"]) == ["none", "all", "patch"]
    for row in df.itertuples():
        masks = None if row.region == "none" else {(1, 0): row.region}
        want = float(vit.logits(x, masks=masks).double().softmax(-1)[0, 2])
        assert abs(row.label_prob - want) <= 1e-6, row.region

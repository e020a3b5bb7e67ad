"""The core's geometry against direct loops."""

from __future__ import annotations

import numpy as np

from vitscope.core.layout import TokenLayout


def test_patch_grid_is_row_major_and_matches_patch_positions():
    lay = TokenLayout(1, 0, None, (), (3, 5), (4, 4))
    want = np.array([(r, c) for r in range(3) for c in range(5)])
    np.testing.assert_array_equal(lay.patch_grid(), want)
    np.testing.assert_array_equal(lay.patch_positions().numpy(), want)
    assert lay.num_patches == 15 and lay.num_tokens == 16 and lay.patch_slice == slice(1, 16)


def test_layout_round_trips_through_the_manifest_form():
    lay = TokenLayout(4, 0, None, (1, 2, 3), (16, 16), (14, 14))
    d = lay.to_dict()
    assert d == {"num_prefix": 4, "cls_index": 0, "dist_index": None, "register_indices": [1, 2, 3],
                 "grid": [16, 16], "patch_size": [14, 14], "num_tokens": 260}
    assert TokenLayout.from_dict(d) == lay

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

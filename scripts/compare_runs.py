"""Compare every table and array of two runs made by the same command (before/after a refactor)."""
import sys, numpy as np, pandas as pd
import vitscope
a, b = vitscope.open_run(sys.argv[1]), vitscope.open_run(sys.argv[2])
from pathlib import Path
bad = 0
for p in sorted(Path(sys.argv[1]).glob("*.parquet")):
    x = pd.read_parquet(p); y = pd.read_parquet(Path(sys.argv[2]) / p.name)
    if "path" in x: pass
    try:
        pd.testing.assert_frame_equal(x, y, check_exact=False, rtol=1e-6, atol=1e-9)
        print("equal", p.name, x.shape)
    except AssertionError as e:
        bad += 1; print("DIFF", p.name, str(e)[:300])
import zarr
za, zb = zarr.open_group(str(Path(sys.argv[1]) / "arrays.zarr"), mode="r"), zarr.open_group(str(Path(sys.argv[2]) / "arrays.zarr"), mode="r")
def walk(g, pre=""):
    for k, v in g.members():
        if isinstance(v, zarr.Group): yield from walk(v, pre + k + "/")
        else: yield pre + k
for name in sorted(walk(za)):
    x, y = np.asarray(za[name][...]), np.asarray(zb[name][...])
    ok = x.shape == y.shape and np.allclose(x, y, rtol=1e-6, atol=1e-9, equal_nan=True)
    bad += not ok
    print("equal" if ok else "DIFF", name, x.shape, "bit-equal" if ok and np.array_equal(x, y, equal_nan=True) else "")
print("differences:", bad)

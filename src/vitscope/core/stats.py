"""Statistics every analysis shares: streaming means and variances (Welford / Chan), one-sample
t-tests from summary statistics (with the sign test where a cell did not vary), Benjamini-Hochberg
false-discovery control and the paired percentile bootstrap of column means.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np


class Welford:
    """Streaming mean and variance of arrays of a fixed ``shape`` (float64), one sample per image.

    Batches are folded in with Chan et al.'s parallel update, which is exact in exact arithmetic
    and numerically stable (no sum-of-squares cancellation). Two accumulators over disjoint image
    sets can be combined with :meth:`merge`; :meth:`state` / :meth:`from_state` round-trip through
    plain numpy arrays so a driver can store partial results and resume.
    """

    def __init__(self, shape: Sequence[int]) -> None:
        self.shape = tuple(int(s) for s in shape)
        self.count = 0
        self.mean = np.zeros(self.shape, dtype=np.float64)
        self.m2 = np.zeros(self.shape, dtype=np.float64)

    def update(self, values: Any) -> "Welford":
        """Add ``values`` of shape ``(N, *shape)`` (``N`` new samples)."""
        v = np.asarray(values)
        if v.shape[1:] != self.shape:
            raise ValueError(f"expected samples of shape (N, {', '.join(map(str, self.shape))}), got {v.shape}")
        n_b = v.shape[0]
        if n_b == 0:
            return self
        if self.shape:
            # Slice along the first axis so the float64 copy stays small.
            mean_b = np.empty(self.shape)
            m2_b = np.empty(self.shape)
            for i in range(self.shape[0]):
                s = v[:, i].astype(np.float64)
                mean_b[i] = s.mean(axis=0)
                m2_b[i] = ((s - mean_b[i]) ** 2).sum(axis=0)
        else:
            s = v.astype(np.float64)
            mean_b, m2_b = s.mean(axis=0), ((s - s.mean(axis=0)) ** 2).sum(axis=0)
        self._combine(n_b, mean_b, m2_b)
        return self

    def _combine(self, n_b: int, mean_b: np.ndarray, m2_b: np.ndarray) -> None:
        n_a = self.count
        n = n_a + n_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n_b / n)
        self.m2 = self.m2 + m2_b + delta**2 * (n_a * n_b / n)
        self.count = n

    def merge(self, other: "Welford") -> "Welford":
        """Fold in another accumulator of the same shape (disjoint samples)."""
        if other.shape != self.shape:
            raise ValueError(f"cannot merge accumulators of shapes {self.shape} and {other.shape}")
        if other.count:
            self._combine(other.count, other.mean, other.m2)
        return self

    @property
    def var(self) -> np.ndarray:
        """Sample variance (``ddof=1``); NaN with fewer than 2 samples."""
        if self.count < 2:
            return np.full(self.shape, np.nan)
        return self.m2 / (self.count - 1)

    @property
    def std(self) -> np.ndarray:
        return np.sqrt(self.var)

    @property
    def sem(self) -> np.ndarray:
        """Standard error of the mean, ``std / sqrt(n)``."""
        return self.std / np.sqrt(max(self.count, 1))

    def state(self) -> dict[str, np.ndarray]:
        return {"count": np.asarray(self.count, dtype=np.int64), "mean": self.mean.copy(), "m2": self.m2.copy()}

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> "Welford":
        mean = np.asarray(state["mean"], dtype=np.float64)
        w = cls(mean.shape)
        w.count = int(np.asarray(state["count"]))
        w.mean = mean.copy()
        w.m2 = np.asarray(state["m2"], dtype=np.float64).copy()
        return w




def ttest_pvalues(mean: np.ndarray, sem: np.ndarray, n: int, alternative: str = "greater") -> tuple[np.ndarray, np.ndarray]:
    """One-sample t-test of ``mean = 0`` from summary statistics: returns ``(t, p)``.

    ``alternative``: ``"greater"`` (mean > 0, the default for responsive fields), ``"less"`` or
    ``"two-sided"``. ``t = mean / sem`` with ``n - 1`` degrees of freedom. With ``n < 2``, ``t`` is
    NaN and every p-value is 1 (no evidence).

    Zero spread (every image gave the same impact, ``sem <= 1e-12 |mean|``): the t-test is
    undefined there (``t`` is reported as +-inf), and treating it as ``p = 0`` would make one
    constant edge beat any real evidence. Such a cell gets the exact sign test instead: all ``n``
    impacts share one sign, so ``p = 2**-n`` when that sign is the tested one (``2 * 2**-n``
    two-sided) and 1 otherwise; a cell that is exactly 0 everywhere gets ``p = 1``.
    :func:`zero_spread` tells these cells apart.
    """
    from scipy import stats

    mean = np.asarray(mean, dtype=np.float64)
    sem = np.asarray(sem, dtype=np.float64)
    if alternative not in ("greater", "less", "two-sided"):
        raise ValueError(f"alternative must be 'greater', 'less' or 'two-sided', got {alternative!r}")
    if n < 2:
        return np.full(mean.shape, np.nan), np.ones(mean.shape)
    flat = zero_spread(mean, sem)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = mean / sem
    t = np.where(flat, np.where(mean > 0, np.inf, np.where(mean < 0, -np.inf, 0.0)), t)
    dist = stats.t(df=n - 1)
    if alternative == "greater":
        p = dist.sf(t)
    elif alternative == "less":
        p = dist.cdf(t)
    else:
        p = 2 * dist.sf(np.abs(t))
    sign_p = 0.5 ** float(n) * (2.0 if alternative == "two-sided" else 1.0)
    tested_way = {"greater": mean > 0, "less": mean < 0, "two-sided": mean != 0}[alternative]
    p = np.where(flat, np.where(tested_way, sign_p, 1.0), p)
    return t, np.clip(p, 0.0, 1.0)


def zero_spread(mean: np.ndarray, sem: np.ndarray) -> np.ndarray:
    """Cells whose impacts did not vary over the images (``sem <= 1e-12 |mean|``, exact zeros
    included): :func:`ttest_pvalues` gives them the sign test, not the t-test."""
    mean = np.asarray(mean, dtype=np.float64)
    sem = np.asarray(sem, dtype=np.float64)
    return ~(sem > 1e-12 * np.abs(mean))


def benjamini_hochberg(p: np.ndarray, q: float = 0.05, axis: int = -1) -> tuple[np.ndarray, np.ndarray]:
    """Benjamini-Hochberg FDR control along ``axis``: returns ``(adjusted p-values, rejected)``.

    Adjusted p-values come from :func:`scipy.stats.false_discovery_control` (``method="bh"``); a
    hypothesis is rejected when its adjusted p-value is at most ``q``, which is exactly the BH
    step-up rule (reject the ``k`` smallest p-values, ``k`` the largest rank with
    ``p_(k) <= k q / m``).
    """
    from scipy import stats

    if not 0 < q < 1:
        raise ValueError(f"q (the false discovery rate) must be between 0 and 1, got {q}")
    p = np.asarray(p, dtype=np.float64)
    if np.isnan(p).any() or (p < 0).any() or (p > 1).any():
        raise ValueError("p-values must lie in [0, 1] and contain no NaN")
    adjusted = stats.false_discovery_control(p, axis=axis, method="bh")
    return adjusted, adjusted <= q


def bootstrap_means(values: np.ndarray, *, n_boot: int = 1000, seed: int = 0, ci: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Percentile-bootstrap interval of the column means of ``values (N, K)``, resampling rows.

    Resample ``r`` draws ``rng.integers(0, N, size=N)`` from ``numpy.random.default_rng(seed)``,
    in order, and every column uses the same resamples (so intervals of different heads and
    metrics are paired). Vectorised: each resample becomes a row of counts and all means are one
    matrix product. Returns ``(lo, hi)``, each ``(K,)``.
    """
    values = np.asarray(values, dtype=np.float64)
    N = values.shape[0]
    rng = np.random.default_rng(seed)
    boot = np.empty((n_boot, values.shape[1]))
    rows = max(1, min(n_boot, 4_000_000 // max(N, 1)))  # bound the counts matrix to ~32 MB
    for start in range(0, n_boot, rows):
        stop = min(n_boot, start + rows)
        counts = np.stack([np.bincount(rng.integers(0, N, size=N), minlength=N) for _ in range(start, stop)])
        boot[start:stop] = counts @ values / N
    alpha = (1.0 - ci) / 2.0
    lo, hi = np.percentile(boot, [100 * alpha, 100 * (1 - alpha)], axis=0)
    return lo, hi

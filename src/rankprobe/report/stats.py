"""Seed statistics for the report: Student-t quantiles and 95% intervals, in plain numpy (no scipy)."""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np


def _t_cdf(x: float, df: float) -> float:
    """Student-t CDF for x >= 0 by Simpson's rule on the density (smooth, so 4000 panels suffice)."""
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    n = 4000
    ts = np.linspace(0.0, x, n + 1)
    f = c * (1 + ts * ts / df) ** (-(df + 1) / 2)
    integral = (x / n / 3) * (f[0] + f[-1] + 4 * f[1:-1:2].sum() + 2 * f[2:-1:2].sum())
    return 0.5 + integral


@lru_cache(maxsize=None)
def t_quantile(df: int, p: float = 0.975) -> float:
    """Quantile of Student's t with `df` degrees of freedom (p > 0.5), by bisection on the CDF."""
    if df < 1:
        raise ValueError(f"t quantile needs df >= 1; got {df}")
    lo, hi = 0.0, 1.0
    while _t_cdf(hi, df) < p:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _t_cdf(mid, df) < p else (lo, mid)
    return (lo + hi) / 2


def mean_ci(values, axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Mean over `axis` and the 95% half-width t_{0.975,n-1}·sd/√n (NaN when n < 2: no band)."""
    x = np.asarray(values, dtype=float)
    n = x.shape[axis]
    mean = x.mean(axis=axis)
    if n < 2:
        return mean, np.full_like(mean, np.nan)
    sd = x.std(axis=axis, ddof=1)
    return mean, t_quantile(n - 1) * sd / math.sqrt(n)

"""Seed statistics for the report: 95% Student-t intervals over seeds and Spearman's rank correlation,
both from scipy.stats; `Estimate` is the (mean, half-width, seeds) every table cell is printed from."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy import stats


@lru_cache(maxsize=None)
def t_quantile(df: int, p: float = 0.975) -> float:
    """Quantile of Student's t with `df` degrees of freedom."""
    if df < 1:
        raise ValueError(f"t quantile needs df >= 1; got {df}")
    return float(stats.t.ppf(p, df))


def mean_ci(values, axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Mean over `axis` and the 95% half-width t_{0.975,n-1}·sd/√n (NaN when n < 2: no band)."""
    x = np.asarray(values, dtype=float)
    n = x.shape[axis]
    mean = x.mean(axis=axis)
    if n < 2:
        return mean, np.full_like(mean, np.nan)
    return mean, t_quantile(n - 1) * x.std(axis=axis, ddof=1) / math.sqrt(n)


@dataclass
class Estimate:
    """A seed mean with its 95% t half-width (NaN with one seed) over `n` seeds."""

    mean: float
    half: float
    n: int


def estimate(values) -> Estimate:
    """The Estimate of a 1-D array of per-seed values."""
    values = np.asarray(values, dtype=float)
    mean, half = mean_ci(values)
    return Estimate(float(mean), float(half), int(values.size))


def spearman(x, y) -> float:
    """Spearman's rank correlation (ties share their average rank); NaN when either side is constant."""
    with warnings.catch_warnings():  # a constant input is answered with NaN, which the report says in words
        warnings.simplefilter("ignore", stats.ConstantInputWarning)
        return float(stats.spearmanr(x, y).statistic)

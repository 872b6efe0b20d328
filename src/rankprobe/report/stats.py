"""Seed statistics for the report: 95% Student-t intervals over seeds and Spearman's rank correlation,
both from scipy.stats; `Estimate` is the (mean, half-width, seeds) every table cell is printed from.

A difference is called resolved only when the two 95% t-intervals over seeds do not overlap (a
conservative check, stricter than a two-sample test); with one seed there is no interval and only point
values are reported (docs/metrics.md, "Headline numbers")."""

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


NO_VALUE = Estimate(math.nan, math.nan, 0)
"""a cell whose rows are absent: printed 'n/a'"""


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


def resolution(a: Estimate, b: Estimate) -> str:
    """'single seed' when either side has no interval, 'resolved' when the 95% intervals do not
    overlap, 'not resolved' otherwise."""
    if a.n < 2 or b.n < 2 or not (math.isfinite(a.half) and math.isfinite(b.half)):
        return "single seed"
    return "resolved" if abs(a.mean - b.mean) > a.half + b.half else "not resolved"


def resolved_above(a: Estimate, b: Estimate) -> bool:
    """Whether `a` is higher than `b` with non-overlapping 95% intervals."""
    return resolution(a, b) == "resolved" and a.mean > b.mean


def verdict(a: Estimate, b: Estimate, higher: str = "higher", lower: str = "lower") -> str:
    """How `a` stands against `b`, in words that never claim more than the intervals support."""
    status, word = resolution(a, b), higher if a.mean > b.mean else lower
    seeds = f"{a.n} seeds" if a.n == b.n else f"{a.n} and {b.n} seeds"
    if status == "single seed":
        return f"{word} on a single seed (no interval, point values only)"
    if status == "not resolved":
        return f"not resolved with {seeds} (the 95% intervals overlap)"
    return f"{word}, resolved (the 95% intervals do not overlap; {seeds})"

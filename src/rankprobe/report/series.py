"""Seed aggregation and its statistics: every number and figure of the report is drawn from an
`ArmSeries`, and every section walks the arms of one `Study`.

An `ArmSeries` is one quantity of one arm at the token counts every seed logged, as values[seed,
checkpoint, layer]: a spectral metric of the `probe` rows (`arm_pr`, with its isotropic null and
per-head values), a lens of the `attn` / `weights` rows, or a per-run scalar of the `train` / `eval`
rows (one "layer"). A checkpoint's layers reduce to one number per seed by the mean (entropies, ranks,
losses) or the max (logits, spectral norms: the largest layer is what can blow up), skipping layers
without a value. Runs written before a row kind existed have no series for it.

Seed values become an `Estimate`: the mean with its 95% Student-t half-width (scipy.stats), which every
table cell is printed from. A difference is called resolved only when the two 95% t-intervals over
seeds do not overlap (a conservative check, stricter than a two-sample test); with one seed there is
no interval and only point values are reported (docs/metrics.md, "Headline numbers").
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from functools import cached_property, lru_cache

import numpy as np
from scipy import stats

from rankprobe.config import UserError
from rankprobe.report.metrics import (
    METRIC_NAME, METRICS, Run, _num, default_tap, finished_by_arm, layer_rows, null_value,
)


# ---------------------------------------------------------------------------------------------
# seed statistics


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


# ---------------------------------------------------------------------------------------------
# seed aggregation


MAX_OVER_LAYERS = frozenset({"max_logit", "spectral_norm"})
"""the keys whose layers reduce by the max (see the module's docstring); every other key by the mean"""


def _finite_reduce(x: np.ndarray, axis, how: str = "mean") -> np.ndarray:
    """Mean or max over `axis` of the finite entries; NaN (without a warning) where there are none."""
    ok = np.isfinite(x)
    with np.errstate(invalid="ignore", divide="ignore"):
        if how == "max":
            return np.where(ok.any(axis=axis), np.where(ok, x, -np.inf).max(axis=axis), np.nan)
        return np.where(ok, x, 0.0).sum(axis=axis) / ok.sum(axis=axis)


@dataclass
class ArmSeries:
    """One quantity of one arm at the checkpoints every seed has: values[seed, checkpoint, layer]."""

    arm: str
    seeds: list[int]
    tokens: np.ndarray
    values: np.ndarray
    reduce: str = "mean"
    """how a checkpoint's layers become one number: 'mean' or 'max'"""
    reference: bool = False
    metric: str = ""
    """the spectral metric of a `probe` series ('pr', 'erank', ...); '' for lenses and losses"""
    null: np.ndarray | None = None
    """(C,) isotropic null of the metric for the probe set: mean over seeds and layers (NaN if unknown)"""
    n_probe: np.ndarray | None = None
    """(C,) probe tokens N the statistics (and the null) are for"""
    heads: np.ndarray | None = None
    """(S, L, H) per-head values at the final checkpoint; None when the rows lack `<metric>_heads`"""

    @property
    def n_seeds(self) -> int:
        return len(self.seeds)

    def per_seed(self) -> np.ndarray:
        """(S, C): each seed's layers reduced to one number per checkpoint."""
        return _finite_reduce(self.values, 2, self.reduce)

    def trajectory(self) -> tuple[np.ndarray, np.ndarray]:
        """Seed mean (C,) and 95% half-width (C,) of the per-seed values."""
        return mean_ci(self.per_seed(), axis=0)

    def at(self, index: int = -1) -> Estimate:
        """The per-seed value at checkpoint `index` (default the final one) as an Estimate."""
        return estimate(self.per_seed()[:, index])

    def at_tokens(self, tokens: int) -> Estimate:
        """The Estimate at the checkpoint of `tokens` (which the series must have)."""
        return self.at(int(np.flatnonzero(self.tokens == tokens)[0]))

    def layers_at(self, index: int = -1) -> tuple[np.ndarray, np.ndarray]:
        """Value per layer at checkpoint `index` (default the final one): seed mean and half-width (L,)."""
        return mean_ci(self.values[:, index, :], axis=0)


def final(s: ArmSeries | None) -> Estimate:
    """The Estimate at the final checkpoint of `s`; NO_VALUE (printed 'n/a') where there is no series."""
    return NO_VALUE if s is None else s.at(-1)


def _stack(runs: list[Run], kind: str, match: dict) -> tuple[list[list[list[dict]]], np.ndarray]:
    """The one stacking path: rows[seed][checkpoint][layer] at the token counts every run has, and those
    counts. `train` and `eval` rows are one row per token count (a later row for the same count wins)."""
    if kind in ("train", "eval"):
        tables = [{int(r["tokens"]): [r] for r in run.rows.get(kind, [])} for run in runs]
    else:
        tables = [layer_rows(run, kind, **match) for run in runs]
    common = sorted(set.intersection(*(set(t) for t in tables))) if tables else []
    return [[t[c] for c in common] for t in tables], np.array(common)


def _grid(rows: list[list[list[dict]]], value) -> np.ndarray:
    """(S, C, L) of `value(row)` (or of row[value], for a key) over rows[seed][checkpoint][layer]."""
    get = value if callable(value) else (lambda r: _num(r.get(value)))
    return np.array([[[get(r) for r in ckpt] for ckpt in seed] for seed in rows], dtype=float)


def _has(rows: list[list[list[dict]]], key: str) -> bool:
    return any(key in r for seed in rows for ckpt in seed for r in ckpt)


def arm_series(runs: list[Run], kind: str, key: str, reduce: str | None = None, **match) -> ArmSeries | None:
    """`key` of one arm's `kind` rows matching `match` (e.g. matrix="k"), its layers reduced by `reduce`
    (default: by the key, MAX_OVER_LAYERS); None when the runs have no such rows at a checkpoint common
    to all of them."""
    rows, tokens = _stack(runs, kind, match)
    if not tokens.size or not _has(rows, key):
        return None
    reduce = reduce or ("max" if key in MAX_OVER_LAYERS else "mean")
    return ArmSeries(runs[0].arm, [r.seed for r in runs], tokens, _grid(rows, key), reduce, runs[0].reference)


def _stack_heads(rows: list[list[dict]], key: str) -> np.ndarray | None:
    """rows[seed][layer] -> (S, L, H) of the list `key`; None if missing or ragged."""
    lists = [[r.get(key) for r in seed] for seed in rows]
    if any(not isinstance(v, list) or not v for seed in lists for v in seed):
        return None
    if len({len(v) for seed in lists for v in seed}) != 1:
        return None
    return np.array([[[_num(x) for x in v] for v in seed] for seed in lists], dtype=float)


def arm_pr(runs: list[Run], tap: str, tensor: str = "k", metric: str = "pr") -> ArmSeries:
    """`metric` (PR by default) of one arm's `tensor` probes at `tap`, with its null, probe size and
    per-head values; a UserError naming what the rows do have when they lack it."""
    arm = runs[0].arm if runs else "?"
    rows, tokens = _stack(runs, "probe", {"tap": tap, "tensor": tensor})
    if not tokens.size:
        have = sorted({r.get("tap") for run in runs for r in run.rows.get("probe", []) if r.get("tensor") == tensor})
        raise UserError(f"arm {arm}: no {tensor} probe at tap {tap!r} common to all "
                        f"seeds (taps with {tensor} probes: {', '.join(have) or 'none'})")
    if not _has(rows, metric):
        have = [m for m in METRICS if _has(rows, m)]
        raise UserError(f"arm {arm}: the probe rows have no {metric!r} (metrics written before the spectral "
                        f"lenses?); metrics available: {', '.join(have) or 'none'}")
    return ArmSeries(arm, [r.seed for r in runs], tokens, _grid(rows, metric), "mean", runs[0].reference, metric,
                     null=_finite_reduce(_grid(rows, lambda r: null_value(r, metric)), (0, 2)),
                     n_probe=_finite_reduce(_grid(rows, "n"), (0, 2)),
                     heads=_stack_heads([seed[-1] for seed in rows], f"{metric}_heads"))


TENSOR_NAME = {"k": "key", "q": "query", "v": "value"}


@dataclass
class Study:
    """The runs of one report, grouped once: trained arms and pretrained references in report order,
    the headline tap, tensor and metric, and each finished arm's series of that metric (`prs`)."""

    runs: list[Run]
    tap: str | None = None
    tensor: str = "k"
    metric: str | None = None
    arms: dict[str, list[Run]] = field(init=False)
    """finished trained runs by arm"""
    refs: dict[str, list[Run]] = field(init=False)
    """finished pretrained references by arm (`Run.reference`), drawn and tabulated, never pooled"""

    def __post_init__(self):
        self.metric = self.metric or "pr"
        if self.metric not in METRICS:
            raise UserError(f"unknown metric {self.metric!r}; choose one of {', '.join(METRICS)}")
        groups = finished_by_arm(self.runs)
        self.arms = {a: g for a, g in groups.items() if not g[0].reference}
        self.refs = {a: g for a, g in groups.items() if g[0].reference}
        lead = [r for g in (self.arms or self.refs).values() for r in g]  # trained runs decide, if any
        self.tap = self.tap or (default_tap(lead) if lead else "norm")
        self.head_dim = max((r.head_dim for r in lead), default=0)
        self.dead_pr = lead[0].dead_pr if lead else 10.0
        self.prs = {a: arm_pr(g, self.tap, self.tensor, self.metric) for a, g in groups.items()}

    @property
    def groups(self) -> dict[str, list[Run]]:
        """Every finished arm: trained ones, then references."""
        return {**self.arms, **self.refs}

    @cached_property
    def key_prs(self) -> dict[str, ArmSeries]:
        """Each trained arm's key PR at the headline tap, whatever tensor and metric the headline uses: the
        quantity of the mechanism questions and figures."""
        if (self.tensor, self.metric) == ("k", "pr"):
            return {a: self.prs[a] for a in self.arms}
        return {a: arm_pr(g, self.tap, "k", "pr") for a, g in self.arms.items()}

    @property
    def label(self) -> str:
        """'key PR', 'key erank', 'query stable rank', ..."""
        return f"{TENSOR_NAME.get(self.tensor, self.tensor)} {METRIC_NAME.get(self.metric, self.metric)}"

    def series(self, kind: str, key: str, trained: bool = False, **match) -> dict[str, ArmSeries]:
        """`arm_series` for every finished arm (only the trained ones if `trained`) that has the rows."""
        groups = self.arms if trained else self.groups
        found = {a: arm_series(g, kind, key, **match) for a, g in groups.items()}
        return {a: s for a, s in found.items() if s is not None}

    def headlines(self) -> list[Headline]:
        """The headline numbers of every finished arm as data (for callers that want numbers, not
        Markdown): trained arms, then pretrained references (`Headline.pr.reference`)."""
        return [headline(self.prs[a], g, self.dead_pr) for a, g in self.groups.items()]


@dataclass
class Headline:
    """An arm's numbers in the headline table for the study's metric, at its final common checkpoint
    (docs/metrics.md, last section); half-widths are NaN with one seed."""

    pr: ArmSeries
    mean: Estimate
    """the metric's mean over layers"""
    weakest_layer: int
    weakest: Estimate
    """the weakest layer of the seed-mean profile"""
    dead_layers: list[int] | None
    """layers whose seed-mean PR is below `probe.dead_pr`; None for other metrics (the threshold is a PR value)"""
    val_loss: Estimate
    null: float
    """the metric's isotropic null at the final checkpoint (NaN if the rows do not say)"""
    n_probe: int
    """the probe tokens N the null is for (0 if the rows do not say)"""

    @property
    def arm(self) -> str:
        return self.pr.arm


def headline(pr: ArmSeries, runs: list[Run], dead_pr: float) -> Headline:
    """Headline numbers at the arm's final common checkpoint: mean over layers, the weakest layer of the
    seed-mean profile, layers below `dead_pr` (PR only), and the last val loss."""
    layer_mean, layer_half = pr.layers_at(-1)
    weakest = int(np.nanargmin(layer_mean)) if np.isfinite(layer_mean).any() else 0
    n_probe = pr.n_probe[-1]
    return Headline(pr, pr.at(-1), weakest,
                    Estimate(float(layer_mean[weakest]), float(layer_half[weakest]), pr.n_seeds),
                    [int(i) for i in np.flatnonzero(layer_mean < dead_pr)] if pr.metric == "pr" else None,
                    estimate([r.final_val_loss() for r in runs]), float(pr.null[-1]),
                    int(n_probe) if math.isfinite(n_probe) else 0)

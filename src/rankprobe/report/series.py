"""Seed aggregation: every number and figure of the report is drawn from an `ArmSeries`.

An `ArmSeries` is one quantity of one arm at the token counts every seed logged, as values[seed,
checkpoint, layer]: a spectral metric of the `probe` rows (`arm_pr`, with its isotropic null and
per-head values), an attention or weight lens of the `attn` / `weights` rows, or a per-run scalar of
the `train` / `eval` rows (one "layer"). A checkpoint's layers reduce to one number per seed by the
mean (entropies, ranks, losses) or the max (logits, spectral norms: the largest layer is what can blow
up), skipping layers without a value; seed means carry 95% t half-widths (`stats`). Plain numpy:
runs written before a row kind existed have no series for it, and the report leaves it out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from rankprobe.config import UserError
from rankprobe.report.metrics import (
    METRICS, Run, _num, check_metric, default_tap, finished_by_arm, layer_rows, null_value, probe_taps,
)
from rankprobe.report.stats import Estimate, estimate, mean_ci


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

    def layers_at(self, index: int = -1) -> tuple[np.ndarray, np.ndarray]:
        """Value per layer at checkpoint `index` (default the final one): seed mean and half-width (L,)."""
        return mean_ci(self.values[:, index, :], axis=0)

    def seed_mean(self) -> np.ndarray:
        """Seed-mean values, (checkpoint, layer)."""
        return self.values.mean(axis=0)


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
    """(S, C, L) of `value(row)` over rows[seed][checkpoint][layer]."""
    return np.array([[[value(r) for r in ckpt] for ckpt in seed] for seed in rows], dtype=float)


def _has(rows: list[list[list[dict]]], key: str) -> bool:
    return any(key in r for seed in rows for ckpt in seed for r in ckpt)


def arm_series(runs: list[Run], kind: str, key: str, reduce: str = "mean", **match) -> ArmSeries | None:
    """`key` of one arm's `kind` rows matching `match` (e.g. matrix="k"); None when the runs have no such
    rows at a checkpoint common to all of them."""
    rows, tokens = _stack(runs, kind, match)
    if not tokens.size or not _has(rows, key):
        return None
    return ArmSeries(runs[0].arm, [r.seed for r in runs], tokens, _grid(rows, lambda r: _num(r.get(key))),
                     reduce, runs[0].reference)


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
        have = probe_taps(runs, tensor)
        raise UserError(f"arm {arm}: no {tensor} probe at tap {tap!r} common to all "
                        f"seeds (taps with {tensor} probes: {', '.join(have) or 'none'})")
    if not _has(rows, metric):
        have = [m for m in METRICS if _has(rows, m)]
        raise UserError(f"arm {arm}: the probe rows have no {metric!r} (metrics written before the spectral "
                        f"lenses?); metrics available: {', '.join(have) or 'none'}")
    return ArmSeries(arm, [r.seed for r in runs], tokens, _grid(rows, lambda r: _num(r.get(metric))),
                     "mean", runs[0].reference, metric,
                     null=_finite_reduce(_grid(rows, lambda r: null_value(r, metric)), (0, 2)),
                     n_probe=_finite_reduce(_grid(rows, lambda r: _num(r.get("n"))), (0, 2)),
                     heads=_stack_heads([seed[-1] for seed in rows], f"{metric}_heads"))


def aggregate(runs: list[Run], tap: str, tensor: str = "k", metric: str = "pr") -> dict[str, ArmSeries]:
    """`arm_pr` for every arm with finished runs, in report order (pretrained references last)."""
    return {arm: arm_pr(group, tap, tensor, metric) for arm, group in finished_by_arm(runs).items()}


def lens_series(runs: list[Run], kind: str, key: str, reduce: str = "mean", **match) -> dict[str, ArmSeries]:
    """`arm_series` for every finished arm that has the rows, in report order."""
    found = {arm: arm_series(group, kind, key, reduce, **match) for arm, group in finished_by_arm(runs).items()}
    return {arm: s for arm, s in found.items() if s is not None}


def has_rows(runs: list[Run], kind: str) -> bool:
    """Whether any finished run has rows of `kind`."""
    return any(r.finished and r.rows.get(kind) for r in runs)


# the columns of the report's lens tables: (title, kind, key, reduce over layers, row filter, digits)
ATTENTION_COLUMNS = [
    ("attention entropy (normalised, mean)", "attn", "entropy_norm", "mean", {}, 3),
    ("attention entropy (nats, mean)", "attn", "entropy", "mean", {}, 3),
    ("max logit (max over layers, heads)", "attn", "max_logit", "max", {}, 2),
]
WEIGHT_COLUMNS = [
    ("W_q stable rank (mean)", "weights", "stable_rank", "mean", {"matrix": "q"}, 2),
    ("W_k stable rank (mean)", "weights", "stable_rank", "mean", {"matrix": "k"}, 2),
    ("W_q spectral norm (max)", "weights", "spectral_norm", "max", {"matrix": "q"}, 3),
    ("W_k spectral norm (max)", "weights", "spectral_norm", "max", {"matrix": "k"}, 3),
]


@dataclass
class LensRow:
    """One arm's row of a lens table: an Estimate per column at the final common checkpoint."""

    arm: str
    n_seeds: int
    tokens: int
    reference: bool
    cells: list[Estimate]


def lens_table(runs: list[Run], columns: list[tuple]) -> list[LensRow]:
    """Per finished arm with any of the columns' rows (report order), the columns' final values."""
    out = []
    for arm, group in finished_by_arm(runs).items():
        series = [arm_series(group, kind, key, how, **match) for _, kind, key, how, match, _ in columns]
        present = [s for s in series if s is not None]
        if present:
            out.append(LensRow(arm, len(group), int(present[0].tokens[-1]), group[0].reference,
                               [s.at(-1) if s is not None else Estimate(math.nan, math.nan, 0) for s in series]))
    return out


@dataclass
class Headline:
    """The per-arm numbers of the report's headline table for the report's metric (PR by default), at
    the arm's final common checkpoint; half-widths are NaN with one seed."""

    arm: str
    n_seeds: int
    tokens: int
    mean: Estimate
    """the metric's mean over layers"""
    weakest_layer: int
    weakest: Estimate
    """the weakest layer of the seed-mean profile"""
    dead_layers: list[int] | None
    """layers below `probe.dead_pr`; None for metrics other than PR (the threshold is a PR value)"""
    val_loss: Estimate
    metric: str = "pr"
    null: float = math.nan
    """the metric's isotropic null at the final checkpoint (NaN if the rows do not say)"""
    n_probe: int = 0
    reference: bool = False
    n_layer: int = 0


def headline(pr: ArmSeries, runs: list[Run], dead_pr: float) -> Headline:
    """Headline numbers at the arm's final common checkpoint (docs/metrics.md, last section): mean
    over layers, the weakest layer of the seed-mean profile, layers whose seed-mean PR is below
    `dead_pr` (PR only), and the last val loss."""
    layer_mean, layer_half = pr.layers_at(-1)
    weakest = int(np.nanargmin(layer_mean)) if np.isfinite(layer_mean).any() else 0
    n_probe = pr.n_probe[-1] if pr.n_probe is not None else math.nan
    return Headline(
        arm=pr.arm, n_seeds=pr.n_seeds, tokens=int(pr.tokens[-1]), mean=pr.at(-1), weakest_layer=weakest,
        weakest=Estimate(float(layer_mean[weakest]), float(layer_half[weakest]), pr.n_seeds),
        dead_layers=[int(i) for i in np.flatnonzero(layer_mean < dead_pr)] if pr.metric == "pr" else None,
        val_loss=estimate([r.final_val_loss() for r in runs]), metric=pr.metric,
        null=float(pr.null[-1]) if pr.null is not None else math.nan,
        n_probe=int(n_probe) if math.isfinite(n_probe) else 0, reference=pr.reference, n_layer=layer_mean.size,
    )


def headline_numbers(runs: list[Run], tap: str | None = None, tensor: str = "k",
                     metric: str | None = None) -> list[Headline]:
    """The headline rows as data (for callers that want numbers, not Markdown): trained arms, then
    pretrained references (`Headline.reference`)."""
    metric = check_metric(metric)
    arms = finished_by_arm(runs)
    finished = [r for g in arms.values() for r in g]
    if not finished:
        return []
    trained = [r for r in finished if not r.reference] or finished
    tap = tap or default_tap(finished)
    return [headline(arm_pr(g, tap, tensor, metric), g, trained[0].dead_pr) for g in arms.values()]

"""Attention and weight lenses from the `attn` and `weights` rows (docs/metrics.md): per-arm seed
aggregates of the scalars the report tabulates and draws. Plain numpy, like `metrics`; runs written
before these row kinds existed simply have no lens data, and the report leaves the sections out.

A lens scalar is one number per (seed, checkpoint), reduced over layers: the mean for entropies and
stable ranks, the max for logits and spectral norms (the largest layer is what can blow up).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from rankprobe.report.metrics import Run, _num, finished_by_arm, layer_rows
from rankprobe.report.stats import mean_ci


def _reduce(x: np.ndarray, how: str) -> float:
    """Mean or max of the finite entries (NaN when there are none)."""
    x = x[np.isfinite(x)]
    if x.size == 0:
        return math.nan
    return float(x.mean() if how == "mean" else x.max())


@dataclass
class ArmSeries:
    """One lens scalar of one arm at the checkpoints every seed has: values[seed, checkpoint]."""

    arm: str
    seeds: list[int]
    tokens: np.ndarray
    values: np.ndarray
    reference: bool = False

    @property
    def n_seeds(self) -> int:
        return len(self.seeds)

    def trajectory(self) -> tuple[np.ndarray, np.ndarray]:
        """Seed mean (C,) and 95% half-width (C,)."""
        return mean_ci(self.values, axis=0)

    def final(self) -> tuple[float, float]:
        """Seed mean and 95% half-width at the final common checkpoint."""
        mean, half = mean_ci(self.values[:, -1])
        return float(mean), float(half)


def _tables(runs: list[Run], kind: str, key: str, match: dict) -> tuple[list[dict], list[int]] | None:
    tables = [layer_rows(run, kind, **match) for run in runs]
    common = sorted(set.intersection(*(set(t) for t in tables))) if tables else []
    if not common or not any(key in r for t in tables for rows in t.values() for r in rows):
        return None
    return tables, common


def arm_series(runs: list[Run], kind: str, key: str, how: str = "mean", **match) -> ArmSeries | None:
    """`key` of the `kind` rows matching `match`, reduced over layers by `how` ('mean' or 'max'), at the
    checkpoints every run of the arm has; None when the runs have no such rows."""
    found = _tables(runs, kind, key, match)
    if found is None:
        return None
    tables, common = found
    values = np.array([[_reduce(np.array([_num(r.get(key)) for r in t[c]], dtype=float), how) for c in common]
                       for t in tables], dtype=float)  # (S, C)
    return ArmSeries(arm=runs[0].arm, seeds=[r.seed for r in runs], tokens=np.array(common), values=values,
                     reference=runs[0].reference)


def arm_final_layers(runs: list[Run], kind: str, key: str, **match) -> tuple[int, np.ndarray] | None:
    """(tokens, values[seed, layer]) of `key` at the arm's final common checkpoint; None without rows."""
    found = _tables(runs, kind, key, match)
    if found is None:
        return None
    tables, common = found
    return common[-1], np.array([[_num(r.get(key)) for r in t[common[-1]]] for t in tables], dtype=float)


def has_rows(runs: list[Run], kind: str) -> bool:
    """Whether any finished run has rows of `kind`."""
    return any(r.finished and r.rows.get(kind) for r in runs)


def lens_series(runs: list[Run], kind: str, key: str, how: str = "mean", **match) -> dict[str, ArmSeries]:
    """`arm_series` for every finished arm that has the rows, in report order."""
    out = {}
    for arm, group in finished_by_arm(runs).items():
        series = arm_series(group, kind, key, how, **match)
        if series is not None:
            out[arm] = series
    return out


# the columns of the report's lens tables: (title, kind, key, reduce over layers, row filter)
ATTENTION_COLUMNS = [
    ("attention entropy (normalised, mean)", "attn", "entropy_norm", "mean", {}),
    ("attention entropy (nats, mean)", "attn", "entropy", "mean", {}),
    ("max logit (max over layers, heads)", "attn", "max_logit", "max", {}),
]
WEIGHT_COLUMNS = [
    ("W_q stable rank (mean)", "weights", "stable_rank", "mean", {"matrix": "q"}),
    ("W_k stable rank (mean)", "weights", "stable_rank", "mean", {"matrix": "k"}),
    ("W_q spectral norm (max)", "weights", "spectral_norm", "max", {"matrix": "q"}),
    ("W_k spectral norm (max)", "weights", "spectral_norm", "max", {"matrix": "k"}),
]


@dataclass
class LensRow:
    """One arm's row of a lens table: (mean, half-width) per column at the final common checkpoint."""

    arm: str
    n_seeds: int
    tokens: int
    reference: bool
    cells: list[tuple[float, float]]


def lens_table(runs: list[Run], columns: list[tuple]) -> list[LensRow]:
    """Per finished arm with any of the columns' rows (report order), the columns' final values."""
    out = []
    for arm, group in finished_by_arm(runs).items():
        series = [arm_series(group, kind, key, how, **match) for _, kind, key, how, match in columns]
        present = [s for s in series if s is not None]
        if not present:
            continue
        out.append(LensRow(arm=arm, n_seeds=len(group), tokens=int(present[0].tokens[-1]),
                           reference=group[0].reference,
                           cells=[s.final() if s is not None else (math.nan, math.nan) for s in series]))
    return out

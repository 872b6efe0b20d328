"""Reading `metrics.jsonl` files (schema in docs/metrics.md) and aggregating key PR across seeds.

Everything here is plain Python and numpy: a report is rebuilt on a laptop from files alone, so
nothing imports torch or training code. A run is one `metrics.jsonl`; an arm is the set of finished
runs sharing an `arm` label (one per seed). Aggregates are seed means with a Student-t 95% interval.
"""

from __future__ import annotations

import json
import math
import warnings
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

from rankprobe.config import UserError

CANONICAL_ARMS = ("adamw", "adamw+qknorm", "muon", "muon+qknorm")


class MetricsError(UserError, ValueError):
    """A metrics file that cannot be read: a corrupt line that is not a torn last line."""


def read_metrics(path: str | Path) -> list[dict]:
    """Parse one metrics.jsonl into row dicts. A torn last line (a crash mid-write) is dropped with a
    warning; any other line that is not a JSON object raises MetricsError naming file and line."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise MetricsError(f"cannot read metrics file {path}: {e}") from None
    numbered = [(i + 1, line) for i, line in enumerate(lines) if line.strip()]
    rows = []
    for k, (lineno, line) in enumerate(numbered):
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError(f"expected a JSON object, got {type(row).__name__}")
        except ValueError as e:
            if k == len(numbered) - 1:
                warnings.warn(f"{path}: dropped torn last line {lineno} (a crash mid-write?)", stacklevel=2)
                break
            raise MetricsError(f"{path}, line {lineno}: corrupt metrics row ({e})") from None
        rows.append(row)
    return rows


@dataclass
class Run:
    """One training run, as recorded in its metrics.jsonl."""

    name: str
    arm: str
    optimizer: str
    qk_norm: bool
    seed: int
    config: dict
    env: dict
    rows: dict[str, list[dict]]
    """rows by `kind` (`train`, `eval`, `probe`, `end`, and any unknown kinds, which are ignored)"""
    finished: bool
    """an `end` row with status "finished": only these enter numbers and figures (a diverged run does not)"""
    path: Path
    info: dict = field(default_factory=dict)
    """the whole `run` row (n_params, param_groups, probe_checkpoints, ...)"""

    @property
    def status(self) -> str:
        """'finished', 'diverged' (the training loss went NaN/inf), or 'incomplete' (no `end` row yet)."""
        return _status(self.rows)

    @property
    def ended_at(self) -> int:
        """Tokens of the `end` row: where a diverged run stopped (0 without one)."""
        ends = self.rows.get("end")
        return int(ends[-1].get("tokens") or 0) if ends else 0

    @property
    def head_dim(self) -> int:
        return int(self.info.get("head_dim") or self.config.get("model", {}).get("head_dim", 0))

    @property
    def n_layer(self) -> int:
        return int(self.info.get("n_layer") or self.config.get("model", {}).get("n_layer", 0))

    @property
    def dead_pr(self) -> float:
        return float(self.config.get("probe", {}).get("dead_pr", 10.0))

    @property
    def tap(self) -> str:
        return str(self.config.get("probe", {}).get("tap", "norm"))

    def final_val_loss(self) -> float:
        """val_loss of the last `eval` row (NaN if there is none or it was null)."""
        evals = self.rows.get("eval", [])
        return _num(evals[-1].get("val_loss")) if evals else math.nan


def _status(rows: dict[str, list[dict]]) -> str:
    ends = rows.get("end")
    return str(ends[-1].get("status") or "finished") if ends else "incomplete"


def _num(value) -> float:
    return math.nan if value is None else float(value)


def _load_run(path: Path) -> Run | None:
    rows = read_metrics(path)
    by_kind: dict[str, list[dict]] = {}
    for row in rows:
        by_kind.setdefault(str(row.get("kind")), []).append(row)
    head = by_kind.get("run")
    if not head:
        warnings.warn(f"{path}: no `run` row; skipped", stacklevel=3)
        return None
    info = head[0]
    optimizer = str(info.get("optimizer", info.get("config", {}).get("optim", {}).get("name", "?")))
    qk_norm = bool(info.get("qk_norm", info.get("config", {}).get("model", {}).get("qk_norm", False)))
    arm = str(info.get("arm") or optimizer + ("+qknorm" if qk_norm else ""))
    return Run(
        name=str(info.get("run") or path.parent.name), arm=arm, optimizer=optimizer, qk_norm=qk_norm,
        seed=int(info.get("seed", 0)), config=info.get("config") or {}, env=info.get("env") or {},
        rows=by_kind, finished=_status(by_kind) == "finished", path=path, info=info,
    )


def find_runs(root: str | Path) -> list[Run]:
    """Every run whose metrics.jsonl lies under `root` (recursively), in arm order, then seed."""
    root = Path(root)
    if root.is_file():
        paths = [root]
    elif root.is_dir():
        paths = sorted(root.rglob("metrics.jsonl"))
    else:
        raise UserError(f"no such directory: {root}")
    if not paths:
        raise UserError(f"no metrics.jsonl files under {root}")
    runs = [r for r in map(_load_run, paths) if r is not None]
    if not runs:
        raise UserError(f"no readable runs under {root} (metrics files lack a `run` row)")
    return sorted(runs, key=lambda r: (arm_key(r.arm), r.seed, r.name))


# ---------------------------------------------------------------------------------------------
# per-run series


def layer_pr(run: Run, tap: str, tensor: str = "k") -> dict[int, np.ndarray]:
    """tokens -> layer PR (n_layer,) at `tap` for `tensor`, in token order. A checkpoint missing a
    layer (a crash mid-probe) is left out; a later row for the same (tokens, layer) wins."""
    by_tokens: dict[int, dict[int, float]] = {}
    for row in run.rows.get("probe", []):
        if row.get("tap") == tap and row.get("tensor") == tensor:
            by_tokens.setdefault(int(row["tokens"]), {})[int(row["layer"])] = _num(row.get("pr"))
    n_layer = run.n_layer or max((max(v) + 1 for v in by_tokens.values()), default=0)
    return {
        t: np.array([layers[i] for i in range(n_layer)], dtype=float)
        for t, layers in sorted(by_tokens.items())
        if all(i in layers for i in range(n_layer))
    }


def probe_taps(runs: list[Run], tensor: str = "k") -> list[str]:
    """The taps that have probe rows for `tensor` in any of `runs`."""
    return sorted({r.get("tap") for run in runs for r in run.rows.get("probe", []) if r.get("tensor") == tensor})


def default_tap(runs: list[Run]) -> str:
    """The headline tap from the runs' config (`probe.tap`); the most common one if they differ."""
    counts = Counter(run.tap for run in runs)
    if len(counts) > 1:
        warnings.warn(f"runs disagree on probe.tap ({dict(counts)}); using the most common", stacklevel=2)
    return counts.most_common(1)[0][0] if counts else "norm"


def train_loss(run: Run) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, loss) of the `train` rows."""
    rows = run.rows.get("train", [])
    return (np.array([int(r["tokens"]) for r in rows], dtype=float),
            np.array([_num(r.get("loss")) for r in rows], dtype=float))


def val_loss(run: Run) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, val_loss) of the `eval` rows."""
    rows = run.rows.get("eval", [])
    return (np.array([int(r["tokens"]) for r in rows], dtype=float),
            np.array([_num(r.get("val_loss")) for r in rows], dtype=float))


# ---------------------------------------------------------------------------------------------
# statistics


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


# ---------------------------------------------------------------------------------------------
# arms


def arm_key(arm: str) -> tuple[int, str]:
    """Sort key: adamw, adamw+qknorm, muon, muon+qknorm, then any other arm alphabetically."""
    return (CANONICAL_ARMS.index(arm), "") if arm in CANONICAL_ARMS else (len(CANONICAL_ARMS), arm)


def finished_by_arm(runs: list[Run]) -> dict[str, list[Run]]:
    """Finished runs grouped by arm, arms in report order; a repeated (arm, seed) keeps the first."""
    arms: dict[str, list[Run]] = {}
    for run in sorted((r for r in runs if r.finished), key=lambda r: (arm_key(r.arm), r.seed, str(r.path))):
        group = arms.setdefault(run.arm, [])
        if any(r.seed == run.seed for r in group):
            warnings.warn(f"arm {run.arm} seed {run.seed} appears twice; ignoring {run.path}", stacklevel=2)
            continue
        group.append(run)
    return arms


@dataclass
class ArmPR:
    """Layer PR of one arm at the checkpoints every seed has: values[seed, checkpoint, layer]."""

    arm: str
    seeds: list[int]
    tokens: np.ndarray
    values: np.ndarray

    @property
    def n_seeds(self) -> int:
        return len(self.seeds)

    def trajectory(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean PR over layers per checkpoint: seed mean (C,) and 95% half-width (C,)."""
        return mean_ci(self.values.mean(axis=2), axis=0)

    def layers_at(self, index: int = -1) -> tuple[np.ndarray, np.ndarray]:
        """PR per layer at checkpoint `index` (default the final one): seed mean and half-width (L,)."""
        return mean_ci(self.values[:, index, :], axis=0)

    def seed_mean(self) -> np.ndarray:
        """Seed-mean PR, (checkpoint, layer)."""
        return self.values.mean(axis=0)


def arm_pr(runs: list[Run], tap: str, tensor: str = "k") -> ArmPR:
    """Stack the layer PR of one arm's runs at the checkpoints present in all of them."""
    series = [layer_pr(run, tap, tensor) for run in runs]
    common = sorted(set.intersection(*(set(s) for s in series))) if series else []
    if not common:
        have = probe_taps(runs, tensor)
        raise UserError(f"arm {runs[0].arm if runs else '?'}: no {tensor} probe at tap {tap!r} common to all "
                        f"seeds (taps with {tensor} probes: {', '.join(have) or 'none'})")
    values = np.stack([np.stack([s[t] for t in common]) for s in series])  # (S, C, L)
    return ArmPR(arm=runs[0].arm, seeds=[r.seed for r in runs], tokens=np.array(common), values=values)


def aggregate(runs: list[Run], tap: str, tensor: str = "k") -> dict[str, ArmPR]:
    """ArmPR for every arm with finished runs, in report order."""
    return {arm: arm_pr(group, tap, tensor) for arm, group in finished_by_arm(runs).items()}


@dataclass
class Headline:
    """The per-arm numbers of the report's headline table (half-widths NaN with one seed)."""

    arm: str
    n_seeds: int
    tokens: int
    mean_pr: float
    mean_pr_half: float
    weakest_layer: int
    weakest_pr: float
    weakest_half: float
    dead_layers: list[int]
    val_loss: float
    val_loss_half: float


def headline(pr: ArmPR, runs: list[Run], dead_pr: float) -> Headline:
    """Headline numbers at the arm's final common checkpoint (docs/metrics.md, last section):
    mean PR over layers, the weakest layer of the seed-mean profile, layers whose seed-mean PR is
    below `dead_pr`, and the last val loss, each as a seed mean with its 95% half-width."""
    mean_pr, mean_half = mean_ci(pr.values[:, -1, :].mean(axis=1))
    layer_mean, layer_half = pr.layers_at(-1)
    weakest = int(np.nanargmin(layer_mean)) if np.isfinite(layer_mean).any() else 0
    loss, loss_half = mean_ci([r.final_val_loss() for r in runs])
    return Headline(
        arm=pr.arm, n_seeds=pr.n_seeds, tokens=int(pr.tokens[-1]),
        mean_pr=float(mean_pr), mean_pr_half=float(mean_half),
        weakest_layer=weakest, weakest_pr=float(layer_mean[weakest]), weakest_half=float(layer_half[weakest]),
        dead_layers=[int(i) for i in np.flatnonzero(layer_mean < dead_pr)],
        val_loss=float(loss), val_loss_half=float(loss_half),
    )

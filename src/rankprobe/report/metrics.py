"""Reading `metrics.jsonl` files (schema in docs/metrics.md) and aggregating key spectra across seeds.

Everything here is plain Python and numpy: a report is rebuilt on a laptop from files alone, so
nothing imports torch or training code. A run is one `metrics.jsonl`; an arm is the set of finished
runs sharing an `arm` label (one per seed). Aggregates are seed means with a Student-t 95% interval.
A pretrained checkpoint probed once as loaded (`Run.reference`) is an arm of its own, ordered last,
that the report draws as a reference and never pools with trained arms.
"""

from __future__ import annotations

import gzip
import json
import lzma
import math
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rankprobe.config import UserError
from rankprobe.report.stats import mean_ci

CANONICAL_ARMS = ("adamw", "adamw+qknorm", "muon", "muon+qknorm")
METRICS = ("pr", "erank", "stable_rank", "rankme")
"""the spectral metrics of a `probe` row the report can be drawn from (docs/lenses.md, section 1)"""
METRIC_NAME = {"pr": "PR", "erank": "erank", "stable_rank": "stable rank", "rankme": "RankMe"}


def check_metric(metric: str | None) -> str:
    """`metric` (default 'pr') if it is one of METRICS; a UserError naming the choices otherwise."""
    metric = metric or "pr"
    if metric not in METRICS:
        raise UserError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
    return metric


class MetricsError(UserError, ValueError):
    """A metrics file that cannot be read: a corrupt line that is not a torn last line."""


# A published study may keep its metrics compressed; the report reads them as they are.
METRICS_NAMES = ("metrics.jsonl", "metrics.jsonl.gz", "metrics.jsonl.xz")


def _read_text(path: Path) -> str:
    if path.suffix == ".gz":
        return gzip.decompress(path.read_bytes()).decode("utf-8")
    if path.suffix == ".xz":
        return lzma.decompress(path.read_bytes()).decode("utf-8")
    return path.read_text(encoding="utf-8")


def read_metrics(path: str | Path) -> list[dict]:
    """Parse one metrics.jsonl (or .jsonl.gz / .jsonl.xz) into row dicts. A torn last line (a crash
    mid-write) is dropped with a warning; any other line that is not a JSON object raises MetricsError
    naming file and line."""
    path = Path(path)
    try:
        lines = _read_text(path).splitlines()
    except (OSError, UnicodeDecodeError, EOFError, lzma.LZMAError) as e:  # a bad gzip is OSError or EOFError
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
    def reference(self) -> bool:
        """A checkpoint probed once as loaded (rankprobe.probes.hf: a Hugging Face model or a finished
        RankProbe run), optimizer "pretrained"; its one checkpoint at tokens 0 is not an init. A run row
        with a `source` counts too (files written before re-probed RankProbe runs said "pretrained")."""
        return self.optimizer == "pretrained" or "source" in self.info

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
    """Every run whose metrics.jsonl (or .jsonl.gz / .jsonl.xz) lies under `root` (recursively), in arm
    order, then seed. A folder holding both a plain and a compressed file reads the plain one."""
    root = Path(root)
    if root.is_file():
        paths = [root]
    elif root.is_dir():
        found = {p.parent: p for name in reversed(METRICS_NAMES) for p in root.rglob(name)}
        paths = sorted(found.values())
    else:
        raise UserError(f"no such directory: {root}")
    if not paths:
        raise UserError(f"no metrics.jsonl files under {root}")
    runs = [r for r in map(_load_run, paths) if r is not None]
    if not runs:
        raise UserError(f"no readable runs under {root} (metrics files lack a `run` row)")
    return sorted(runs, key=lambda r: (r.reference, arm_key(r.arm), r.seed, r.name))


# ---------------------------------------------------------------------------------------------
# per-run series


def layer_rows(run: Run, kind: str = "probe", **match) -> dict[int, list[dict]]:
    """tokens -> the rows of layers 0..n_layer-1 among the `kind` rows whose keys equal `match` (e.g.
    tap="norm", tensor="k"), in token order. A checkpoint missing a layer (a crash mid-probe) is left
    out; a later row for the same (tokens, layer) wins."""
    by_tokens: dict[int, dict[int, dict]] = {}
    for row in run.rows.get(kind, []):
        if all(row.get(k) == v for k, v in match.items()):
            by_tokens.setdefault(int(row["tokens"]), {})[int(row["layer"])] = row
    n_layer = run.n_layer or max((max(v) + 1 for v in by_tokens.values()), default=0)
    return {t: [layers[i] for i in range(n_layer)] for t, layers in sorted(by_tokens.items())
            if all(i in layers for i in range(n_layer))}


def layer_pr(run: Run, tap: str, tensor: str = "k", metric: str = "pr") -> dict[int, np.ndarray]:
    """tokens -> layer value of `metric` (n_layer,) at `tap` for `tensor` (NaN where a row lacks it)."""
    return {t: np.array([_num(r.get(metric)) for r in rows], dtype=float)
            for t, rows in layer_rows(run, "probe", tap=tap, tensor=tensor).items()}


def null_value(row: dict, metric: str) -> float:
    """The row's `<metric>_null` (the isotropic finite-sample ceiling); for PR rows written before the
    nulls, the closed form ((N−1)·D + 2)/(N + D) of its `n` and `dim` (docs/probes.md); else NaN."""
    value = row.get(f"{metric}_null")
    if value is None and metric == "pr" and row.get("n") and row.get("dim"):
        n, d = int(row["n"]), int(row["dim"])
        return ((n - 1) * d + 2) / (n + d)
    return _num(value)


def probe_taps(runs: list[Run], tensor: str = "k") -> list[str]:
    """The taps that have probe rows for `tensor` in any of `runs`."""
    return sorted({r.get("tap") for run in runs for r in run.rows.get("probe", []) if r.get("tensor") == tensor})


def default_tap(runs: list[Run]) -> str:
    """The headline tap from the runs' config (`probe.tap`); the most common one if they differ.
    Trained runs decide; pretrained references only when there is nothing else."""
    counts = Counter(run.tap for run in ([r for r in runs if not r.reference] or runs))
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
# arms


def arm_key(arm: str) -> tuple[int, str]:
    """Sort key: adamw, adamw+qknorm, muon, muon+qknorm, then any other arm alphabetically (reports
    put pretrained references after all of these: sort on (run.reference, arm_key(run.arm)))."""
    return (CANONICAL_ARMS.index(arm), "") if arm in CANONICAL_ARMS else (len(CANONICAL_ARMS), arm)


def finished_by_arm(runs: list[Run]) -> dict[str, list[Run]]:
    """Finished runs grouped by arm, arms in report order (pretrained references last); MetricsError
    when two runs claim one (arm, seed), since either could be the one drawn."""
    arms: dict[str, list[Run]] = {}
    for run in sorted((r for r in runs if r.finished),
                      key=lambda r: (r.reference, arm_key(r.arm), r.seed, str(r.path))):
        group = arms.setdefault(run.arm, [])
        twin = next((r for r in group if r.seed == run.seed), None)
        if twin is not None:
            raise MetricsError(f"arm {run.arm} seed {run.seed} appears twice ({twin.path.parent} and "
                               f"{run.path.parent}); move one away or re-probe it with --arm NAME")
        group.append(run)
    return arms


def split_arms(runs: list[Run]) -> tuple[dict[str, list[Run]], dict[str, list[Run]]]:
    """(trained arms, pretrained reference arms), each as `finished_by_arm` gives them."""
    arms = finished_by_arm(runs)
    trained = {a: g for a, g in arms.items() if not g[0].reference}
    return trained, {a: g for a, g in arms.items() if g[0].reference}


@dataclass
class ArmPR:
    """One spectral metric (PR by default) of one arm at the checkpoints every seed has:
    values[seed, checkpoint, layer]; `null` and `n_probe` per checkpoint; per-head values at the final one."""

    arm: str
    seeds: list[int]
    tokens: np.ndarray
    values: np.ndarray
    metric: str = "pr"
    null: np.ndarray | None = None
    """(C,) isotropic null of the metric for the probe set: mean over seeds and layers (NaN if unknown)"""
    n_probe: np.ndarray | None = None
    """(C,) probe tokens N the statistics (and the null) are for"""
    heads: np.ndarray | None = None
    """(S, L, H) per-head values at the final checkpoint; None when the rows lack `<metric>_heads`"""
    reference: bool = False

    @property
    def n_seeds(self) -> int:
        return len(self.seeds)

    def trajectory(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean over layers per checkpoint: seed mean (C,) and 95% half-width (C,)."""
        return mean_ci(self.values.mean(axis=2), axis=0)

    def layers_at(self, index: int = -1) -> tuple[np.ndarray, np.ndarray]:
        """Value per layer at checkpoint `index` (default the final one): seed mean and half-width (L,)."""
        return mean_ci(self.values[:, index, :], axis=0)

    def seed_mean(self) -> np.ndarray:
        """Seed-mean values, (checkpoint, layer)."""
        return self.values.mean(axis=0)


def _nanmean(x: np.ndarray, axis) -> np.ndarray:
    """Mean ignoring NaNs; NaN (without a warning) where everything is NaN."""
    ok = np.isfinite(x)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(ok, x, 0.0).sum(axis=axis) / ok.sum(axis=axis)


def _stack_heads(rows: list[list[dict]], key: str) -> np.ndarray | None:
    """rows[seed][layer] -> (S, L, H) of the list `key`; None if missing or ragged."""
    lists = [[r.get(key) for r in seed] for seed in rows]
    if any(not isinstance(v, list) or not v for seed in lists for v in seed):
        return None
    if len({len(v) for seed in lists for v in seed}) != 1:
        return None
    return np.array([[[_num(x) for x in v] for v in seed] for seed in lists], dtype=float)


def arm_pr(runs: list[Run], tap: str, tensor: str = "k", metric: str = "pr") -> ArmPR:
    """Stack `metric` of one arm's runs at the checkpoints present in all of them."""
    arm = runs[0].arm if runs else "?"
    tables = [layer_rows(run, "probe", tap=tap, tensor=tensor) for run in runs]
    common = sorted(set.intersection(*(set(t) for t in tables))) if tables else []
    if not common:
        have = probe_taps(runs, tensor)
        raise UserError(f"arm {arm}: no {tensor} probe at tap {tap!r} common to all "
                        f"seeds (taps with {tensor} probes: {', '.join(have) or 'none'})")
    rows = [[t[c] for c in common] for t in tables]  # [seed][checkpoint][layer] -> row
    if not any(metric in r for seed in rows for ckpt in seed for r in ckpt):
        have = [m for m in METRICS if any(m in r for seed in rows for ckpt in seed for r in ckpt)]
        raise UserError(f"arm {arm}: the probe rows have no {metric!r} (metrics written before the spectral "
                        f"lenses?); metrics available: {', '.join(have) or 'none'}")
    values = np.array([[[_num(r.get(metric)) for r in ckpt] for ckpt in seed] for seed in rows], dtype=float)
    nulls = np.array([[[null_value(r, metric) for r in ckpt] for ckpt in seed] for seed in rows], dtype=float)
    n = np.array([[[_num(r.get("n")) for r in ckpt] for ckpt in seed] for seed in rows], dtype=float)
    return ArmPR(arm=arm, seeds=[r.seed for r in runs], tokens=np.array(common), values=values,  # (S, C, L)
                 metric=metric, null=_nanmean(nulls, (0, 2)), n_probe=_nanmean(n, (0, 2)),
                 heads=_stack_heads([seed[-1] for seed in rows], f"{metric}_heads"),
                 reference=runs[0].reference)


def aggregate(runs: list[Run], tap: str, tensor: str = "k", metric: str = "pr") -> dict[str, ArmPR]:
    """ArmPR for every arm with finished runs, in report order (pretrained references last)."""
    return {arm: arm_pr(group, tap, tensor, metric) for arm, group in finished_by_arm(runs).items()}


@dataclass
class Headline:
    """The per-arm numbers of the report's headline table (half-widths NaN with one seed), for the
    report's metric (`mean`, `weakest_value`: PR by default)."""

    arm: str
    n_seeds: int
    tokens: int
    mean: float
    mean_half: float
    weakest_layer: int
    weakest_value: float
    weakest_half: float
    dead_layers: list[int] | None
    """layers below `probe.dead_pr`; None for metrics other than PR (the threshold is a PR value)"""
    val_loss: float
    val_loss_half: float
    metric: str = "pr"
    null: float = math.nan
    """the metric's isotropic null at the final checkpoint (NaN if the rows do not say)"""
    n_probe: int = 0
    reference: bool = False
    n_layer: int = 0


def headline(pr: ArmPR, runs: list[Run], dead_pr: float) -> Headline:
    """Headline numbers at the arm's final common checkpoint (docs/metrics.md, last section):
    mean over layers, the weakest layer of the seed-mean profile, layers whose seed-mean PR is
    below `dead_pr` (PR only), and the last val loss, each as a seed mean with its 95% half-width."""
    mean, mean_half = mean_ci(pr.values[:, -1, :].mean(axis=1))
    layer_mean, layer_half = pr.layers_at(-1)
    weakest = int(np.nanargmin(layer_mean)) if np.isfinite(layer_mean).any() else 0
    loss, loss_half = mean_ci([r.final_val_loss() for r in runs])
    n_probe = pr.n_probe[-1] if pr.n_probe is not None else math.nan
    return Headline(
        arm=pr.arm, n_seeds=pr.n_seeds, tokens=int(pr.tokens[-1]),
        mean=float(mean), mean_half=float(mean_half),
        weakest_layer=weakest, weakest_value=float(layer_mean[weakest]), weakest_half=float(layer_half[weakest]),
        dead_layers=[int(i) for i in np.flatnonzero(layer_mean < dead_pr)] if pr.metric == "pr" else None,
        val_loss=float(loss), val_loss_half=float(loss_half), metric=pr.metric,
        null=float(pr.null[-1]) if pr.null is not None else math.nan,
        n_probe=int(n_probe) if math.isfinite(n_probe) else 0, reference=pr.reference, n_layer=layer_mean.size,
    )

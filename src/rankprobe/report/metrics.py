"""Reading `metrics.jsonl` files (schema in docs/metrics.md) into runs, and grouping runs into arms.

Everything here is plain Python and numpy: a report is rebuilt on a laptop from files alone, so
nothing imports torch or training code. A run is one `metrics.jsonl`; an arm is the set of finished
runs sharing an `arm` label (one per seed); `series` stacks an arm's seeds for every table and figure.
A pretrained checkpoint probed once as loaded (`Run.reference`) is an arm of its own, ordered last,
that the report draws as a reference and never pools with trained arms.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rankprobe.config import UserError
from rankprobe.runfolder import METRICS_NAMES, MetricsError, read_rows, status_of  # noqa: F401 (MetricsError: re-exported)

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


# Reading rows (one torn-line rule) and a run's status belong to the run folder's owner.
read_metrics = read_rows


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
        """runfolder.status_of the run: 'finished', 'diverged' (the training loss went NaN/inf) or 'cut off'."""
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
    return status_of(ends[-1:] if ends else rows.get("run", []))


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


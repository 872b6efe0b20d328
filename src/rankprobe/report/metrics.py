"""Reading `metrics.jsonl` files (schema in docs/metrics.md) into runs, and grouping runs into arms.

Plain Python and numpy, so a report is rebuilt on a laptop from files alone. A run is one
`metrics.jsonl`; an arm is the finished runs sharing an `arm` label (one per seed). A pretrained
checkpoint probed once as loaded (`Run.reference`) is an arm of its own, ordered last, that the report
draws as a reference and never pools with trained arms.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rankprobe.config import UserError, flatten
from rankprobe.runfolder import METRICS_NAMES, MetricsError, read_rows, status_of  # noqa: F401 (MetricsError: re-exported)

CANONICAL_ARMS = ("adamw", "adamw+qknorm", "muon", "muon+qknorm")
METRIC_NAME = {"pr": "PR", "erank": "erank", "stable_rank": "stable rank", "rankme": "RankMe"}
METRICS = tuple(METRIC_NAME)
"""the spectral metrics of a `probe` row the report can be drawn from (docs/lenses.md, section 1)"""
read_metrics = read_rows  # reading rows (one torn-line rule) belongs to the run folder's owner


def _num(value) -> float:
    return math.nan if value is None else float(value)


LAUNCH_KEYS = frozenset({"name", "out", "train.seed", "train.progress", "train.tensorboard"})
"""config keys that name, seed or place a run, or say how it reports progress; never what it computes"""


@dataclass
class Run:
    """One run, as recorded in its metrics.jsonl: `info` is its `run` row, `rows` its rows by `kind`
    (unknown kinds are kept and ignored)."""

    path: Path
    info: dict
    rows: dict[str, list[dict]]

    def __post_init__(self):
        get = self.info.get
        self.config, self.env = get("config") or {}, get("env") or {}
        model, probe = self.config.get("model", {}), self.config.get("probe", {})
        self.name = str(get("run") or self.path.parent.name)
        self.optimizer = str(get("optimizer", self.config.get("optim", {}).get("name", "?")))
        self.qk_norm = bool(get("qk_norm", model.get("qk_norm", False)))
        self.arm = str(get("arm") or self.optimizer + ("+qknorm" if self.qk_norm else ""))
        self.seed = int(get("seed", 0))
        self.head_dim = int(get("head_dim") or model.get("head_dim", 0))
        self.n_layer = int(get("n_layer") or model.get("n_layer", 0))
        self.dead_pr = float(probe.get("dead_pr", 10.0))
        self.tap = str(probe.get("tap", "norm"))
        # 'finished', 'diverged' (the loss or weights went NaN/inf) or 'cut off' (no `end` row); only
        # finished runs enter numbers and figures. ended_at: where the `end` row says the run stopped.
        self.status = status_of(self.rows.get("end", [])[-1:] or self.rows.get("run", []))
        self.finished = self.status == "finished"
        self.ended_at = int(self.rows["end"][-1].get("tokens") or 0) if self.rows.get("end") else 0
        # A checkpoint probed once as loaded (rankprobe.probes.hf), whose one checkpoint at tokens 0 is not
        # an init; a run row with a `source` counts too (re-probed RankProbe runs once said "pretrained").
        self.reference = self.optimizer == "pretrained" or "source" in self.info

    def settings(self, *skip: str) -> dict[str, object]:
        """The run's settings as dotted keys: its flattened config less what names, seeds or places the
        run (LAUNCH_KEYS), the sweep.* keys (how it was launched, not what it computed; a study made in
        parts by several sweeps differs there and nowhere else) and any `skip` keys."""
        return {k: v for k, v in flatten(self.config).items()
                if k not in LAUNCH_KEYS and k not in skip and not k.startswith("sweep.")}

    def final_val_loss(self) -> float:
        """val_loss of the last `eval` row (NaN if there is none or it was null)."""
        evals = self.rows.get("eval", [])
        return _num(evals[-1].get("val_loss")) if evals else math.nan


def _load_run(path: Path) -> Run | None:
    by_kind: dict[str, list[dict]] = {}
    for row in read_metrics(path):
        by_kind.setdefault(str(row.get("kind")), []).append(row)
    if not by_kind.get("run"):
        return None
    return Run(path, by_kind["run"][0], by_kind)


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
    with warnings.catch_warnings(record=True) as said:  # a torn last line, say
        warnings.simplefilter("always")
        loaded = {p: _load_run(p) for p in paths}
    runs = [r for r in loaded.values() if r is not None]
    if not runs:  # the error alone: the warnings of each file before it would make it several lines
        raise UserError(f"no readable runs under {root} (metrics files lack a `run` row)")
    for w in said:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    for p in (p for p, r in loaded.items() if r is None):
        warnings.warn(f"{p}: no `run` row; skipped", stacklevel=2)
    return sorted(runs, key=lambda r: (r.reference, arm_key(r.arm), r.seed, r.name))


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


def default_tap(runs: list[Run]) -> str:
    """The headline tap from the runs' config (`probe.tap`); the most common one if they differ.
    Trained runs decide; pretrained references only when there is nothing else."""
    counts = Counter(run.tap for run in ([r for r in runs if not r.reference] or runs))
    if len(counts) > 1:
        warnings.warn(f"runs disagree on probe.tap ({dict(counts)}); using the most common", stacklevel=2)
    return counts.most_common(1)[0][0] if counts else "norm"


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

"""Where rows go besides metrics.jsonl: one logger interface (`Sink`) and its TensorBoard, W&B and CSV sinks.

A sink is a callable `(kind, row)` with a `close()`: exactly what `runfolder.MetricsWriter` hands each
row it writes (its `mirrors`), so the trainer, the `Monitor` and `rankprobe export` share them. JSONL
stays the source of truth; a sink only mirrors it. No torch import here (TensorBoard's writer aside).

Two views of a row, defined once and used by every sink:
- `scalars(kind, row)`: flat names for dashboards, one number per layer (head means), e.g.
  `rankprobe/k_pr/L03` (post-rotary keys' PR of layer 3), `rankprobe/proj/k_pr/L03` (another tap),
  `rankprobe/attn_entropy/L03`, `rankprobe/Wk_stable_rank/L03`, `train/loss`.
- `long_records(kind, row)`: one record per number, per-head lists exploded (the `head` column),
  in the columns of `LONG_COLUMNS`; `rankprobe.load` builds its DataFrame from them.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

from .errors import UserError

LONG_COLUMNS = ("run", "arm", "seed", "step", "tokens", "kind", "tap", "tensor", "layer", "head", "metric", "value")
DEFAULT_TAP = "rope"
"""the tap whose scalars carry no tap in their name: what the attention kernel consumes"""
# identity and bookkeeping fields: never a metric
ID_FIELDS = {"kind", "step", "tokens", "tap", "tensor", "layer", "matrix", "run", "arm", "seed", "schema"}
COUNT_FIELDS = {"n", "dim", "n_rows", "seq_len", "val_tokens", "shape"}


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _prefix(kind: str, row: dict) -> str:
    """The part of a scalar's name before the metric: per-tensor for probe rows, per-matrix for weights."""
    if kind == "probe":
        tap = "" if row.get("tap") == DEFAULT_TAP else f"{row.get('tap')}/"
        return f"{tap}{row.get('tensor')}_"
    if kind in ("weights", "update"):
        return f"W{row.get('matrix')}_"
    return f"{kind}_"


def scalars(kind: str, row: dict) -> dict[str, float]:
    """Flat scalar names -> values of one row (layer-level numbers only; nulls, counts, the isotropic
    nulls and per-head lists are left out). Rows without a layer (train, eval, end) give `kind/key`."""
    out = {}
    if kind == "run":
        return out
    layered = "layer" in row
    for key, v in row.items():
        if key in ID_FIELDS or key in COUNT_FIELDS or key.endswith("_null") or not _number(v):
            continue
        if layered:
            out[f"rankprobe/{_prefix(kind, row)}{key}/L{row['layer']:02d}"] = float(v)
        else:
            out[f"{kind}/{key}"] = float(v)
    return out


def long_records(kind: str, row: dict, run: dict | None = None) -> list[dict]:
    """One record per number of `row` in LONG_COLUMNS order: a list field `m_heads` (or `mean_norm`)
    gives metric `m` with `head` 0, 1, …; a plain number `head` None. `tensor` holds the matrix of
    weights and update rows. `run`: the run row (run, arm, seed). Strings and booleans are left out;
    null values stay None."""
    if kind == "run":
        return []
    run = run or {}
    base = {"run": run.get("run"), "arm": run.get("arm"), "seed": run.get("seed"), "step": row.get("step"),
            "tokens": row.get("tokens"), "kind": kind, "tap": row.get("tap"),
            "tensor": row.get("tensor", row.get("matrix")), "layer": row.get("layer")}
    out = []
    for key, v in row.items():
        if key in ID_FIELDS or key == "shape":
            continue
        if isinstance(v, list):
            metric = key[: -len("_heads")] if key.endswith("_heads") else key
            out += [base | {"head": h, "metric": metric, "value": x} for h, x in enumerate(v)
                    if x is None or _number(x)]
        elif v is None or _number(v):
            out.append(base | {"head": None, "metric": key, "value": v})
    return out


def _x(row: dict) -> int:
    """A row's position on the horizontal axis: tokens where known, else the step."""
    return int(row["tokens"] if row.get("tokens") is not None else row.get("step") or 0)


class Sink:
    """The logger interface: called with every row, closed at the end. This base ignores everything,
    so a disabled sink costs nothing."""

    def __call__(self, kind: str, row: dict) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardSink(Sink):
    """Every row kind as TensorBoard scalars (`scalars`) at the run's token count. `purge_step`
    (tokens) makes TensorBoard drop the events a killed run logged after its checkpoint."""

    def __init__(self, folder: str | Path, purge_step: int | None = None):
        _require("tensorboard", "tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(str(folder), purge_step=purge_step)

    def __call__(self, kind: str, row: dict) -> None:
        x = _x(row)
        for name, v in scalars(kind, row).items():
            self.tb.add_scalar(name, v, x)

    def close(self) -> None:
        self.tb.close()


class WandbSink(Sink):
    """Every row kind as Weights & Biases metrics (`scalars`), plotted against `tokens`.

    Rows may arrive out of order (the trainer's weight rows come one checkpoint late), so W&B's own
    step is not used: each log carries `tokens`, declared as every metric's step metric. Offline
    (`mode="offline"`, or WANDB_MODE=offline) it needs no network; `wandb sync` uploads later. It logs
    into `run`, else the process's active run (`wandb.run`), else a run of its own."""

    def __init__(self, project: str = "rankprobe", name: str | None = None, folder: str | Path | None = None,
                 config: dict | None = None, mode: str | None = None, run=None):
        _require("wandb", "wandb")
        import wandb

        run = run or wandb.run  # the run a trainer's own W&B integration opened, if any
        self.own = run is None
        self.run = run or wandb.init(project=project, name=name, dir=None if folder is None else str(folder),
                                     config=config, mode=mode, reinit="create_new")
        self.run.define_metric("tokens")
        self.run.define_metric("*", step_metric="tokens")

    def __call__(self, kind: str, row: dict) -> None:
        values = {k: v for k, v in scalars(kind, row).items() if math.isfinite(v)}
        if values:
            self.run.log({"tokens": _x(row), **values})

    def close(self) -> None:
        if self.own:
            self.run.finish()


class CSVSink(Sink):
    """The long format (`long_records`, columns LONG_COLUMNS) appended to a CSV file as rows arrive;
    the run row, when it comes first, fills the run, arm and seed columns."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        new = not self.path.exists() or self.path.stat().st_size == 0
        self.file = open(self.path, "a", newline="", encoding="utf-8")
        self.csv = csv.DictWriter(self.file, LONG_COLUMNS)
        if new:
            self.csv.writeheader()
        self.run: dict = {}

    def __call__(self, kind: str, row: dict) -> None:
        if kind == "run":
            self.run = row
        self.csv.writerows(long_records(kind, row, self.run))
        self.file.flush()

    def close(self) -> None:
        self.file.close()


SINKS = ("tensorboard", "wandb", "csv")


def open_sinks(names, folder: str | Path, run_name: str | None = None, config: dict | None = None) -> list[Sink]:
    """Sinks by name (`SINKS`) writing beside a run's metrics.jsonl in `folder`: tensorboard/, wandb/,
    metrics.csv. An object that is already a sink (any callable) is kept as it is."""
    from .config import UserError

    folder = Path(folder)
    out = []
    for s in names:
        if callable(s):
            out.append(s)
        elif s == "tensorboard":
            out.append(TensorBoardSink(folder / "tensorboard"))
        elif s == "wandb":
            out.append(WandbSink(name=run_name, folder=folder, config=config))
        elif s == "csv":
            out.append(CSVSink(folder / "metrics.csv"))
        else:
            raise UserError(f"unknown sink {s!r} (one of {', '.join(SINKS)}, or a callable (kind, row))")
    return out


def _require(module: str, extra: str) -> None:
    """UserError (one line, exit 2) naming the extra to install when an optional sink's package is missing."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise UserError(f"this sink needs the {module} package: pip install 'rankprobe[{extra}]' "
                        "(or make test, which installs requirements-dev.txt)")

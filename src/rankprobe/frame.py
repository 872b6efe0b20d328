"""Run folders as one long pandas DataFrame (`load`), back to rows (`to_rows`), and `export` to CSV,
Parquet or TensorBoard. Reads metrics files only (runfolder), so it needs no torch.

The long format has one line per number, in the columns of `sinks.LONG_COLUMNS`:
run, arm, seed, step, tokens, kind, tap, tensor, layer, head, metric, value. A per-head list
(`pr_heads`, `mean_norm`, …) becomes one line per head under its metric's name (`pr`, `mean_norm`)
with `head` 0, 1, …; a layer-level number has head missing. `tensor` holds q, k, v (probe rows) or
the matrix (weights, update rows). Strings, booleans and the run row itself are not numbers and stay
in metrics.jsonl; `to_rows` rebuilds every other row's numbers exactly.
"""

from __future__ import annotations

import math
from pathlib import Path

from .config import UserError
from .runfolder import METRICS_NAMES, read_rows, safe_name
from .sinks import LONG_COLUMNS, TensorBoardSink, long_records

FORMATS = ("csv", "parquet", "tensorboard")


def metrics_files(folder: str | Path) -> list[Path]:
    """Every run's metrics file under `folder` (itself a run folder or a sweep), one per run folder:
    the plain file where a compressed one sits beside it."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder")
    found: dict[Path, Path] = {}
    for name in reversed(METRICS_NAMES):  # the plain file, found last, wins
        for p in folder.rglob(name):
            found[p.parent] = p
    if not found:
        raise UserError(f"no metrics.jsonl under {folder}")
    return [found[k] for k in sorted(found)]


def records(folder: str | Path) -> list[dict]:
    """The long-format records of every run under `folder` (sinks.long_records)."""
    out = []
    for path in metrics_files(folder):
        rows = read_rows(path)
        run = rows[0] if rows and rows[0].get("kind") == "run" else {"run": path.parent.name}
        for row in rows:
            out += long_records(row.get("kind", ""), row, run)
    return out


def load(folder: str | Path):
    """Every run under `folder` as one long-format pandas DataFrame (columns sinks.LONG_COLUMNS;
    layer, head, step, tokens and seed as nullable integers, value as float64 with NaN for null)."""
    import pandas as pd

    df = pd.DataFrame.from_records(records(folder), columns=list(LONG_COLUMNS))
    for col in ("seed", "step", "tokens", "layer", "head"):
        df[col] = df[col].astype("Int64")
    df["value"] = df["value"].astype("float64")
    return df


def _plain(v):
    if v is None:
        return None
    try:
        import pandas as pd

        if pd.isna(v):
            return None
    except TypeError:
        pass
    return v.item() if hasattr(v, "item") else v


def to_rows(df) -> list[dict]:
    """The rows' numbers back from a `load` DataFrame: one dict per (run, kind, step, tap, tensor,
    layer) in first-seen order, with its identity fields, its layer-level metrics, and each per-head
    metric as a list under `<metric>_heads` (`mean_norm` under its own name). NaN comes back None."""
    rows: dict[tuple, dict] = {}
    for rec in df.itertuples(index=False):
        r = {c: _plain(getattr(rec, c)) for c in LONG_COLUMNS}
        key = tuple(r[c] for c in ("run", "kind", "step", "tokens", "tap", "tensor", "layer"))
        row = rows.setdefault(key, {c: r[c] for c in ("run", "kind", "step", "tokens", "tap", "tensor", "layer")})
        value = None if r["value"] is None or (isinstance(r["value"], float) and math.isnan(r["value"])) else r["value"]
        if r["head"] is None:
            row[r["metric"]] = value
        else:
            name = r["metric"] if r["metric"] == "mean_norm" else f"{r['metric']}_heads"
            row.setdefault(name, []).append(value)
    return list(rows.values())


def export(folder: str | Path, to: str, out: str | Path | None = None) -> Path:
    """Write the runs under `folder` as `to` (FORMATS): metrics.csv or metrics.parquet (the long
    format) in `out` (default: `folder`), or TensorBoard event files, one folder per run under
    out/tensorboard/<run>. Returns what it wrote."""
    if to not in FORMATS:
        raise UserError(f"--to {to}: one of {', '.join(FORMATS)}")
    files = metrics_files(folder)  # refuse a wrong folder before creating anything
    out = Path(out or folder)
    if to == "tensorboard":
        runs = [(path, read_rows(path)) for path in files]  # a corrupt file refused before anything is written
        out.mkdir(parents=True, exist_ok=True)
        target = out / "tensorboard"
        for path, rows in runs:
            name = rows[0].get("run") if rows and rows[0].get("kind") == "run" else path.parent.name
            sink = TensorBoardSink(target / (safe_name(str(name)) or "run"))  # a name from a file: '../x' stays inside
            for row in rows:
                sink(row.get("kind", ""), row)
            sink.close()
        return target
    df = load(folder)
    out.mkdir(parents=True, exist_ok=True)
    target = out / f"metrics.{to}"
    if to == "csv":
        df.to_csv(target, index=False)
    else:
        df.to_parquet(target, index=False)
    return target

"""Figures and `report.md` rebuilt from `metrics.jsonl` files alone (no torch, no training code).

`build_report(root)` finds every metrics.jsonl under `root`, draws the figures and writes report.md
next to them. The pieces: `metrics` (reading and seed aggregation), `figures` (PNGs), `markdown`.
"""

from __future__ import annotations

from pathlib import Path

from rankprobe.report.figures import build_figures
from rankprobe.report.markdown import write_report
from rankprobe.report.metrics import Run, find_runs, layer_pr, mean_ci, read_metrics, t_quantile


def build_report(root: str | Path, tap: str | None = None, *, out_dir: str | Path | None = None,
                 tensor: str = "k") -> Path:
    """Draw every figure and write report.md into `out_dir` (default: `root`); returns report.md's path.
    `tap` defaults to the runs' `probe.tap`. Unfinished runs are listed in the report, not drawn."""
    root = Path(root)
    runs = find_runs(root)
    out = Path(out_dir) if out_dir is not None else (root if root.is_dir() else root.parent)
    if any(r.finished for r in runs):
        build_figures(runs, out, tap, tensor)
    return write_report(root, out, tap, tensor=tensor, runs=runs)


__all__ = ["Run", "build_figures", "build_report", "find_runs", "layer_pr", "mean_ci", "read_metrics",
           "t_quantile", "write_report"]

"""Figures and `report.md` rebuilt from `metrics.jsonl` files alone (no torch, no training code).

`build_report(root)` finds every metrics.jsonl under `root`, draws the figures and writes report.md
next to them. Data flows one way through the modules:

    metrics   read metrics files into `Run`s; group finished runs into arms
    series    `ArmSeries`: one quantity of one arm stacked over seeds; every table and figure reads these
    stats     t intervals (`Estimate`) and Spearman, from scipy.stats
    findings  the study's four questions, answered from series
    mechanism questions 5-10 (why keys collapse), when the rows carry the mechanism lenses
    fmt       the one Markdown table and ± formatter, and the fixed prose (prose.toml)
    plot      the public drawing kit; figures: one function per PNG
    markdown  report.md; scan: scan.md of a learning-rate scan
"""

from __future__ import annotations

from pathlib import Path

from rankprobe.report.figures import build_figures
from rankprobe.report.markdown import write_report
from rankprobe.report.metrics import METRICS, Run, check_metric, find_runs, layer_pr, read_metrics
from rankprobe.report.stats import mean_ci, t_quantile


def build_report(root: str | Path, tap: str | None = None, *, metric: str | None = None,
                 out_dir: str | Path | None = None, tensor: str = "k") -> Path:
    """Draw every figure and write report.md into `out_dir` (default: `root`); returns report.md's path.
    `tap` defaults to the runs' `probe.tap`; `metric` (one of METRICS, default 'pr') is the spectral
    metric of the trajectory, layer comparison, heatmaps and headline table. Unfinished runs are listed
    in the report, not drawn; pretrained checkpoints are drawn and tabulated as references."""
    metric = check_metric(metric)
    root = Path(root)
    runs = find_runs(root)
    out = Path(out_dir) if out_dir is not None else (root if root.is_dir() else root.parent)
    figures = build_figures(runs, out, tap, tensor, metric) if any(r.finished for r in runs) else []
    return write_report(root, out, tap, tensor=tensor, metric=metric, runs=runs, figures=figures)


__all__ = ["METRICS", "Run", "build_figures", "build_report", "find_runs", "layer_pr", "mean_ci", "read_metrics",
           "t_quantile", "write_report"]

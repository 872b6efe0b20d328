"""Figures and `report.md` rebuilt from `metrics.jsonl` files alone (no torch, no training code).

`build_report(root)` finds every metrics.jsonl under `root`, draws the figures and writes report.md
next to them. Data flows one way through the modules:

    metrics   read metrics files into `Run`s; group finished runs into arms
    series    `ArmSeries`: one quantity of one arm stacked over seeds; `Study`: a report's arms, once;
              `Estimate` (t intervals), Spearman (scipy.stats) and the rule that calls a difference resolved
    findings  the study's four questions; mechanism: questions 5-10 (why keys collapse)
    fmt       the one Markdown table and ± formatter, and the fixed prose (prose.toml)
    figures   the drawing kit, then one function per PNG
    markdown  report.md; scan: scan.md of a learning-rate scan
"""

from __future__ import annotations

from pathlib import Path

from rankprobe.report.figures import build_figures
from rankprobe.report.markdown import write_report
from rankprobe.report.metrics import METRICS, Run, find_runs, layer_pr, read_metrics
from rankprobe.report.series import Study, mean_ci, t_quantile


def build_report(root: str | Path, tap: str | None = None, *, metric: str | None = None,
                 out_dir: str | Path | None = None, tensor: str = "k") -> Path:
    """Draw every figure and write report.md into `out_dir` (default: `root`); returns report.md's path.
    `tap` defaults to the runs' `probe.tap`; `metric` (one of METRICS, default 'pr') is the spectral
    metric of the trajectory, layer comparison, heatmaps and headline table. Unfinished runs are listed
    in the report, not drawn; pretrained checkpoints are drawn and tabulated as references."""
    root = Path(root)
    study = Study(find_runs(root), tap, tensor, metric)
    out = Path(out_dir) if out_dir is not None else (root if root.is_dir() else root.parent)
    figures = build_figures(study, out) if study.groups else []
    return write_report(study, root, out, figures)


__all__ = ["METRICS", "Run", "Study", "build_figures", "build_report", "find_runs", "layer_pr", "mean_ci",
           "read_metrics", "t_quantile", "write_report"]

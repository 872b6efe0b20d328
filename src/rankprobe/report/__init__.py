"""Figures and `report.md` rebuilt from `metrics.jsonl` files alone (no torch, no training code).

`build_report(root)` finds every metrics.jsonl under `root`, draws the figures and writes report.md
next to them. The pieces: `metrics` (reading and seed aggregation of the key spectra), `stats`
(t intervals), `lenses` (attention and weight rows), `figures` and `lens_figures` (PNGs), `markdown`.
"""

from __future__ import annotations

from pathlib import Path

from rankprobe.report.figures import head_heatmaps, heatmaps, layer_comparison, loss_curves, pr_trajectory
from rankprobe.report.lens_figures import attention_entropy, max_logit, weight_spectra
from rankprobe.report.markdown import write_report
from rankprobe.report.metrics import METRICS, Run, check_metric, find_runs, layer_pr, read_metrics
from rankprobe.report.stats import mean_ci, t_quantile


def build_figures(runs: list[Run], out_dir: str | Path, tap: str | None = None, tensor: str = "k",
                  metric: str | None = None) -> list[Path]:
    """Every figure of the report for `metric` (default 'pr'); returns the written paths. Figures whose
    rows are absent (attention, weights, or a trained arm for the trajectories) are not written."""
    paths = [
        pr_trajectory(runs, out_dir, tap, tensor, metric),
        layer_comparison(runs, out_dir, tap, tensor, metric),
        *heatmaps(runs, out_dir, tap, tensor, metric),
        *head_heatmaps(runs, out_dir, tap, tensor, metric),
        loss_curves(runs, out_dir),
        attention_entropy(runs, out_dir),
        max_logit(runs, out_dir),
        weight_spectra(runs, out_dir),
    ]
    return [p for p in paths if p is not None]


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

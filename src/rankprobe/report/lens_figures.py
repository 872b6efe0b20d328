"""Figures of the attention and weight lenses, from `attn` and `weights` rows (docs/lenses.md).

Each returns None (and writes nothing) when no trained arm has the rows, so reports of runs written
before the lenses look as they did. Trained arms are seed means with 95% bands; pretrained references
are dash-dot lines, as in `figures`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rankprobe.report.figures import (
    _context, _finish, _layer_lines, _legend_right, _new, _save, _token_axis, _trajectory_lines, fmt_tokens,
)
from rankprobe.report.lenses import arm_final_layers, lens_series
from rankprobe.report.metrics import Run, finished_by_arm
from rankprobe.report.stats import mean_ci

LOG_RANGE = 30.0
"""max logit is drawn on a log axis when its largest value is this many times its smallest (all > 0)"""


def _lens_trajectory(runs: list[Run], series: dict, ylabel: str, title: str):
    """Lines of `series` (ArmSeries per arm) vs tokens; (figure, axes) or None without a trained arm."""
    ctx = _context(runs, None)
    fig, ax = _new()
    tokens = _trajectory_lines(ax, ctx, series)
    if tokens is None:
        return None
    _token_axis(ax, tokens)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    return fig, ax


def attention_entropy(runs: list[Run], out_dir: str | Path) -> Path | None:
    """attention_entropy.png: normalised attention entropy (mean over layers, heads and query rows) vs
    tokens; 1 = uniform over the visible keys, 0 = every query reads one key."""
    series = lens_series(runs, "attn", "entropy_norm", "mean")
    drawn = _lens_trajectory(runs, series, "attention entropy / log(visible keys), mean over layers",
                             "Normalised attention entropy on the probe set (band = 95% CI over seeds)")
    if drawn is None:
        return None
    fig, ax = drawn
    ax.axhline(1.0, color="black", linestyle=":", linewidth=1.2, label="uniform over visible keys")
    ax.set_ylim(0, 1.04)
    _legend_right(ax)
    return _save(fig, Path(out_dir) / "attention_entropy.png")


def max_logit(runs: list[Run], out_dir: str | Path) -> Path | None:
    """max_logit.png: the largest scaled pre-softmax logit q·k/√D (max over layers and heads) vs tokens,
    on a log axis when it spans more than LOG_RANGE× and stays positive."""
    series = lens_series(runs, "attn", "max_logit", "max")
    drawn = _lens_trajectory(runs, series, "max logit q·k/√D (max over layers and heads)",
                             "Largest pre-softmax attention logit on the probe set (band = 95% CI over seeds)")
    if drawn is None:
        return None
    fig, ax = drawn
    means = np.concatenate([s.trajectory()[0] for s in series.values()])
    means = means[np.isfinite(means)]
    if means.size and means.min() > 0 and means.max() / means.min() > LOG_RANGE:
        top = ax.get_ylim()[1]
        ax.set_yscale("log")
        # a band reaching below 0 (two seeds: t = 12.7) would stretch the axis down by decades
        ax.set_ylim(means.min() / 2, max(top, means.max() * 1.5))
    _legend_right(ax)
    return _save(fig, Path(out_dir) / "max_logit.png")


def weight_spectra(runs: list[Run], out_dir: str | Path) -> Path | None:
    """weight_spectra.png: stable rank ‖W_k‖_F²/‖W_k‖₂² per layer at each arm's final checkpoint (band
    across seeds); references dash-dot, at relative depth when their layer count differs."""
    ctx = _context(runs, None)
    layers = {}
    for arm, group in finished_by_arm(runs).items():
        found = arm_final_layers(group, "weights", "stable_rank", matrix="k")
        if found is None:
            continue
        tokens, values = found
        mean, half = mean_ci(values, axis=0)
        ref, n = group[0].reference, len(group)
        label = (f"{arm} (pretrained)" if ref
                 else f"{arm} ({n} seed{'s' if n != 1 else ''}) at {fmt_tokens(tokens)} tokens")
        layers[arm] = (mean, half, label, ref)
    if not any(not ref for *_, ref in layers.values()):
        return None
    fig, ax = _new()
    _layer_lines(ax, ctx, layers)
    ax.set_ylim(bottom=0)
    return _finish(fig, ax, "W_k stable rank",
                   "Stable rank of W_k per layer at the final checkpoint (band = 95% CI over seeds)",
                   Path(out_dir) / "weight_spectra.png")

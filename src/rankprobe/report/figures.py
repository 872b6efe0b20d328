"""The report's figures, each a function that writes one PNG from runs and returns its path.

Figures are drawn on matplotlib's Agg canvas directly (no pyplot, no display, no global backend
switch). Every arm keeps one colour across figures; PR plots draw head_dim (the PR ceiling) as a
dotted line and the dead threshold `probe.dead_pr` as a dashed line. Token axes are symlog: linear
between 0 (initialization) and the first checkpoint, logarithmic above it, so init sits at a true 0.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

from rankprobe.report.metrics import (
    ArmPR, Run, aggregate, arm_key, default_tap, finished_by_arm, mean_ci, train_loss, val_loss,
)

ARM_COLOURS = {"adamw": "#1f77b4", "adamw+qknorm": "#17becf", "muon": "#d62728", "muon+qknorm": "#ff7f0e"}
_EXTRA_COLOURS = ["#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#7f7f7f"]
TENSOR_NAME = {"k": "key", "q": "query", "v": "value"}
DPI = 120


def arm_colour(arm: str, arms: list[str]) -> str:
    """Fixed colours for the four canonical arms; others take the next free colour in arm order."""
    if arm in ARM_COLOURS:
        return ARM_COLOURS[arm]
    extra = sorted((a for a in arms if a not in ARM_COLOURS), key=arm_key)
    return _EXTRA_COLOURS[extra.index(arm) % len(_EXTRA_COLOURS)]


def _marker(arm: str) -> str:
    return "s" if "qknorm" in arm else "o"


def fmt_tokens(n: float) -> str:
    """16384 -> '16k', 1_000_000 -> '1M', 2.5e9 -> '2.5B'."""
    n = float(n)
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.3g}{unit}"
    return f"{n:.0f}"


def heatmap_name(arm: str) -> str:
    """File name of an arm's heatmap; characters other than letters, digits, '+', '-', '_' become '_'."""
    return f"heatmap_{re.sub(r'[^A-Za-z0-9+_-]', '_', arm)}.png"


def _new(width: float = 9.0, height: float = 4.8):
    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    return path


def _token_axis(ax, tokens: np.ndarray, label: str = "training tokens") -> None:
    """Symlog x axis: linear from 0 (init) up to the first positive token count, log above it."""
    positive = tokens[tokens > 0]
    if positive.size == 0:
        ax.set_xlabel(label)
        return
    lo, hi = float(positive.min()), float(tokens.max())
    ax.set_xscale("symlog", linthresh=lo, linscale=0.5)
    decades = [10.0 ** k for k in range(int(np.ceil(np.log10(lo))), int(np.floor(np.log10(hi))) + 1)]
    ticks = sorted({0.0, lo, *decades} if len(decades) >= 2 else {0.0, lo, *decades, hi})
    ticks = [t for i, t in enumerate(ticks) if i == 0 or t > 1.6 * ticks[i - 1] or t == lo]
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: "init" if x == 0 else fmt_tokens(x)))
    ax.set_xlim(-0.08 * lo, hi * 1.25)
    ax.set_xlabel(f"{label} (log scale above {fmt_tokens(lo)}; 0 = initialization)")


def _pr_guides(ax, head_dim: int, dead_pr: float) -> None:
    ax.axhline(head_dim, color="black", linestyle=":", linewidth=1.2, label=f"head_dim = {head_dim} (ceiling)")
    ax.axhline(dead_pr, color="dimgray", linestyle="--", linewidth=1.0, label=f"dead below {dead_pr:g}")
    ax.set_ylim(0, head_dim * 1.06)


def _context(runs: list[Run], tap: str | None) -> tuple[str, int, float, list[str]]:
    finished = [r for r in runs if r.finished] or runs
    tap = tap or default_tap(finished)
    head_dim = max(r.head_dim for r in finished)
    dead_pr = finished[0].dead_pr
    return tap, head_dim, dead_pr, list(finished_by_arm(runs))


def _label(pr: ArmPR) -> str:
    return f"{pr.arm} ({pr.n_seeds} seed{'s' if pr.n_seeds != 1 else ''})"


def _legend_right(ax) -> None:
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)


def _band(ax, x, mean, half, colour) -> None:
    if np.isfinite(half).any():
        ax.fill_between(x, mean - half, mean + half, color=colour, alpha=0.2, linewidth=0)


def pr_trajectory(runs: list[Run], out_dir: str | Path, tap: str | None = None, tensor: str = "k") -> Path:
    """pr_trajectory.png: mean key PR over layers vs tokens, one line per arm with a 95% band."""
    tap, head_dim, dead_pr, arms = _context(runs, tap)
    fig, ax = _new()
    all_tokens = []
    for arm, pr in aggregate(runs, tap, tensor).items():
        mean, half = pr.trajectory()
        c = arm_colour(arm, arms)
        ax.plot(pr.tokens, mean, color=c, marker=_marker(arm), markersize=4, label=_label(pr))
        _band(ax, pr.tokens, mean, half, c)
        all_tokens.append(pr.tokens)
    _pr_guides(ax, head_dim, dead_pr)
    _token_axis(ax, np.concatenate(all_tokens).astype(float))
    name = TENSOR_NAME.get(tensor, tensor)
    ax.set_ylabel(f"{name} PR, mean over layers")
    ax.set_title(f"{name.capitalize()} participation ratio during training (tap={tap}; band = 95% CI over seeds)",
                 fontsize=10)
    ax.grid(alpha=0.3)
    _legend_right(ax)
    return _save(fig, Path(out_dir) / "pr_trajectory.png")


def layer_comparison(runs: list[Run], out_dir: str | Path, tap: str | None = None, tensor: str = "k") -> Path:
    """layer_comparison.png: PR per layer at each arm's final checkpoint, band across seeds."""
    tap, head_dim, dead_pr, arms = _context(runs, tap)
    fig, ax = _new()
    n_layer = 0
    for arm, pr in aggregate(runs, tap, tensor).items():
        mean, half = pr.layers_at(-1)
        layers = np.arange(mean.size)
        n_layer = max(n_layer, mean.size)
        c = arm_colour(arm, arms)
        ax.plot(layers, mean, color=c, marker=_marker(arm), markersize=4,
                label=f"{_label(pr)} at {fmt_tokens(pr.tokens[-1])} tokens")
        _band(ax, layers, mean, half, c)
    _pr_guides(ax, head_dim, dead_pr)
    ax.set_xticks(range(0, n_layer, max(1, n_layer // 16)))
    ax.set_xlim(-0.3, n_layer - 0.7)
    ax.set_xlabel("layer (0 = nearest the embedding)")
    name = TENSOR_NAME.get(tensor, tensor)
    ax.set_ylabel(f"{name} PR (mean over heads)")
    ax.set_title(f"{name.capitalize()} PR per layer at the final checkpoint (tap={tap}; band = 95% CI over seeds)",
                 fontsize=10)
    ax.grid(alpha=0.3)
    _legend_right(ax)
    return _save(fig, Path(out_dir) / "layer_comparison.png")


def heatmaps(runs: list[Run], out_dir: str | Path, tap: str | None = None, tensor: str = "k") -> list[Path]:
    """heatmap_<arm>.png per arm: seed-mean PR over (layer, checkpoint), shared scale [0, head_dim]."""
    tap, head_dim, _, _ = _context(runs, tap)
    paths = []
    for arm, pr in aggregate(runs, tap, tensor).items():
        grid = pr.seed_mean().T  # (L, C)
        n_layer, n_ckpt = grid.shape
        fig, ax = _new(max(5.0, 1.6 + 0.55 * n_ckpt), max(3.5, 1.4 + 0.3 * n_layer))
        im = ax.imshow(grid, origin="lower", aspect="auto", cmap="viridis", vmin=0, vmax=head_dim,
                       interpolation="nearest")
        if n_layer * n_ckpt <= 400:
            for (i, j), v in np.ndenumerate(grid):
                if np.isfinite(v):
                    ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=7,
                            color="black" if v > 0.6 * head_dim else "white")
        ax.set_xticks(range(n_ckpt), ["init" if t == 0 else fmt_tokens(t) for t in pr.tokens],
                      rotation=45 if n_ckpt > 6 else 0, fontsize=8)
        ax.set_yticks(range(0, n_layer, max(1, n_layer // 24)))
        ax.set_xlabel("checkpoint (training tokens)")
        ax.set_ylabel("layer")
        name = TENSOR_NAME.get(tensor, tensor)
        ax.set_title(f"{arm}: {name} PR by layer and checkpoint\n(tap={tap}, mean of {_label(pr)[len(arm) + 2:-1]})",
                     fontsize=10)
        fig.colorbar(im, ax=ax, label=f"{name} PR (0 to head_dim = {head_dim})")
        paths.append(_save(fig, Path(out_dir) / heatmap_name(arm)))
    return paths


def smooth(y: np.ndarray, window: int) -> np.ndarray:
    """Centred moving average that ignores NaNs (no lag, unlike an EMA). The half-window grows with
    the index, at most 10% of it, so on a log token axis early points are not averaged across
    decades: near-constant width in log tokens when rows are logged at a fixed token interval."""
    ok = np.isfinite(y)
    cs = np.concatenate([[0.0], np.cumsum(np.where(ok, y, 0.0))])
    cn = np.concatenate([[0], np.cumsum(ok)])
    i = np.arange(y.size)
    h = np.minimum(max(0, window // 2), (0.1 * i).astype(int))
    lo, hi = np.maximum(0, i - h), np.minimum(y.size, i + h + 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (cs[hi] - cs[lo]) / (cn[hi] - cn[lo])


def _seed_mean_series(series: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Mean over seeds at the token counts every seed logged."""
    common = sorted(set.intersection(*(set(t.tolist()) for t, _ in series)))
    lookups = [dict(zip(t.tolist(), y.tolist())) for t, y in series]
    stacked = np.array([[lookup[c] for c in common] for lookup in lookups], dtype=float).reshape(len(series), -1)
    return np.array(common, dtype=float), stacked


def loss_curves(runs: list[Run], out_dir: str | Path) -> Path:
    """loss_curves.png: lightly smoothed train loss vs tokens and val-loss points per arm (seed means)."""
    arms = finished_by_arm(runs)
    names = list(arms)
    fig, ax = _new()
    all_tokens = []
    for arm, group in arms.items():
        c = arm_colour(arm, names)
        tokens, losses = _seed_mean_series([train_loss(r) for r in group])
        if tokens.size:
            mean = losses.mean(axis=0)
            ax.plot(tokens, mean, color=c, alpha=0.2, linewidth=0.8)
            ax.plot(tokens, smooth(mean, max(1, tokens.size // 50)), color=c, linewidth=1.6,
                    label=f"{arm} train ({len(group)} seed{'s' if len(group) != 1 else ''})")
            all_tokens.append(tokens)
        vt, vl = _seed_mean_series([val_loss(r) for r in group])
        if vt.size:
            vmean, vhalf = mean_ci(vl, axis=0)
            ax.errorbar(vt, vmean, yerr=np.nan_to_num(vhalf), color=c, marker=_marker(arm), markersize=5,
                        linestyle="none", markeredgecolor="black", markeredgewidth=0.6, capsize=2,
                        label=f"{arm} val")
            all_tokens.append(vt)
    if all_tokens:
        _token_axis(ax, np.concatenate(all_tokens))
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("Training loss (smoothed; faint = raw seed mean) and validation loss (points, 95% CI)",
                 fontsize=10)
    ax.grid(alpha=0.3)
    _legend_right(ax)
    return _save(fig, Path(out_dir) / "loss_curves.png")


def build_figures(runs: list[Run], out_dir: str | Path, tap: str | None = None, tensor: str = "k") -> list[Path]:
    """Every figure of the report; returns the written paths."""
    return [
        pr_trajectory(runs, out_dir, tap, tensor),
        layer_comparison(runs, out_dir, tap, tensor),
        *heatmaps(runs, out_dir, tap, tensor),
        loss_curves(runs, out_dir),
    ]

"""The report's figures, each a function that writes one PNG from runs and returns its path.

Figures are drawn on matplotlib's Agg canvas directly (no pyplot, no display, no global backend
switch). Every arm keeps one colour across figures. Spectral plots draw one metric (`metric`: PR by
default, or erank, stable rank, RankMe), with head_dim as a dotted line, the metric's isotropic null
for the probe set as a long-dashed line, and (PR only) the dead threshold `probe.dead_pr` dashed.
Pretrained references (`Run.reference`) are dash-dot lines in their own colours, never a point at
"init". Token axes are symlog: linear between 0 (initialization) and the first checkpoint,
logarithmic above it, so init sits at a true 0.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

from rankprobe.report.metrics import (
    METRIC_NAME, ArmPR, Run, aggregate, arm_key, check_metric, default_tap, finished_by_arm, train_loss, val_loss,
)
from rankprobe.report.stats import mean_ci

ARM_COLOURS = {"adamw": "#1f77b4", "adamw+qknorm": "#17becf", "muon": "#d62728", "muon+qknorm": "#ff7f0e"}
_EXTRA_COLOURS = ["#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#7f7f7f"]
_REFERENCE_COLOURS = ["#000000", "#7f7f7f", "#8c564b", "#bcbd22"]
TENSOR_NAME = {"k": "key", "q": "query", "v": "value"}
DPI = 120
NULL_STYLE = {"color": "black", "linestyle": (0, (10, 3)), "linewidth": 0.9}  # long dashes
REFERENCE_STYLE = {"linestyle": "-.", "linewidth": 1.6}


def arm_colour(arm: str, arms: list[str], references=()) -> str:
    """Fixed colours for the four canonical arms; other trained arms take the next free colour in arm
    order; pretrained references (named in `references`) take colours from a palette of their own."""
    if arm in references:
        return _REFERENCE_COLOURS[[a for a in arms if a in references].index(arm) % len(_REFERENCE_COLOURS)]
    if arm in ARM_COLOURS:
        return ARM_COLOURS[arm]
    extra = sorted((a for a in arms if a not in ARM_COLOURS and a not in references), key=arm_key)
    return _EXTRA_COLOURS[extra.index(arm) % len(_EXTRA_COLOURS)]


def _marker(arm: str) -> str:
    return "s" if "qknorm" in arm else "^" if "qkclip" in arm else "o"


def fmt_tokens(n: float) -> str:
    """16384 -> '16k', 1_000_000 -> '1M', 2.5e9 -> '2.5B'."""
    n = float(n)
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.3g}{unit}"
    return f"{n:.0f}"


def _safe(arm: str) -> str:
    return re.sub(r"[^A-Za-z0-9+_-]", "_", arm)


def heatmap_name(arm: str) -> str:
    """File name of an arm's heatmap; characters other than letters, digits, '+', '-', '_' become '_'."""
    return f"heatmap_{_safe(arm)}.png"


def heads_name(arm: str) -> str:
    """File name of an arm's layer × head heatmap (same character rule as `heatmap_name`)."""
    return f"heads_{_safe(arm)}.png"


def metric_label(tensor: str, metric: str) -> str:
    """'key PR', 'key erank', 'query stable rank', ..."""
    return f"{TENSOR_NAME.get(tensor, tensor)} {METRIC_NAME.get(metric, metric)}"


def _new(width: float = 9.0, height: float = 4.8):
    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _finish(fig, ax, ylabel: str, title: str, path: Path) -> Path:
    """Label, grid, legend outside on the right, save: the common end of every line figure."""
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    _legend_right(ax)
    return _save(fig, path)


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


@dataclass
class _Context:
    """What every spectral figure needs: the tap, tensor and metric drawn, and the arms."""

    tap: str
    tensor: str
    metric: str
    head_dim: int
    """of the trained arms (the largest, if they differ)"""
    dead_pr: float
    arms: list[str]
    references: set[str]
    head_dims: dict[str, int]
    """per arm"""

    def colour(self, arm: str) -> str:
        return arm_colour(arm, self.arms, self.references)

    @property
    def label(self) -> str:
        return metric_label(self.tensor, self.metric)


def _context(runs: list[Run], tap: str | None, tensor: str = "k", metric: str | None = None) -> _Context:
    finished = [r for r in runs if r.finished] or runs
    trained = [r for r in finished if not r.reference] or finished
    arms = finished_by_arm(runs)
    return _Context(tap=tap or default_tap(finished), tensor=tensor, metric=check_metric(metric),
                    head_dim=max(r.head_dim for r in trained), dead_pr=trained[0].dead_pr, arms=list(arms),
                    references={a for a, g in arms.items() if g[0].reference},
                    head_dims={a: max(r.head_dim for r in g) for a, g in arms.items()})


def _nulls(prs: list[ArmPR]) -> list[tuple[float, int]]:
    """Distinct (null, probe tokens N) over the checkpoints of the trained arms (else the references)."""
    drawn = [p for p in prs if not p.reference] or prs
    return sorted({(round(float(v), 2), int(n)) for p in drawn if p.null is not None
                   for v, n in zip(p.null, p.n_probe) if np.isfinite(v) and np.isfinite(n)})


def _guides(ax, ctx: _Context, prs: list[ArmPR]) -> None:
    """head_dim (dotted; a reference with another head_dim gets its own, in its colour), the null of the
    trained arms' probe sets (long dashes), the dead threshold (PR only); y from 0 to above them all."""
    ax.axhline(ctx.head_dim, color="black", linestyle=":", linewidth=1.2, label=f"head_dim = {ctx.head_dim}")
    tops = [ctx.head_dim]
    for pr in prs:
        d = ctx.head_dims.get(pr.arm, ctx.head_dim)
        if pr.reference and d != ctx.head_dim:
            ax.axhline(d, color=ctx.colour(pr.arm), linestyle=":", linewidth=1.2, label=f"head_dim = {d} ({pr.arm})")
            tops.append(d)
        tops.append(float(np.nanmax(pr.values, initial=0.0)))
    for value, n in _nulls(prs):
        ax.axhline(value, **NULL_STYLE, label=f"isotropic null, {n:,} tokens ({value:.1f})")
    if ctx.metric == "pr":
        ax.axhline(ctx.dead_pr, color="dimgray", linestyle="--", linewidth=1.0, label=f"dead below {ctx.dead_pr:g}")
    ax.set_ylim(0, max(tops) * 1.06)


def _label(pr) -> str:
    if pr.reference:
        return f"{pr.arm} (pretrained)"
    return f"{pr.arm} ({pr.n_seeds} seed{'s' if pr.n_seeds != 1 else ''})"


def _legend_right(ax) -> None:
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)


def _band(ax, x, mean, half, colour) -> None:
    if np.isfinite(half).any():
        ax.fill_between(x, mean - half, mean + half, color=colour, alpha=0.2, linewidth=0)


def _trajectory_lines(ax, ctx: _Context, series: dict) -> np.ndarray | None:
    """Trained arms as seed-mean lines with 95% bands vs tokens, references as dash-dot horizontal
    lines at their one value; returns the tokens drawn (None when no trained arm has data)."""
    tokens = []
    for arm, s in series.items():
        mean, half = s.trajectory()
        if s.reference:
            ax.axhline(float(mean[-1]), color=ctx.colour(arm), **REFERENCE_STYLE, label=_label(s))
            continue
        c = ctx.colour(arm)
        ax.plot(s.tokens, mean, color=c, marker=_marker(arm), markersize=4, label=_label(s))
        _band(ax, s.tokens, mean, half, c)
        tokens.append(s.tokens)
    return np.concatenate(tokens).astype(float) if tokens else None


def pr_trajectory(runs: list[Run], out_dir: str | Path, tap: str | None = None, tensor: str = "k",
                  metric: str | None = None) -> Path | None:
    """pr_trajectory.png: the metric's mean over layers vs tokens, one line per trained arm with a 95%
    band, pretrained references as dash-dot lines. None (nothing drawn) without a trained arm."""
    ctx = _context(runs, tap, tensor, metric)
    prs = aggregate(runs, ctx.tap, tensor, ctx.metric)
    fig, ax = _new()
    tokens = _trajectory_lines(ax, ctx, prs)
    if tokens is None:
        return None
    _guides(ax, ctx, list(prs.values()))
    _token_axis(ax, tokens)
    return _finish(fig, ax, f"{ctx.label}, mean over layers",
                   f"{ctx.label[0].upper() + ctx.label[1:]} during training (tap={ctx.tap}; band = 95% CI over seeds)",
                   Path(out_dir) / "pr_trajectory.png")


def _layer_lines(ax, ctx: _Context, layers: dict[str, tuple[np.ndarray, np.ndarray, str, bool]]) -> int:
    """Per arm (mean (L,), half (L,), label, reference): trained arms on the layer axis; a reference
    with another layer count at relative depth, its layer i at i·(L−1)/(L_ref−1) (L: the trained
    arms' layer count), so first and last layers line up. Returns L."""
    trained = [m.size for m, _, _, ref in layers.values() if not ref]
    n_layer = max(trained or [m.size for m, _, _, _ in layers.values()])
    for arm, (mean, half, label, ref) in layers.items():
        c = ctx.colour(arm)
        if ref:
            x = np.arange(mean.size) if mean.size == n_layer else np.linspace(0, n_layer - 1, mean.size)
            note = "" if mean.size == n_layer else f", {mean.size} layers at relative depth"
            ax.plot(x, mean, color=c, **REFERENCE_STYLE, label=f"{label[:-1]}{note})")
            continue
        x = np.arange(mean.size)
        ax.plot(x, mean, color=c, marker=_marker(arm), markersize=4, label=label)
        _band(ax, x, mean, half, c)
    ax.set_xticks(range(0, n_layer, max(1, n_layer // 16)))
    ax.set_xlim(-0.3, n_layer - 0.7)
    ax.set_xlabel("layer (0 = nearest the embedding)")
    return n_layer


def layer_comparison(runs: list[Run], out_dir: str | Path, tap: str | None = None, tensor: str = "k",
                     metric: str | None = None) -> Path:
    """layer_comparison.png: the metric per layer at each arm's final checkpoint, band across seeds;
    pretrained references dash-dot (at relative depth when their layer count differs)."""
    ctx = _context(runs, tap, tensor, metric)
    prs = aggregate(runs, ctx.tap, tensor, ctx.metric)
    fig, ax = _new()
    _layer_lines(ax, ctx, {arm: (*pr.layers_at(-1), _label(pr) if pr.reference else
                                 f"{_label(pr)} at {fmt_tokens(pr.tokens[-1])} tokens", pr.reference)
                           for arm, pr in prs.items()})
    _guides(ax, ctx, list(prs.values()))
    return _finish(fig, ax, f"{ctx.label} (mean over heads)",
                   f"{ctx.label[0].upper() + ctx.label[1:]} per layer at the final checkpoint (tap={ctx.tap}; "
                   "band = 95% CI over seeds)", Path(out_dir) / "layer_comparison.png")


def _grid_figure(grid: np.ndarray, vmax: float, xticks: list[str], xlabel: str, title: str, cbar: str):
    """A (rows = layers) × (columns) heatmap on [0, vmax], annotated when small enough to read."""
    n_layer, n_col = grid.shape
    fig, ax = _new(max(5.0, 1.6 + 0.55 * n_col), max(3.5, 1.4 + 0.3 * n_layer))
    im = ax.imshow(grid, origin="lower", aspect="auto", cmap="viridis", vmin=0, vmax=vmax, interpolation="nearest")
    if n_layer * n_col <= 400:
        for (i, j), v in np.ndenumerate(grid):
            if np.isfinite(v):
                ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=7,
                        color="black" if v > 0.6 * vmax else "white")
    step = max(1, n_col // 32)
    ax.set_xticks(range(0, n_col, step), xticks[::step], rotation=45 if n_col > 6 else 0, fontsize=8)
    ax.set_yticks(range(0, n_layer, max(1, n_layer // 24)))
    ax.set_xlabel(xlabel)
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, label=cbar)
    return fig


def heatmaps(runs: list[Run], out_dir: str | Path, tap: str | None = None, tensor: str = "k",
             metric: str | None = None) -> list[Path]:
    """heatmap_<arm>.png per trained arm: seed-mean metric over (layer, checkpoint) on [0, head_dim]."""
    ctx = _context(runs, tap, tensor, metric)
    paths = []
    for arm, pr in aggregate(runs, ctx.tap, tensor, ctx.metric).items():
        if pr.reference:
            continue
        fig = _grid_figure(pr.seed_mean().T, ctx.head_dim, ["init" if t == 0 else fmt_tokens(t) for t in pr.tokens],
                           "checkpoint (training tokens)",
                           f"{arm}: {ctx.label} by layer and checkpoint\n(tap={ctx.tap}, mean of "
                           f"{_label(pr)[len(arm) + 2:-1]})", f"{ctx.label} (0 to head_dim = {ctx.head_dim})")
        paths.append(_save(fig, Path(out_dir) / heatmap_name(arm)))
    return paths


def head_heatmaps(runs: list[Run], out_dir: str | Path, tap: str | None = None, tensor: str = "k",
                  metric: str | None = None) -> list[Path]:
    """heads_<arm>.png per arm (references too) whose rows carry per-head values: the seed-mean metric
    of every (layer, head) at the final checkpoint, on [0, the arm's head_dim]."""
    ctx = _context(runs, tap, tensor, metric)
    paths = []
    for arm, pr in aggregate(runs, ctx.tap, tensor, ctx.metric).items():
        if pr.heads is None:
            continue
        grid = pr.heads.mean(axis=0)  # (L, H)
        head_dim = ctx.head_dims[arm] or ctx.head_dim
        when = ("pretrained, as loaded" if pr.reference
                else f"at {fmt_tokens(pr.tokens[-1])} tokens, mean of {_label(pr)[len(arm) + 2:-1]}")
        fig = _grid_figure(grid, head_dim, [str(h) for h in range(grid.shape[1])],
                           f"{TENSOR_NAME.get(tensor, tensor)} head",
                           f"{arm}: {ctx.label} per head (tap={ctx.tap})\n{when}",
                           f"{ctx.label} (0 to head_dim = {head_dim})")
        paths.append(_save(fig, Path(out_dir) / heads_name(arm)))
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


def loss_curves(runs: list[Run], out_dir: str | Path) -> Path | None:
    """loss_curves.png: lightly smoothed train loss vs tokens and val-loss points per trained arm (seed
    means). None without a trained arm (pretrained references have no losses)."""
    everything = finished_by_arm(runs)
    names, references = list(everything), {a for a, g in everything.items() if g[0].reference}
    arms = {a: g for a, g in everything.items() if a not in references  # a probed checkpoint series has no losses
            and any(train_loss(r)[0].size or val_loss(r)[0].size for r in g)}
    if not arms:
        return None
    fig, ax = _new()
    all_tokens = []
    for arm, group in arms.items():
        c = arm_colour(arm, names, references)
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
    return _finish(fig, ax, "loss (nats/token)",
                   "Training loss (smoothed; faint = raw seed mean) and validation loss (points, 95% CI)",
                   Path(out_dir) / "loss_curves.png")


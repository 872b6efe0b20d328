"""The drawing kit every report figure is built from (public, so each figure is a short function).

Figures are drawn on matplotlib's Agg canvas directly (no pyplot, no display, no global backend
switch). Every arm keeps one colour across figures; pretrained references (`Run.reference`) are
dash-dot lines in colours of their own, never a point at "init". Token axes are symlog: linear between
0 (initialization) and the first checkpoint, logarithmic above it, so init sits at a true 0.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

from rankprobe.report.fmt import fmt_tokens
from rankprobe.report.metrics import arm_key
from rankprobe.report.series import ArmSeries, Study
from rankprobe.runfolder import atomic_file

ARM_COLOURS = {"adamw": "#1f77b4", "adamw+qknorm": "#17becf", "muon": "#d62728", "muon+qknorm": "#ff7f0e"}
_EXTRA_COLOURS = ["#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#7f7f7f"]
_REFERENCE_COLOURS = ["#000000", "#7f7f7f", "#8c564b", "#bcbd22"]
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


def marker(arm: str) -> str:
    return "s" if "qknorm" in arm else "^" if "qkclip" in arm else "o"


def arm_figure(prefix: str, arm: str) -> str:
    """An arm's own figure, 'heatmap_<arm>.png' or 'heads_<arm>.png'; characters other than letters,
    digits, '+', '-', '_' in the arm become '_'."""
    return f"{prefix}_{re.sub(r'[^A-Za-z0-9+_-]', '_', arm)}.png"


def colour(study: Study, arm: str) -> str:
    """`arm_colour` among the study's finished arms."""
    return arm_colour(arm, list(study.groups), study.refs)


def new_axes(width: float = 9.0, height: float = 4.8):
    """(figure, axes) on an Agg canvas."""
    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def save(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    with atomic_file(path) as tmp:  # never written through a link planted under the figure's name
        fig.savefig(tmp, dpi=DPI, bbox_inches="tight", format=path.suffix.lstrip(".") or "png")
    return path


def finish(fig, ax, ylabel: str, title: str, path: Path) -> Path:
    """Label, grid, legend outside on the right, save: the common end of every line figure."""
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    return save(fig, path)


def token_axis(ax, tokens: np.ndarray, label: str = "training tokens") -> None:
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


def seeds_label(arm: str, n: int) -> str:
    return f"{arm} ({n} seed{'s' if n != 1 else ''})"


def series_label(s: ArmSeries) -> str:
    return f"{s.arm} (pretrained)" if s.reference else seeds_label(s.arm, s.n_seeds)


def band(ax, x, mean, half, colour) -> None:
    """The 95% band over seeds (nothing with one seed)."""
    if np.isfinite(half).any():
        ax.fill_between(x, mean - half, mean + half, color=colour, alpha=0.2, linewidth=0)


def trajectory_lines(ax, study: Study, series: dict[str, ArmSeries]) -> np.ndarray | None:
    """Trained arms as seed-mean lines with 95% bands vs tokens, references as dash-dot horizontal
    lines at their one value; returns the tokens drawn (None when no trained arm has data)."""
    tokens = []
    for arm, s in series.items():
        mean, half = s.trajectory()
        c = colour(study, arm)
        if s.reference:
            ax.axhline(float(mean[-1]), color=c, **REFERENCE_STYLE, label=series_label(s))
            continue
        ax.plot(s.tokens, mean, color=c, marker=marker(arm), markersize=4, label=series_label(s))
        band(ax, s.tokens, mean, half, c)
        tokens.append(s.tokens)
    return np.concatenate(tokens).astype(float) if tokens else None


def layer_lines(ax, study: Study, series: dict[str, ArmSeries]) -> None:
    """Each arm's values per layer at its final checkpoint, band across seeds; a reference with another
    layer count at relative depth, its layer i at i·(L−1)/(L_ref−1) (L: the trained arms' layer count),
    so first and last layers line up."""
    sizes = {arm: s.values.shape[2] for arm, s in series.items()}
    n_layer = max([n for a, n in sizes.items() if not series[a].reference] or sizes.values())
    for arm, s in series.items():
        mean, half = s.layers_at(-1)
        c = colour(study, arm)
        if s.reference:
            x = np.arange(mean.size) if mean.size == n_layer else np.linspace(0, n_layer - 1, mean.size)
            note = "" if mean.size == n_layer else f", {mean.size} layers at relative depth"
            ax.plot(x, mean, color=c, **REFERENCE_STYLE, label=f"{arm} (pretrained{note})")
            continue
        x = np.arange(mean.size)
        ax.plot(x, mean, color=c, marker=marker(arm), markersize=4,
                label=f"{series_label(s)} at {fmt_tokens(s.tokens[-1])} tokens")
        band(ax, x, mean, half, c)
    ax.set_xticks(range(0, n_layer, max(1, n_layer // 16)))
    ax.set_xlim(-0.3, n_layer - 0.7)
    ax.set_xlabel("layer (0 = nearest the embedding)")


def grid_figure(grid: np.ndarray, vmax: float, xticks: list[str], xlabel: str, title: str, cbar: str):
    """A (rows = layers) × (columns) heatmap on [0, vmax], annotated when small enough to read."""
    n_layer, n_col = grid.shape
    fig, ax = new_axes(max(5.0, 1.6 + 0.55 * n_col), max(3.5, 1.4 + 0.3 * n_layer))
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

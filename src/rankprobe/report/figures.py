"""The report's figures: the drawing kit every figure is built from, then one function per PNG (or one
per arm) that returns its path (None, writing nothing, when its rows are absent).

Figures are drawn on matplotlib's Agg canvas directly (no pyplot, no display, no global backend
switch). Every arm keeps one colour across figures; pretrained references (`Run.reference`) are
dash-dot lines in colours of their own, never a point at "init". Token axes are symlog: linear between
0 (initialization) and the first checkpoint, logarithmic above it, so init sits at a true 0.

Spectral figures draw the study's metric with head_dim as a dotted line, the metric's isotropic null
for the probe set as a long-dashed line and (PR only) the dead threshold `probe.dead_pr` dashed. The
lens figures draw the `attn` and `weights` rows (docs/lenses.md), the mechanism figures the mechanism
lenses (section 6); runs written before a lens have no figure for it.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

from rankprobe.report.fmt import fmt_tokens, n_seeds
from rankprobe.report.mechanism import ALIGN_MARGIN, alignment_index, final_orth, orth_devs
from rankprobe.report.metrics import arm_key
from rankprobe.report.series import TENSOR_NAME, ArmSeries, Study, arm_series, mean_ci
from rankprobe.runfolder import atomic_file

ARM_COLOURS = {"adamw": "#1f77b4", "adamw+qknorm": "#17becf", "muon": "#d62728", "muon+qknorm": "#ff7f0e"}
_EXTRA_COLOURS = ["#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#7f7f7f"]
_REFERENCE_COLOURS = ["#000000", "#7f7f7f", "#8c564b", "#bcbd22"]
DPI = 120
NULL_STYLE = {"color": "black", "linestyle": (0, (10, 3)), "linewidth": 0.9}  # long dashes
REFERENCE_STYLE = {"linestyle": "-.", "linewidth": 1.6}
CEILING_STYLE = {"linestyle": ":", "linewidth": 1.2}  # head_dim, and 1 for normalised entropy
THRESHOLD_STYLE = {"color": "dimgray", "linestyle": "--", "linewidth": 1.0}  # dead PR, aligned index
POINT_STYLE = {"linestyle": "none", "markeredgecolor": "black", "markeredgewidth": 0.6}  # seed means with bars


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


def series_label(s: ArmSeries) -> str:
    return f"{s.arm} (pretrained)" if s.reference else f"{s.arm} ({n_seeds(s.n_seeds)})"


def arm_line(ax, x, mean, half, colour: str, arm: str, label: str) -> None:
    """A trained arm's seed-mean line in its colour and marker, and its 95% band over seeds (none with
    one seed)."""
    ax.plot(x, mean, color=colour, marker=marker(arm), markersize=4, label=label)
    if np.isfinite(half).any():
        ax.fill_between(x, mean - half, mean + half, color=colour, alpha=0.2, linewidth=0)


def layer_figure(study: Study, series: dict[str, ArmSeries], ylabel: str, title: str, path: Path, style) -> Path:
    """Each arm's values per layer at its final checkpoint, band across seeds; a reference with another
    layer count at relative depth, its layer i at i·(L−1)/(L_ref−1) (L: the trained arms' layer count),
    so first and last layers line up; `style(ax)` adds guides and axis limits."""
    fig, ax = new_axes()
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
        arm_line(ax, np.arange(mean.size), mean, half, c, arm,
                 f"{series_label(s)} at {fmt_tokens(s.tokens[-1])} tokens")
    ax.set_xticks(range(0, n_layer, max(1, n_layer // 16)))
    ax.set_xlim(-0.3, n_layer - 0.7)
    ax.set_xlabel("layer (0 = nearest the embedding)")
    style(ax)
    return finish(fig, ax, ylabel, title, path)


def grid_figure(path: Path, grid: np.ndarray, head_dim: int, label: str, xticks: list[str], xlabel: str,
                title: str) -> Path:
    """A (rows = layers) × (columns) heatmap of `label` on [0, head_dim], annotated when small enough to read."""
    n_layer, n_col = grid.shape
    fig, ax = new_axes(max(5.0, 1.6 + 0.55 * n_col), max(3.5, 1.4 + 0.3 * n_layer))
    im = ax.imshow(grid, origin="lower", aspect="auto", cmap="viridis", vmin=0, vmax=head_dim,
                   interpolation="nearest")
    if n_layer * n_col <= 400:
        for (i, j), v in np.ndenumerate(grid):
            if np.isfinite(v):
                ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=7,
                        color="black" if v > 0.6 * head_dim else "white")
    step = max(1, n_col // 32)
    ax.set_xticks(range(0, n_col, step), xticks[::step], rotation=45 if n_col > 6 else 0, fontsize=8)
    ax.set_yticks(range(0, n_layer, max(1, n_layer // 24)))
    ax.set_xlabel(xlabel)
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, label=f"{label} (0 to head_dim = {head_dim})")
    return save(fig, path)


# ---------------------------------------------------------------------------------------------
# the figures


LOG_RANGE = 30.0
"""max logit is drawn on a log axis when its largest value is this many times its smallest (all > 0)"""
BAND = "band = 95% CI over seeds"


def _nulls(prs: list[ArmSeries]) -> list[tuple[float, int]]:
    """Distinct (null, probe tokens N) over the checkpoints of the trained arms (else the references)."""
    drawn = [p for p in prs if not p.reference] or prs
    return sorted({(round(float(v), 2), int(n)) for p in drawn if p.null is not None
                   for v, n in zip(p.null, p.n_probe) if np.isfinite(v) and np.isfinite(n)})


def _guides(ax, study: Study) -> None:
    """head_dim (dotted; a reference with another head_dim gets its own, in its colour), the null of the
    trained arms' probe sets (long dashes), the dead threshold (PR only); y from 0 to above them all."""
    head_dim = study.head_dim
    ax.axhline(head_dim, color="black", **CEILING_STYLE, label=f"head_dim = {head_dim}")
    tops = [head_dim]
    for arm, pr in study.prs.items():
        d = max(r.head_dim for r in study.groups[arm])
        if pr.reference and d != head_dim:
            ax.axhline(d, color=colour(study, arm), **CEILING_STYLE, label=f"head_dim = {d} ({arm})")
            tops.append(d)
        tops.append(float(np.nanmax(pr.values, initial=0.0)))
    for value, n in _nulls(list(study.prs.values())):
        ax.axhline(value, **NULL_STYLE, label=f"isotropic null, {n:,} tokens ({value:.1f})")
    if study.metric == "pr":
        ax.axhline(study.dead_pr, **THRESHOLD_STYLE, label=f"dead below {study.dead_pr:g}")
    ax.set_ylim(0, max(tops) * 1.06)


def _title(study: Study, what: str) -> str:
    return f"{study.label[0].upper() + study.label[1:]} {what} (tap={study.tap}; {BAND})"


def trajectory_figure(study: Study, series: dict[str, ArmSeries], ylabel: str, title: str, path: Path,
                      style) -> Path | None:
    """Trained arms as seed-mean lines with 95% bands vs tokens, references as dash-dot horizontal lines
    at their one value, `style(ax)` adding guides and axis limits; None without a trained arm."""
    fig, ax = new_axes()
    tokens = []
    for arm, s in series.items():
        mean, half = s.trajectory()
        if s.reference:
            ax.axhline(float(mean[-1]), color=colour(study, arm), **REFERENCE_STYLE, label=series_label(s))
            continue
        arm_line(ax, s.tokens, mean, half, colour(study, arm), arm, series_label(s))
        tokens.append(s.tokens)
    if not tokens:
        return None
    token_axis(ax, np.concatenate(tokens).astype(float))
    style(ax)
    return finish(fig, ax, ylabel, title, path)


def pr_trajectory(study: Study, out_dir: Path) -> Path | None:
    """pr_trajectory.png: the metric's mean over layers vs tokens."""
    return trajectory_figure(study, study.prs, f"{study.label}, mean over layers", _title(study, "during training"),
                             out_dir / "pr_trajectory.png", lambda ax: _guides(ax, study))


def layer_comparison(study: Study, out_dir: Path) -> Path:
    """layer_comparison.png: the metric per layer at each arm's final checkpoint, band across seeds;
    pretrained references dash-dot (at relative depth when their layer count differs)."""
    return layer_figure(study, study.prs, f"{study.label} (mean over heads)",
                        _title(study, "per layer at the final checkpoint"), out_dir / "layer_comparison.png",
                        lambda ax: _guides(ax, study))


def heatmaps(study: Study, out_dir: Path) -> list[Path]:
    """heatmap_<arm>.png per trained arm: the seed-mean metric over (layer, checkpoint) on [0, head_dim];
    heads_<arm>.png per arm (references too) whose rows carry per-head values: every (layer, head) at
    the final checkpoint, on [0, the arm's head_dim]."""
    paths, label = [], study.label
    for arm, pr in study.prs.items():
        seeds = n_seeds(pr.n_seeds)
        if not pr.reference:
            paths.append(grid_figure(out_dir / arm_figure("heatmap", arm), pr.values.mean(axis=0).T, study.head_dim,
                                     label, ["init" if t == 0 else fmt_tokens(t) for t in pr.tokens],
                                     "checkpoint (training tokens)",
                                     f"{arm}: {label} by layer and checkpoint\n(tap={study.tap}, mean of {seeds})"))
        if pr.heads is not None:
            grid = pr.heads.mean(axis=0)  # (L, H)
            head_dim = max(r.head_dim for r in study.groups[arm]) or study.head_dim
            when = ("pretrained, as loaded" if pr.reference
                    else f"at {fmt_tokens(pr.tokens[-1])} tokens, mean of {seeds}")
            paths.append(grid_figure(out_dir / arm_figure("heads", arm), grid, head_dim, label,
                                     [str(h) for h in range(grid.shape[1])],
                                     f"{TENSOR_NAME.get(study.tensor, study.tensor)} head",
                                     f"{arm}: {label} per head (tap={study.tap})\n{when}"))
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


def loss_curves(study: Study, out_dir: Path) -> Path | None:
    """loss_curves.png: lightly smoothed train loss vs tokens and val-loss points per trained arm (seed
    means). None without a trained arm with losses (a probed checkpoint series has none)."""
    arms = {a: g for a, g in study.arms.items() if any(r.rows.get("train") or r.rows.get("eval") for r in g)}
    if not arms:
        return None
    fig, ax = new_axes()
    drawn = []
    for arm, group in arms.items():
        c = colour(study, arm)
        train, val = arm_series(group, "train", "loss"), arm_series(group, "eval", "val_loss")
        if train is not None:
            mean = train.values[:, :, 0].mean(axis=0)
            ax.plot(train.tokens, mean, color=c, alpha=0.2, linewidth=0.8)
            ax.plot(train.tokens, smooth(mean, max(1, train.tokens.size // 50)), color=c, linewidth=1.6,
                    label=f"{arm} train ({n_seeds(len(group))})")
            drawn.append(train.tokens)
        if val is not None:
            vmean, vhalf = val.trajectory()
            ax.errorbar(val.tokens, vmean, yerr=np.nan_to_num(vhalf), color=c, marker=marker(arm), markersize=5,
                        **POINT_STYLE, capsize=2, label=f"{arm} val")
            drawn.append(val.tokens)
    if drawn:
        token_axis(ax, np.concatenate(drawn).astype(float))
    return finish(fig, ax, "loss (nats/token)",
                  "Training loss (smoothed; faint = raw seed mean) and validation loss (points, 95% CI)",
                  out_dir / "loss_curves.png")


def attention_entropy(study: Study, out_dir: Path) -> Path | None:
    """attention_entropy.png: normalised attention entropy (mean over layers, heads and query rows) vs
    tokens; 1 = uniform over the visible keys, 0 = every query reads one key."""
    def style(ax):
        ax.axhline(1.0, color="black", **CEILING_STYLE, label="uniform over visible keys")
        ax.set_ylim(0, 1.04)

    return trajectory_figure(study, study.series("attn", "entropy_norm"),
                             "attention entropy / log(visible keys), mean over layers",
                             f"Normalised attention entropy on the probe set ({BAND})",
                             out_dir / "attention_entropy.png", style)


def max_logit(study: Study, out_dir: Path) -> Path | None:
    """max_logit.png: the largest scaled pre-softmax logit q·k/√D (max over layers and heads) vs tokens,
    on a log axis when it spans more than LOG_RANGE× and stays positive."""
    series = study.series("attn", "max_logit")

    def style(ax):
        means = np.concatenate([s.trajectory()[0] for s in series.values()])
        means = means[np.isfinite(means)]
        if means.size and means.min() > 0 and means.max() / means.min() > LOG_RANGE:
            top = ax.get_ylim()[1]
            ax.set_yscale("log")
            # a band reaching below 0 (two seeds: t = 12.7) would stretch the axis down by decades
            ax.set_ylim(means.min() / 2, max(top, means.max() * 1.5))

    return trajectory_figure(study, series, "max logit q·k/√D (max over layers and heads)",
                             f"Largest pre-softmax attention logit on the probe set ({BAND})",
                             out_dir / "max_logit.png", style)


def weight_spectra(study: Study, out_dir: Path) -> Path | None:
    """weight_spectra.png: stable rank ‖W_k‖_F²/‖W_k‖₂² per layer at each arm's final checkpoint (band
    across seeds); references dash-dot, at relative depth when their layer count differs."""
    series = study.series("weights", "stable_rank", matrix="k")
    if all(s.reference for s in series.values()):
        return None
    return layer_figure(study, series, "W_k stable rank",
                        f"Stable rank of W_k per layer at the final checkpoint ({BAND})",
                        out_dir / "weight_spectra.png", lambda ax: ax.set_ylim(bottom=0))


def axis_alignment(study: Study, out_dir: Path) -> Path | None:
    """axis_alignment.png: the key alignment index (axis_ratio − null)/(1 − null) at the headline tap
    vs tokens (0 = a random rotation of the spectrum, 1 = axis-aligned); None without mechanism rows."""
    found = {a: alignment_index(g, study.tap) for a, g in study.arms.items()}

    def style(ax):
        ax.axhline(0.0, **NULL_STYLE, label="random-rotation null")
        ax.axhline(ALIGN_MARGIN, **THRESHOLD_STYLE, label=f"aligned above {ALIGN_MARGIN:g}")

    return trajectory_figure(study, {a: s for a, s in found.items() if s is not None},
                             "key alignment index, mean over layers",
                             f"Axis alignment of the key covariance (tap={study.tap}; {BAND})",
                             out_dir / "axis_alignment.png", style)


def orthogonality_pr(study: Study, out_dir: Path) -> Path | None:
    """orthogonality_pr.png: per trained arm, final key PR against the mean orth_dev of W_q and W_k
    (seed means, 95% bars both ways); None when fewer than two arms have `orth_dev` weight rows."""
    devs = orth_devs(study.arms)
    if len(devs) < 2:
        return None
    fig, ax = new_axes()
    for arm, (q, k, _) in devs.items():
        dev = final_orth(q, k)
        x, xh = mean_ci(dev)
        y, yh = study.key_prs[arm].trajectory()
        ax.errorbar(float(x), float(y[-1]), xerr=np.nan_to_num(float(xh)), yerr=np.nan_to_num(float(yh[-1])),
                    color=colour(study, arm), marker=marker(arm), markersize=7, **POINT_STYLE, capsize=3,
                    label=f"{arm} ({n_seeds(dev.size)})")
    for value in sorted({round(float(null.at(-1).mean), 3) for _, _, null in devs.values() if null is not None}):
        ax.axvline(value, **NULL_STYLE, label=f"Gaussian null ({value:.3f})")
    ax.set_xlabel("orth_dev of W_q and W_k, mean over layers (0 = orthogonal up to scale)")
    return finish(fig, ax, f"final key PR (tap={study.tap})",
                  "Key PR against the orthogonality of W_q, W_k at the final checkpoint (bars = 95% CI over seeds)",
                  out_dir / "orthogonality_pr.png")


def build_figures(study: Study, out_dir: str | Path) -> list[Path]:
    """Every figure of the report; returns the written paths. Figures whose rows are absent (attention,
    weights, or a trained arm for the trajectories) are not written."""
    out = Path(out_dir)
    paths = [*(f(study, out) for f in (pr_trajectory, layer_comparison, loss_curves, attention_entropy, max_logit,
                                       weight_spectra, axis_alignment, orthogonality_pr)), *heatmaps(study, out)]
    return [p for p in paths if p is not None]

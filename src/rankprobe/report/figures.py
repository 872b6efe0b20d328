"""The report's figures, each a function that writes one PNG and returns its path (None, writing
nothing, when its rows are absent), drawn with the kit in `plot`.

Spectral figures draw one metric (`Context.metric`: PR by default, or erank, stable rank, RankMe) from
`aggregate`'s series, with head_dim as a dotted line, the metric's isotropic null for the probe set as
a long-dashed line, and (PR only) the dead threshold `probe.dead_pr` dashed. The lens figures draw the
`attn` and `weights` rows (docs/lenses.md), so reports of runs written before the lenses look as they
did; the mechanism figures (axis alignment, orthogonality against key PR) need the mechanism lenses
(docs/lenses.md, section 6). Trained arms are seed means with 95% bands; pretrained references are
dash-dot lines.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rankprobe.report.fmt import fmt_tokens
from rankprobe.report.mechanism import ALIGN_MARGIN, alignment_index
from rankprobe.report.metrics import Run, finished_by_arm
from rankprobe.report.plot import (
    NULL_STYLE, TENSOR_NAME, Context, context, finish, grid_figure, heads_name, heatmap_name, layer_lines,
    legend_right, marker, new_axes, save, seeds_label, series_label, token_axis, trajectory_lines,
)
from rankprobe.report.series import ArmSeries, aggregate, arm_pr, arm_series, lens_series
from rankprobe.report.stats import mean_ci

LOG_RANGE = 30.0
"""max logit is drawn on a log axis when its largest value is this many times its smallest (all > 0)"""


def _nulls(prs: list[ArmSeries]) -> list[tuple[float, int]]:
    """Distinct (null, probe tokens N) over the checkpoints of the trained arms (else the references)."""
    drawn = [p for p in prs if not p.reference] or prs
    return sorted({(round(float(v), 2), int(n)) for p in drawn if p.null is not None
                   for v, n in zip(p.null, p.n_probe) if np.isfinite(v) and np.isfinite(n)})


def _guides(ax, ctx: Context, prs: list[ArmSeries]) -> None:
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


def _title(ctx: Context, what: str) -> str:
    return f"{ctx.label[0].upper() + ctx.label[1:]} {what} (tap={ctx.tap}; band = 95% CI over seeds)"


def pr_trajectory(ctx: Context, prs: dict[str, ArmSeries], out_dir: Path) -> Path | None:
    """pr_trajectory.png: the metric's mean over layers vs tokens, one line per trained arm with a 95%
    band, pretrained references as dash-dot lines. None without a trained arm."""
    fig, ax = new_axes()
    tokens = trajectory_lines(ax, ctx, prs)
    if tokens is None:
        return None
    _guides(ax, ctx, list(prs.values()))
    token_axis(ax, tokens)
    return finish(fig, ax, f"{ctx.label}, mean over layers", _title(ctx, "during training"),
                  out_dir / "pr_trajectory.png")


def layer_comparison(ctx: Context, prs: dict[str, ArmSeries], out_dir: Path) -> Path:
    """layer_comparison.png: the metric per layer at each arm's final checkpoint, band across seeds;
    pretrained references dash-dot (at relative depth when their layer count differs)."""
    fig, ax = new_axes()
    layer_lines(ax, ctx, prs)
    _guides(ax, ctx, list(prs.values()))
    return finish(fig, ax, f"{ctx.label} (mean over heads)", _title(ctx, "per layer at the final checkpoint"),
                  out_dir / "layer_comparison.png")


def heatmaps(ctx: Context, prs: dict[str, ArmSeries], out_dir: Path) -> list[Path]:
    """heatmap_<arm>.png per trained arm: seed-mean metric over (layer, checkpoint) on [0, head_dim]."""
    paths = []
    for arm, pr in prs.items():
        if pr.reference:
            continue
        fig = grid_figure(pr.seed_mean().T, ctx.head_dim, ["init" if t == 0 else fmt_tokens(t) for t in pr.tokens],
                          "checkpoint (training tokens)",
                          f"{arm}: {ctx.label} by layer and checkpoint\n(tap={ctx.tap}, mean of "
                          f"{series_label(pr)[len(arm) + 2:-1]})", f"{ctx.label} (0 to head_dim = {ctx.head_dim})")
        paths.append(save(fig, out_dir / heatmap_name(arm)))
    return paths


def head_heatmaps(ctx: Context, prs: dict[str, ArmSeries], out_dir: Path) -> list[Path]:
    """heads_<arm>.png per arm (references too) whose rows carry per-head values: the seed-mean metric
    of every (layer, head) at the final checkpoint, on [0, the arm's head_dim]."""
    paths = []
    for arm, pr in prs.items():
        if pr.heads is None:
            continue
        grid = pr.heads.mean(axis=0)  # (L, H)
        head_dim = ctx.head_dims[arm] or ctx.head_dim
        when = ("pretrained, as loaded" if pr.reference
                else f"at {fmt_tokens(pr.tokens[-1])} tokens, mean of {series_label(pr)[len(arm) + 2:-1]}")
        fig = grid_figure(grid, head_dim, [str(h) for h in range(grid.shape[1])],
                          f"{TENSOR_NAME.get(ctx.tensor, ctx.tensor)} head",
                          f"{arm}: {ctx.label} per head (tap={ctx.tap})\n{when}",
                          f"{ctx.label} (0 to head_dim = {head_dim})")
        paths.append(save(fig, out_dir / heads_name(arm)))
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


def loss_curves(ctx: Context, runs: list[Run], out_dir: Path) -> Path | None:
    """loss_curves.png: lightly smoothed train loss vs tokens and val-loss points per trained arm (seed
    means). None without a trained arm (pretrained references have no losses)."""
    arms = {a: g for a, g in finished_by_arm(runs).items() if a not in ctx.references
            and any(r.rows.get("train") or r.rows.get("eval") for r in g)}  # a probed checkpoint series has none
    if not arms:
        return None
    fig, ax = new_axes()
    drawn = []
    for arm, group in arms.items():
        c = ctx.colour(arm)
        train, val = arm_series(group, "train", "loss"), arm_series(group, "eval", "val_loss")
        if train is not None:
            mean = train.values[:, :, 0].mean(axis=0)
            ax.plot(train.tokens, mean, color=c, alpha=0.2, linewidth=0.8)
            ax.plot(train.tokens, smooth(mean, max(1, train.tokens.size // 50)), color=c, linewidth=1.6,
                    label=seeds_label(f"{arm} train", len(group)))
            drawn.append(train.tokens)
        if val is not None:
            vmean, vhalf = val.trajectory()
            ax.errorbar(val.tokens, vmean, yerr=np.nan_to_num(vhalf), color=c, marker=marker(arm), markersize=5,
                        linestyle="none", markeredgecolor="black", markeredgewidth=0.6, capsize=2,
                        label=f"{arm} val")
            drawn.append(val.tokens)
    if drawn:
        token_axis(ax, np.concatenate(drawn).astype(float))
    return finish(fig, ax, "loss (nats/token)",
                  "Training loss (smoothed; faint = raw seed mean) and validation loss (points, 95% CI)",
                  out_dir / "loss_curves.png")


def _lens_trajectory(ctx: Context, series: dict[str, ArmSeries], ylabel: str, title: str, name: str,
                     style) -> Path | None:
    """Lines of a lens `series` vs tokens, `style(ax)` adding guides and axis limits; None without a
    trained arm."""
    fig, ax = new_axes()
    tokens = trajectory_lines(ax, ctx, series)
    if tokens is None:
        return None
    token_axis(ax, tokens)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    style(ax)
    legend_right(ax)
    return save(fig, name)


def attention_entropy(ctx: Context, runs: list[Run], out_dir: Path) -> Path | None:
    """attention_entropy.png: normalised attention entropy (mean over layers, heads and query rows) vs
    tokens; 1 = uniform over the visible keys, 0 = every query reads one key."""
    def style(ax):
        ax.axhline(1.0, color="black", linestyle=":", linewidth=1.2, label="uniform over visible keys")
        ax.set_ylim(0, 1.04)

    return _lens_trajectory(ctx, lens_series(runs, "attn", "entropy_norm", "mean"),
                            "attention entropy / log(visible keys), mean over layers",
                            "Normalised attention entropy on the probe set (band = 95% CI over seeds)",
                            out_dir / "attention_entropy.png", style)


def max_logit(ctx: Context, runs: list[Run], out_dir: Path) -> Path | None:
    """max_logit.png: the largest scaled pre-softmax logit q·k/√D (max over layers and heads) vs tokens,
    on a log axis when it spans more than LOG_RANGE× and stays positive."""
    series = lens_series(runs, "attn", "max_logit", "max")

    def style(ax):
        means = np.concatenate([s.trajectory()[0] for s in series.values()])
        means = means[np.isfinite(means)]
        if means.size and means.min() > 0 and means.max() / means.min() > LOG_RANGE:
            top = ax.get_ylim()[1]
            ax.set_yscale("log")
            # a band reaching below 0 (two seeds: t = 12.7) would stretch the axis down by decades
            ax.set_ylim(means.min() / 2, max(top, means.max() * 1.5))

    return _lens_trajectory(ctx, series, "max logit q·k/√D (max over layers and heads)",
                            "Largest pre-softmax attention logit on the probe set (band = 95% CI over seeds)",
                            out_dir / "max_logit.png", style)


def weight_spectra(ctx: Context, runs: list[Run], out_dir: Path) -> Path | None:
    """weight_spectra.png: stable rank ‖W_k‖_F²/‖W_k‖₂² per layer at each arm's final checkpoint (band
    across seeds); references dash-dot, at relative depth when their layer count differs."""
    series = lens_series(runs, "weights", "stable_rank", matrix="k")
    if all(s.reference for s in series.values()):
        return None
    fig, ax = new_axes()
    layer_lines(ax, ctx, series)
    ax.set_ylim(bottom=0)
    return finish(fig, ax, "W_k stable rank",
                  "Stable rank of W_k per layer at the final checkpoint (band = 95% CI over seeds)",
                  out_dir / "weight_spectra.png")


def axis_alignment(ctx: Context, runs: list[Run], out_dir: Path) -> Path | None:
    """axis_alignment.png: the key alignment index (axis_ratio − null)/(1 − null) at the headline tap
    vs tokens (0 = a random rotation of the spectrum, 1 = axis-aligned); None without mechanism rows."""
    trained = {a: g for a, g in finished_by_arm(runs).items() if a not in ctx.references}
    series = {a: s for a, s in ((a, alignment_index(g, ctx.tap)) for a, g in trained.items()) if s is not None}

    def style(ax):
        ax.axhline(0.0, **NULL_STYLE, label="random-rotation null")
        ax.axhline(ALIGN_MARGIN, color="dimgray", linestyle="--", linewidth=1.0,
                   label=f"aligned above {ALIGN_MARGIN:g}")

    return _lens_trajectory(ctx, series, "key alignment index, mean over layers",
                            f"Axis alignment of the key covariance (tap={ctx.tap}; band = 95% CI over seeds)",
                            out_dir / "axis_alignment.png", style) if series else None


def orthogonality_pr(ctx: Context, runs: list[Run], out_dir: Path) -> Path | None:
    """orthogonality_pr.png: per trained arm, final key PR against the mean orth_dev of W_q and W_k
    (seed means, 95% bars both ways); None when fewer than two arms have `orth_dev` weight rows."""
    points, nulls = [], []
    for arm, group in finished_by_arm(runs).items():
        q, k = (arm_series(group, "weights", "orth_dev", matrix=m) for m in "qk")
        if arm in ctx.references or q is None or k is None:
            continue
        null = arm_series(group, "weights", "orth_dev_null", matrix="k")
        nulls += [] if null is None else [round(float(null.at(-1).mean), 3)]
        dev = 0.5 * (q.per_seed()[:, -1] + k.per_seed()[:, -1])
        x, xh = mean_ci(dev)
        y, yh = arm_pr(group, ctx.tap, "k", "pr").trajectory()
        points.append((arm, float(x), float(xh), float(y[-1]), float(yh[-1]), dev.size))
    if len(points) < 2:
        return None
    fig, ax = new_axes()
    for arm, x, xh, y, yh, n in points:
        ax.errorbar(x, y, xerr=np.nan_to_num(xh), yerr=np.nan_to_num(yh), color=ctx.colour(arm), marker=marker(arm),
                    markersize=7, markeredgecolor="black", markeredgewidth=0.6, capsize=3, linestyle="none",
                    label=seeds_label(arm, n))
    for value in sorted(set(nulls)):
        ax.axvline(value, **NULL_STYLE, label=f"Gaussian null ({value:.3f})")
    ax.set_xlabel("orth_dev of W_q and W_k, mean over layers (0 = orthogonal up to scale)")
    return finish(fig, ax, f"final key PR (tap={ctx.tap})",
                  "Key PR against the orthogonality of W_q, W_k at the final checkpoint (bars = 95% CI over seeds)",
                  out_dir / "orthogonality_pr.png")


def build_figures(runs: list[Run], out_dir: str | Path, tap: str | None = None, tensor: str = "k",
                  metric: str | None = None) -> list[Path]:
    """Every figure of the report for `metric` (default 'pr'); returns the written paths. Figures whose
    rows are absent (attention, weights, or a trained arm for the trajectories) are not written."""
    ctx, out = context(runs, tap, tensor, metric), Path(out_dir)
    prs = aggregate(runs, ctx.tap, tensor, ctx.metric)
    paths = [pr_trajectory(ctx, prs, out), layer_comparison(ctx, prs, out), *heatmaps(ctx, prs, out),
             *head_heatmaps(ctx, prs, out), *(f(ctx, runs, out) for f in
                                              (loss_curves, attention_entropy, max_logit, weight_spectra,
                                               axis_alignment, orthogonality_pr))]
    return [p for p in paths if p is not None]

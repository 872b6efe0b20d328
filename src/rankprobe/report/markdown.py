"""`report.md`: what was run, the headline key-spectrum table per arm, findings (findings.py),
attention and weight lenses, the metric per checkpoint, figures, where the time went, configs.

Numbers come from metrics files only (see docs/metrics.md). Every aggregate is a seed mean with a
95% Student-t half-width when an arm has more than one seed. Runs without an `end` row are listed as
incomplete, runs whose loss or weights went NaN/inf as diverged (with the token count where they stopped); both
are left out of every number and figure. Pretrained checkpoints (`Run.reference`) are rows of their
own, marked "(pretrained)", and enter no trained arm's numbers.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

from rankprobe.config import flatten
from rankprobe.report.findings import findings_section
from rankprobe.report.fmt import fmt_tokens, pm, prose, table
from rankprobe.report.mechanism import mechanism_section
from rankprobe.report.metrics import (
    METRIC_NAME, Run, arm_key, check_metric, default_tap, find_runs, split_arms,
)
from rankprobe.report.plot import TENSOR_NAME, heads_name, heatmap_name, metric_label
from rankprobe.report.series import (
    ATTENTION_COLUMNS, WEIGHT_COLUMNS, ArmSeries, Headline, arm_pr, has_rows, headline, lens_table,
)
from rankprobe.report.stats import Estimate, mean_ci
from rankprobe.runfolder import write_atomic

_SKIP_CONFIG = {"name", "out", "train.seed", "train.progress", "train.tensorboard"}


def _fmt(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    if isinstance(value, int) and abs(value) >= 1_000:
        return f"{value:_}"
    return str(value) if value != "" else '""'


def _distinct(runs: list[Run], key: str, fmt=_fmt) -> str:
    """The values of a dotted config key across runs, e.g. '4' or '4/8'."""
    values = sorted({flatten(r.config).get(key, "?") for r in runs}, key=str)
    return "/".join(fmt(v) if v != "?" else v for v in values)


def _references_text(refs: dict[str, list[Run]]) -> str:
    if not refs:
        return ""
    items = ", ".join(f"`{a}` ({g[0].n_layer} layers, head_dim {g[0].head_dim})" for a, g in refs.items())
    return (f"Pretrained checkpoint(s) probed once as loaded, shown as references: {items}; they enter no "
            "trained arm's numbers.")


def _summary(runs: list[Run], arms: dict[str, list[Run]], refs: dict[str, list[Run]], incomplete: list[Run],
             diverged: list[Run]) -> str:
    if not arms:
        if refs:
            return _references_text(refs) + " No trained run has finished."
        why = f"{len(diverged)} diverged, the rest have no `end` row" if diverged else "no `end` row"
        return (f"Found {len(runs)} run(s) under this folder; none has finished ({why}), so there "
                "are no headline numbers yet.")
    ran = [r for g in arms.values() for r in g]
    per_arm = ", ".join(f"`{a}` × {len(g)} seed{'s' if len(g) != 1 else ''} ({', '.join(str(r.seed) for r in g)})"
                        for a, g in arms.items())
    params = sorted({r.info.get("n_params") for r in ran if r.info.get("n_params")})
    params_text = "/".join(dict.fromkeys(f"{p / 1e6:.2f}M" for p in params)) or "?"
    kv_heads = "/".join(sorted({str(flatten(r.config).get("model.n_kv_head") or flatten(r.config).get("model.n_head"))
                                for r in ran}))
    ckpts = sorted({int(t) for r in ran for t in r.info.get("probe_checkpoints", [])})
    text = (
        f"{len(ran)} finished run(s) in {len(arms)} arm(s): {per_arm}. Each trained for "
        f"{_distinct(ran, 'train.tokens', fmt_tokens)} tokens (batch {_distinct(ran, 'train.batch_size')} × seq_len "
        f"{_distinct(ran, 'model.seq_len')}) on corpus `{_distinct(ran, 'data.corpus')}`. The model is a "
        f"LLaMA-style decoder with {_distinct(ran, 'model.n_layer')} layers, d_model "
        f"{_distinct(ran, 'model.d_model')}, {_distinct(ran, 'model.n_head')} query heads "
        f"and {kv_heads} key/value heads, head_dim {_distinct(ran, 'model.head_dim')}, "
        f"{params_text} trainable parameters. Keys were probed at {len(ckpts)} checkpoints "
        f"({', '.join(fmt_tokens(t) if t else 'init' for t in ckpts)} tokens) on "
        f"{_distinct(ran, 'probe.tokens', fmt_tokens)} held-out probe tokens."
    )
    if refs:
        text += " " + _references_text(refs)
    if diverged:
        text += f" {len(diverged)} run(s) diverged (NaN/inf) and are excluded (see below)."
    if incomplete:
        text += f" {len(incomplete)} further run(s) did not finish and are excluded (see below)."
    return text


def _null_cell(h: Headline) -> str:
    return f"{h.null:.2f}" + (f" (N = {h.n_probe:,})" if h.n_probe else "") if math.isfinite(h.null) else "n/a"


def _null_text(heads: list[Headline], metric: str) -> str:
    trained = [h for h in heads if not h.reference and math.isfinite(h.null)]
    if not trained:
        return ""
    nulls = sorted({(round(h.null, 2), h.n_probe) for h in trained})
    value = (f"is {nulls[0][0]:.2f} for the {nulls[0][1]:,} probe tokens" if len(nulls) == 1
             else "depends on each arm's probe tokens N (column)")
    return prose("headline", "null", name=METRIC_NAME[metric], value=value)


def _headline_rows(heads: list[Headline], dead: bool, diverged: list[Run]) -> list[list[str]]:
    """One row per arm (references last); an arm whose every seed diverged says where instead."""
    lost: dict[str, list[Run]] = {}
    for r in diverged:
        lost.setdefault(r.arm, []).append(r)
    rows = []
    for h in heads:
        row = [f"`{h.arm}`" + (" (pretrained)" if h.reference else ""),
               "—" if h.reference else str(h.n_seeds) + (f" (+{len(lost[h.arm])} diverged)" if h.arm in lost else ""),
               "—" if h.reference else f"{h.tokens:,}", pm(h.mean), _null_cell(h),
               f"L{h.weakest_layer}: {pm(h.weakest)}"]
        if dead:
            row.append(f"{len(h.dead_layers)}" + (f" ({', '.join(f'L{i}' for i in h.dead_layers)})"
                                                  if h.dead_layers else ""))
        rows.append((h.reference, arm_key(h.arm), row + [pm(h.val_loss, 4)]))
    shown = {h.arm for h in heads}
    for arm, group in lost.items():
        if arm not in shown:
            where = ", ".join(f"{r.ended_at:,} tokens (seed {r.seed})" for r in group)
            rows.append((False, arm_key(arm), [f"`{arm}`", "0", "—", f"diverged at {where}"]
                         + ["—"] * (4 if dead else 3)))
    return [r for *_, r in sorted(rows, key=lambda x: x[:2])]


def _headline_section(heads: list[Headline], tap: str, tensor: str, metric: str, head_dim: int, dead_pr: float,
                      diverged: list[Run]) -> list[str]:
    dead = metric == "pr"
    name, label = METRIC_NAME[metric], metric_label(tensor, metric)
    header = ["arm", "seeds", "tokens", f"mean {label}", "isotropic null", f"weakest layer: {name}",
              *([f"dead layers (PR < {dead_pr:g})"] if dead else []), "val loss"]
    reading = prose("headline", "reading_pr") if dead else prose("headline", "reading", name=name)
    text = (f"Headline tap: `{tap}`, {prose('tap').get(tap, 'see docs/metrics.md')}. "
            + prose("metric", metric, t=TENSOR_NAME.get(tensor, tensor), d=head_dim)
            + prose("headline", "values", name=name, reading=reading) + _null_text(heads, metric))
    lines = [f"## Headline: {label} at the final checkpoint", "", text, "",
             *table(header, _headline_rows(heads, dead, diverged)), ""]
    refs = [h for h in heads if h.reference]
    if refs:
        items = "; ".join(f"`{h.arm}` {h.n_layer} layers, {h.n_probe:,} probe tokens" for h in refs)
        lines += [prose("headline", "references", items=items), ""]
    return lines


def _lens_section(title: str, text: str, runs: list[Run], columns: list[tuple], heads: dict[str, Headline],
                  label: str) -> list[str]:
    """A lens table: the arm's headline mean, then each column's final value (`series.lens_table`)."""
    rows = [[f"`{r.arm}`" + (" (pretrained)" if r.reference else ""), "—" if r.reference else str(r.n_seeds),
             "—" if r.reference else f"{r.tokens:,}", pm(heads[r.arm].mean) if r.arm in heads else "n/a",
             *(pm(e, c[-1]) for e, c in zip(r.cells, columns))] for r in lens_table(runs, columns)]
    header = ["arm", "seeds", "tokens", f"mean {label}", *(c[0] for c in columns)]
    return [title, "", text, "", *table(header, rows), ""] if rows else []


def _checkpoint_section(prs: dict[str, ArmSeries], tensor: str, metric: str) -> list[str]:
    tokens = sorted({int(t) for pr in prs.values() for t in pr.tokens})
    cols = {}
    for arm, pr in prs.items():
        mean, half = pr.trajectory()
        cols[arm] = {int(t): pm(Estimate(m, h, pr.n_seeds)) for t, m, h in zip(pr.tokens, mean, half)}
    rows = [[f"{t:,}" + (" (init)" if t == 0 else "")] + [cols[a].get(t, "—") for a in prs] for t in tokens]
    return [
        f"## Mean {metric_label(tensor, metric)} over layers at each checkpoint", "",
        "Only checkpoints that every seed of an arm reached are aggregated.", "",
        *table(["tokens"] + [f"`{a}`" for a in prs], rows), "",
    ]


def _figure_section(out_dir: Path, arms: list[str], references: list[str], label: str,
                    written: list[Path] | None) -> list[str]:
    figures = [("pr_trajectory.png", f"Mean {label} over layers vs training tokens"),
               ("layer_comparison.png", f"{label[0].upper() + label[1:]} per layer at the final checkpoint"),
               *((heatmap_name(a), f"`{a}`: {label} by layer and checkpoint") for a in arms),
               *((heads_name(a), f"`{a}`: {label} per head at the final checkpoint") for a in arms + references),
               ("loss_curves.png", "Training and validation loss"),
               ("attention_entropy.png", "Normalised attention entropy vs training tokens"),
               ("max_logit.png", "Largest pre-softmax attention logit vs training tokens"),
               ("weight_spectra.png", "Stable rank of W_k per layer at the final checkpoint"),
               ("axis_alignment.png", "Key axis-alignment index vs training tokens (0 = random rotation, 1 = "
                "axis-aligned)"),
               ("orthogonality_pr.png", "Key PR against the orthogonality of W_q and W_k at the final checkpoint")]
    names = None if written is None else {Path(p).name for p in written}
    lines = ["## Figures", ""]
    for name, caption in figures:
        if (out_dir / name).exists() if names is None else name in names:
            lines += [f"**{caption}**", "", f"![{caption}]({name})", ""]
    return lines if len(lines) > 2 else []


_PHASES = ("setup_s", "first_step_s", "eval_s", "probe_s", "checkpoint_s")


def _run_cost(run: Run) -> list[float] | None:
    """[wall s, training tokens/s, % of wall time in each of _PHASES] from a finished run's `end` row
    (docs/metrics.md, section `end`); None for files written before the phase fields."""
    end = run.rows["end"][-1]
    phases = [end.get(k) for k in _PHASES]
    if any(p is None for p in phases) or not end.get("wall_s"):
        return None
    cfg = flatten(run.config)
    step_tokens = int(cfg.get("train.batch_size") or 0) * int(cfg.get("model.seq_len") or 0)
    wall = float(end["wall_s"])
    rest = wall - sum(phases)  # the other training steps and saving the final weights
    rate = (int(end["tokens"]) - step_tokens) / rest if step_tokens and rest > 0 else math.nan
    return [wall, rate, *(100 * p / wall for p in phases)]


def _cost_section(arms: dict[str, list[Run]]) -> list[str]:
    rows = []
    for arm, group in arms.items():
        costs = [c for c in map(_run_cost, group) if c is not None]
        if not costs:
            continue
        mean, half = mean_ci(costs)  # (7,) each: over seeds
        seeds = str(len(costs)) + (f" of {len(group)}" if len(costs) < len(group) else "")
        digits = [1, 0] + [1] * len(_PHASES)
        rows.append([f"`{arm}`", seeds,
                     *(pm(Estimate(m, h, len(costs)), d, ",") for m, h, d in zip(mean, half, digits))])
    if not rows:
        return []
    header = ["arm", "seeds", "wall time (s)", "training rate (tokens/s)", "set-up (%)", "first step (%)",
              "evals (%)", "probes (%)", "checkpoints (%)"]
    return ["## Where the time went", "", prose("sections", "cost"), "", *table(header, rows), ""]


def _where(run: Run, root: Path) -> Path:
    """A run's metrics file, relative to the report's folder where it lies inside it."""
    return run.path.relative_to(root) if run.path.is_relative_to(root) else run.path


def _excluded_section(runs: list[Run], root: Path, diverged: bool) -> list[str]:
    """The runs left out of every number: diverged ones (where, and their last good checkpoint) or those
    without an `end` row (how far they logged)."""
    rows = []
    for r in runs:
        if diverged:
            ckpt = r.rows["end"][-1].get("checkpoint_step")
            cells = [f"{r.ended_at:,}", "none" if ckpt is None else f"step {ckpt}"]
        else:
            logged = (int(x.get("tokens", 0)) for k in ("train", "eval", "probe") for x in r.rows.get(k, []))
            cells = [f"{max(logged, default=0):,}"]
        rows.append([f"`{r.name}`", f"`{r.arm}`", str(r.seed), *cells, f"`{_where(r, root)}`"])
    kind = "diverged" if diverged else "incomplete"
    header = ["run", "arm", "seed", *(["diverged at tokens", "last good checkpoint"] if diverged
                                      else ["last tokens logged"]), "metrics file"]
    return [f"## {kind.capitalize()} runs", "", prose("sections", kind, n=len(runs)), "", *table(header, rows),
            ""] if runs else []


def _config_section(arms: dict[str, list[Run]]) -> list[str]:
    runs = [r for g in arms.values() for r in g]
    flat = {id(r): {k: v for k, v in flatten(r.config).items() if k not in _SKIP_CONFIG} for r in runs}
    keys = sorted({k for f in flat.values() for k in f})
    per_arm = {a: {k: {_fmt(flat[id(r)].get(k, "—")) for r in g} for k in keys} for a, g in arms.items()}
    differing = [k for k in keys if len({frozenset(per_arm[a][k]) for a in arms}) > 1]
    within = [k for k in keys if k not in differing and any(len(per_arm[a][k]) > 1 for a in arms)]
    common = [k for k in keys if k not in differing and k not in within]
    lines = ["## Configuration", ""]
    if differing:
        rows = [[f"`{k}`"] + [" / ".join(sorted(per_arm[a][k])) for a in arms] for k in differing]
        lines += ["Settings that differ between arms:", "", *table(["key"] + [f"`{a}`" for a in arms], rows), ""]
    lines += ["Varying per run (by design): `name`, `train.seed`."
              + (f" Also varying within an arm: {', '.join(f'`{k}`' for k in within)}." if within else ""), ""]
    lines += ["Common settings:", ""]
    for section in ("model", "optim", "train", "probe", "data"):
        items = [f"{k.split('.', 1)[1]}={next(iter(per_arm[next(iter(arms))][k]))}"
                 for k in common if k.startswith(section + ".")]
        if items:
            lines.append(f"- `{section}`: " + ", ".join(items))
    return lines + [""]


def _env_section(runs: list[Run]) -> list[str]:
    lines = ["## Environment", ""]
    for key in ("torch", "device", "git_sha", "python", "rankprobe", "platform"):
        counts = Counter(str(r.env.get(key) or "?")[:12 if key == "git_sha" else None] for r in runs)
        if set(counts) == {"?"}:
            continue
        values = ", ".join(f"`{v}`" + (f" ({n} runs)" if len(counts) > 1 else "") for v, n in counts.most_common())
        lines.append(f"- {key}: {values}")
    return lines + [""]


def write_report(root: str | Path, out_dir: str | Path | None = None, tap: str | None = None, *,
                 tensor: str = "k", metric: str | None = None, runs: list[Run] | None = None,
                 figures: list[Path] | None = None) -> Path:
    """Write `report.md` into `out_dir` (default: `root`) from the metrics files under `root`, for the
    spectral `metric` (default 'pr'). Links `figures` (the paths build_figures wrote), or when None
    every report figure already present in `out_dir`. Returns its path."""
    metric = check_metric(metric)
    root = Path(root)
    out_dir = Path(out_dir) if out_dir is not None else (root if root.is_dir() else root.parent)
    runs = runs if runs is not None else find_runs(root)
    arms, refs = split_arms(runs)
    diverged = [r for r in runs if r.status == "diverged"]
    incomplete = [r for r in runs if not r.finished and r.status != "diverged"]
    base = root if root.is_dir() else root.parent
    label = metric_label(tensor, metric)
    lines = [f"# RankProbe report: `{base.resolve().name}`", "", _summary(runs, arms, refs, incomplete, diverged), ""]
    if arms or refs:
        finished = [r for g in (arms or refs).values() for r in g]
        tap = tap or default_tap(finished)
        head_dim = max(r.head_dim for r in finished)
        dead_pr = finished[0].dead_pr
        prs = {a: arm_pr(g, tap, tensor, metric) for a, g in {**arms, **refs}.items()}
        heads = {a: headline(prs[a], g, dead_pr) for a, g in {**arms, **refs}.items()}
        lines += _headline_section(list(heads.values()), tap, tensor, metric, head_dim, dead_pr, diverged)
        if arms:
            val = {a: heads[a].val_loss.mean for a in arms}
            lines += findings_section(arms, prs, runs, dead_pr, val, label) + mechanism_section(arms, tap)
        if has_rows(runs, "attn"):
            lines += _lens_section("## Attention at the final checkpoint", prose("lenses", "attention"), runs,
                                   ATTENTION_COLUMNS, heads, label)
        if has_rows(runs, "weights"):
            lines += _lens_section("## Weights at the final checkpoint", prose("lenses", "weights"), runs,
                                   WEIGHT_COLUMNS, heads, label)
        if arms:
            lines += _checkpoint_section({a: prs[a] for a in arms}, tensor, metric)
        lines += _figure_section(out_dir, list(arms), list(refs), label, figures)
        lines += _cost_section(arms)
    lines += _excluded_section(diverged, base, True) + _excluded_section(incomplete, base, False)
    if arms:
        lines += _config_section(arms)
    if arms or refs:
        lines += _env_section([r for g in {**arms, **refs}.values() for r in g])
    path = out_dir / "report.md"
    write_atomic(path, "\n".join(lines).rstrip() + "\n")
    return path

"""`report.md`: what was run, the headline table per arm, findings, attention and weight lenses, the
metric per checkpoint, figures, where the time went, the runs left out, configs and environment.

Every number is a seed mean with its 95% t half-width, drawn from the study's series (`series.Study`).
Diverged runs and runs without an `end` row are listed, and left out of every number and figure;
pretrained checkpoints (`Run.reference`) are rows of their own, marked "(pretrained)".
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

from rankprobe.config import flatten
from rankprobe.report.figures import arm_figure
from rankprobe.report.findings import findings_section
from rankprobe.report.fmt import ARM_COLUMNS, arm_cells, fmt_tokens, n_seeds, pm, prose, section, table
from rankprobe.report.mechanism import mechanism_section
from rankprobe.report.metrics import METRIC_NAME, Run, arm_key
from rankprobe.report.series import TENSOR_NAME, Estimate, Headline, Study, final, mean_ci
from rankprobe.runfolder import PHASE_FIELDS, write_atomic

# the config values the summary names, as {train_batch_size}, {model_seq_len}, ... in prose.toml
_SUMMARY_KEYS = ("train.batch_size", "model.seq_len", "data.corpus", "model.n_layer", "model.d_model", "model.n_head",
                 "model.head_dim")
# the lens tables: (title, prose key, columns: (title, kind, key, row filter, digits)); layers reduce by
# the key (series.MAX_OVER_LAYERS)
LENSES = [
    ("## Attention at the final checkpoint", "attention", [
        ("attention entropy (normalised, mean)", "attn", "entropy_norm", {}, 3),
        ("attention entropy (nats, mean)", "attn", "entropy", {}, 3),
        ("max logit (max over layers, heads)", "attn", "max_logit", {}, 2)]),
    ("## Weights at the final checkpoint", "weights", [
        ("W_q stable rank (mean)", "weights", "stable_rank", {"matrix": "q"}, 2),
        ("W_k stable rank (mean)", "weights", "stable_rank", {"matrix": "k"}, 2),
        ("W_q spectral norm (max)", "weights", "spectral_norm", {"matrix": "q"}, 3),
        ("W_k spectral norm (max)", "weights", "spectral_norm", {"matrix": "k"}, 3)]),
]


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


def _summary(study: Study, incomplete: list[Run], diverged: list[Run]) -> str:
    arms, refs = study.arms, study.refs
    items = ", ".join(f"`{a}` ({g[0].n_layer} layers, head_dim {g[0].head_dim})" for a, g in refs.items())
    references = prose("summary", "references", items=items) if refs else ""
    if not arms:
        if refs:
            return references + " No trained run has finished."
        why = f"{len(diverged)} diverged, the rest have no `end` row" if diverged else "no `end` row"
        return prose("summary", "none", n=len(study.runs), why=why)
    ran = [r for g in arms.values() for r in g]
    params = sorted({r.info.get("n_params") for r in ran if r.info.get("n_params")})
    ckpts = sorted({int(t) for r in ran for t in r.info.get("probe_checkpoints", [])})
    seeds = ", ".join(f"`{a}` × {n_seeds(len(g))} ({', '.join(str(r.seed) for r in g)})"
                      for a, g in arms.items())
    kv_heads = {str(flatten(r.config).get("model.n_kv_head") or flatten(r.config).get("model.n_head")) for r in ran}
    settings = {k.replace(".", "_"): _distinct(ran, k) for k in _SUMMARY_KEYS}
    text = prose("summary", "ran", n_runs=len(ran), n_arms=len(arms), per_arm=seeds,
                 kv_heads="/".join(sorted(kv_heads)), tokens=_distinct(ran, "train.tokens", fmt_tokens),
                 probe_tokens=_distinct(ran, "probe.tokens", fmt_tokens), n_ckpts=len(ckpts),
                 params="/".join(dict.fromkeys(f"{p / 1e6:.2f}M" for p in params)) or "?",
                 ckpts=", ".join(fmt_tokens(t) if t else "init" for t in ckpts), **settings)
    text += " " + references if refs else ""
    text += f" {len(diverged)} run(s) diverged (NaN/inf) and are excluded (see below)." if diverged else ""
    text += f" {len(incomplete)} further run(s) did not finish and are excluded (see below)." if incomplete else ""
    return text


def _headline_rows(heads: list[Headline], dead: bool, diverged: list[Run]) -> list[list[str]]:
    """One row per arm (references last); an arm whose every seed diverged says where instead."""
    lost: dict[str, list[Run]] = {}
    for r in diverged:
        lost.setdefault(r.arm, []).append(r)
    rows = []
    for h in heads:
        pr = h.pr
        null = f"{h.null:.2f}" + (f" (N = {h.n_probe:,})" if h.n_probe else "") if math.isfinite(h.null) else "n/a"
        seeds = str(pr.n_seeds) + (f" (+{len(lost[h.arm])} diverged)" if h.arm in lost else "")
        row = [*arm_cells(pr, seeds), pm(h.mean), null,
               f"L{h.weakest_layer}: {pm(h.weakest)}"]
        if dead:
            row.append(f"{len(h.dead_layers)}" + (f" ({', '.join(f'L{i}' for i in h.dead_layers)})"
                                                  if h.dead_layers else ""))
        rows.append((pr.reference, arm_key(h.arm), row + [pm(h.val_loss, 4)]))
    for arm, group in lost.items():
        if arm not in {h.arm for h in heads}:
            where = ", ".join(f"{r.ended_at:,} tokens (seed {r.seed})" for r in group)
            rows.append((False, arm_key(arm), [f"`{arm}`", "0", "—", f"diverged at {where}"]
                         + ["—"] * (4 if dead else 3)))
    return [r for *_, r in sorted(rows, key=lambda x: x[:2])]


def _headline_section(study: Study, diverged: list[Run]) -> list[str]:
    heads, metric, dead = study.headlines(), study.metric, study.metric == "pr"
    name = METRIC_NAME[metric]
    header = [*ARM_COLUMNS, f"mean {study.label}", "isotropic null", f"weakest layer: {name}",
              *([f"dead layers (PR < {study.dead_pr:g})"] if dead else []), "val loss"]
    reading = prose("headline", "reading_pr") if dead else prose("headline", "reading", name=name)
    text = (f"Headline tap: `{study.tap}`, {prose('tap').get(study.tap, 'see docs/metrics.md')}. "
            + prose("metric", metric, t=TENSOR_NAME.get(study.tensor, study.tensor), d=study.head_dim)
            + prose("headline", "values", name=name, reading=reading))
    nulls = sorted({(round(h.null, 2), h.n_probe) for h in heads if not h.pr.reference and math.isfinite(h.null)})
    if nulls:
        value = (f"is {nulls[0][0]:.2f} for the {nulls[0][1]:,} probe tokens" if len(nulls) == 1
                 else "depends on each arm's probe tokens N (column)")
        text += prose("headline", "null", name=name, value=value)
    lines = section(f"## Headline: {study.label} at the final checkpoint", text, header,
                    _headline_rows(heads, dead, diverged))
    refs = [h for h in heads if h.pr.reference]
    if refs:
        items = "; ".join(f"`{h.arm}` {h.pr.values.shape[2]} layers, {h.n_probe:,} probe tokens" for h in refs)
        lines += [prose("headline", "references", items=items), ""]
    return lines


def _lens_section(study: Study, title: str, key: str, columns: list[tuple]) -> list[str]:
    """A lens table: per finished arm with any of the columns' rows, the arm's headline mean, then each
    column's value at the last checkpoint common to its seeds."""
    series = [study.series(kind, name, **match) for _, kind, name, match, _ in columns]
    rows = [[*arm_cells(next(s[arm] for s in series if arm in s)), pm(study.prs[arm].at(-1)),
             *(pm(final(s.get(arm)), c[-1]) for s, c in zip(series, columns))]
            for arm in study.groups if any(arm in s for s in series)]
    header = [*ARM_COLUMNS, f"mean {study.label}", *(c[0] for c in columns)]
    return section(title, prose("lenses", key), header, rows)


def _checkpoint_section(study: Study) -> list[str]:
    prs = {a: study.prs[a] for a in study.arms}
    tokens = sorted({int(t) for pr in prs.values() for t in pr.tokens})
    cols = {a: {int(t): pm(pr.at(i)) for i, t in enumerate(pr.tokens)} for a, pr in prs.items()}
    rows = [[f"{t:,}" + (" (init)" if t == 0 else "")] + [cols[a].get(t, "—") for a in prs] for t in tokens]
    return section(f"## Mean {study.label} over layers at each checkpoint",
                   "Only checkpoints that every seed of an arm reached are aggregated.",
                   ["tokens"] + [f"`{a}`" for a in prs], rows)


def _figure_section(study: Study, figures: list[Path]) -> list[str]:
    lens = ("loss_curves", "attention_entropy", "max_logit", "weight_spectra", "axis_alignment", "orthogonality_pr")
    kinds = [("pr_trajectory", ""), ("layer_comparison", ""), *(("heatmap", a) for a in study.arms),
             *(("heads", a) for a in study.groups), *((k, "") for k in lens)]  # (figure, its arm), in report order
    label = study.label
    captions = [(arm_figure(kind, arm) if arm else f"{kind}.png",
                 prose("figures", kind, arm=arm, label=label, Label=label[0].upper() + label[1:]))
                for kind, arm in kinds]
    written = {Path(p).name for p in figures}
    lines = [line for name, caption in captions if name in written
             for line in (f"**{caption}**", "", f"![{caption}]({name})", "")]
    return ["## Figures", "", *lines] if lines else []


def _run_cost(run: Run) -> list[float] | None:
    """[wall s, training tokens/s, % of wall time in each of PHASE_FIELDS] from a finished run's `end` row
    (docs/metrics.md, section `end`); None for files written before the phase fields."""
    end = run.rows["end"][-1]
    phases = [end.get(k) for k in PHASE_FIELDS]
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
        if costs:
            mean, half = mean_ci(costs)  # (7,) each: over seeds
            seeds = str(len(costs)) + (f" of {len(group)}" if len(costs) < len(group) else "")
            rows.append([f"`{arm}`", seeds, *(pm(Estimate(m, h, len(costs)), d, ",")
                                              for m, h, d in zip(mean, half, [1, 0] + [1] * len(PHASE_FIELDS)))])
    header = ["arm", "seeds", "wall time (s)", "training rate (tokens/s)", "set-up (%)", "first step (%)",
              "evals (%)", "probes (%)", "checkpoints (%)"]
    return section("## Where the time went", prose("sections", "cost"), header, rows)


def _excluded_section(runs: list[Run], root: Path, diverged: bool) -> list[str]:
    """The runs left out of every number: diverged ones (where, and their last good checkpoint) or those
    without an `end` row (how far they logged)."""
    rows = []
    for r in runs:
        if diverged:
            ckpt = r.rows["end"][-1].get("checkpoint_step")
            cells = [f"{r.ended_at:,}", "none" if ckpt is None else f"step {ckpt}"]
        else:
            logged = [int(x["tokens"]) for k in ("train", "eval", "probe") for x in r.rows.get(k, [])
                      if x.get("tokens") is not None]  # null in a Monitor folder without token counts
            cells = [f"{max(logged):,}" if logged else "n/a"]
        where = r.path.relative_to(root) if r.path.is_relative_to(root) else r.path
        rows.append([f"`{r.name}`", f"`{r.arm}`", str(r.seed), *cells, f"`{where}`"])
    kind = "diverged" if diverged else "incomplete"
    header = ["run", "arm", "seed", *(["diverged at tokens", "last good checkpoint"] if diverged
                                      else ["last tokens logged"]), "metrics file"]
    return section(f"## {kind.capitalize()} runs", prose("sections", kind, n=len(runs)), header, rows)


def _config_section(arms: dict[str, list[Run]]) -> list[str]:
    runs = [r for g in arms.values() for r in g]
    flat = {id(r): r.settings() for r in runs}
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
    for part in ("model", "optim", "train", "probe", "data"):
        items = [f"{k.split('.', 1)[1]}={next(iter(per_arm[next(iter(arms))][k]))}"
                 for k in common if k.startswith(part + ".")]
        if items:
            lines.append(f"- `{part}`: " + ", ".join(items))
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


def write_report(study: Study, root: Path, out_dir: Path, figures: list[Path]) -> Path:
    """Write `report.md` for `study` (the runs under `root`) into `out_dir`, linking the `figures` that
    build_figures wrote; returns its path."""
    arms = study.arms
    diverged = [r for r in study.runs if r.status == "diverged"]
    incomplete = [r for r in study.runs if not r.finished and r.status != "diverged"]
    base = root if root.is_dir() else root.parent
    lines = [f"# RankProbe report: `{base.resolve().name}`", "", _summary(study, incomplete, diverged), ""]
    if study.groups:
        lines += _headline_section(study, diverged)
        lines += findings_section(study) + mechanism_section(study) if arms else []
        for title, key, columns in LENSES:
            lines += _lens_section(study, title, key, columns)
        lines += _checkpoint_section(study) if arms else []
        lines += _figure_section(study, figures) + _cost_section(arms)
    lines += _excluded_section(diverged, base, True) + _excluded_section(incomplete, base, False)
    lines += _config_section(arms) if arms else []
    lines += _env_section([r for g in study.groups.values() for r in g]) if study.groups else []
    path = out_dir / "report.md"
    write_atomic(path, "\n".join(lines).rstrip() + "\n")
    return path

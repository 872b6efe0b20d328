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
from rankprobe.report.figures import (
    TENSOR_NAME,
    fmt_tokens,
    heads_name,
    heatmap_name,
    metric_label,
)
from rankprobe.report.findings import findings, findings_section
from rankprobe.report.lenses import (
    ATTENTION_COLUMNS,
    WEIGHT_COLUMNS,
    LensRow,
    has_rows,
    lens_table,
)
from rankprobe.report.metrics import (
    METRIC_NAME,
    Headline,
    Run,
    arm_key,
    arm_pr,
    check_metric,
    default_tap,
    find_runs,
    finished_by_arm,
    headline,
    split_arms,
)
from rankprobe.report.stats import mean_ci

TAP_MEANING = {
    "proj": "right after the key projection W_k",
    "norm": "after QK-Norm (identical to `proj` in arms without QK-Norm)",
    "rope": "after RoPE, i.e. what attention actually consumes",
}
_SKIP_CONFIG = {"name", "out", "train.seed", "train.progress", "train.tensorboard"}
METRIC_MEANING = {
    "pr": "The Participation Ratio PR = (Σλ)²/Σλ² of the eigenvalues λ of a head's centred {t} covariance "
          "counts how many dimensions the {t}s effectively use: PR = head_dim = {d} means all dimensions are "
          "used equally, PR = 1 means the {t}s have collapsed onto one direction.",
    "erank": "The effective rank erank = exp(−Σ p log p), p = λ/Σλ, of the eigenvalues λ of a head's centred "
             "{t} covariance (Roy & Vetterli 2007, on the variances) is the number of equally used directions "
             "with the same Shannon entropy: head_dim = {d} when every direction is used equally, 1 for a single "
             "direction. Of the metrics it is the most sensitive to the tail of the spectrum.",
    "stable_rank": "The stable rank Σλ/λ_max of the eigenvalues λ of a head's centred {t} covariance says how "
                   "many directions the strongest one is worth (at most head_dim = {d}; stable rank ≤ PR ≤ erank "
                   "on any spectrum). It is the most sensitive to one dominant direction, and finite samples "
                   "inflate λ_max, so its isotropic null lies well below head_dim: read it against the null.",
    "rankme": "RankMe = exp(−Σ q log q), q = σ/Σσ, of the singular values σ of the uncentred matrix of a head's "
              "{t}s (Garrido et al., ICML 2023) counts used directions like erank but without removing the mean: "
              "a large shared offset counts as one strong direction (at most head_dim = {d}).",
}


def _pm(mean: float, half: float, digits: int, sep: str = "") -> str:
    """'mean ± half' to `digits` decimals (sep="," groups thousands); no ± where `half` is NaN."""
    if not math.isfinite(mean):
        return "n/a"
    return f"{mean:{sep}.{digits}f}" + (f" ± {half:{sep}.{digits}f}" if math.isfinite(half) else "")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(r) + " |" for r in rows)]


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
    return (f" The isotropic null — the {METRIC_NAME[metric]} that N isotropic Gaussian vectors of width head_dim "
            f"give, the ceiling a probe set of that size can be expected to reach — {value} (docs/lenses.md).")


def _headline_section(heads: list[Headline], tap: str, tensor: str, metric: str, head_dim: int, dead_pr: float,
                      diverged: list[Run]) -> list[str]:
    lost: dict[str, list[Run]] = {}
    for r in diverged:
        lost.setdefault(r.arm, []).append(r)
    dead = metric == "pr"
    rows = []
    for h in heads:
        row = [f"`{h.arm}`" + (" (pretrained)" if h.reference else ""),
               "—" if h.reference else str(h.n_seeds) + (f" (+{len(lost[h.arm])} diverged)" if h.arm in lost else ""),
               "—" if h.reference else f"{h.tokens:,}", _pm(h.mean, h.mean_half, 2), _null_cell(h),
               f"L{h.weakest_layer}: {_pm(h.weakest_value, h.weakest_half, 2)}"]
        if dead:
            row.append(f"{len(h.dead_layers)}" + (f" ({', '.join(f'L{i}' for i in h.dead_layers)})"
                                                  if h.dead_layers else ""))
        rows.append((h.reference, arm_key(h.arm), row + [_pm(h.val_loss, h.val_loss_half, 4)]))
    shown = {h.arm for h in heads}
    for arm, group in lost.items():  # every seed diverged: say where instead of showing numbers
        if arm not in shown:
            where = ", ".join(f"{r.ended_at:,} tokens (seed {r.seed})" for r in group)
            rows.append((False, arm_key(arm), [f"`{arm}`", "0", "—", f"diverged at {where}"]
                         + ["—"] * (4 if dead else 3)))
    name = METRIC_NAME[metric]
    label = metric_label(tensor, metric)
    header = ["arm", "seeds", "tokens", f"mean {label}", "isotropic null", f"weakest layer: {name}",
              *([f"dead layers (PR < {dead_pr:g})"] if dead else []), "val loss"]
    reading = ("Mean PR averages the layers; the weakest layer and the dead layers are read from the seed-mean "
               "layer profile" if dead else
               f"Mean {name} averages the layers; the weakest layer is read from the seed-mean layer profile "
               f"(dead layers are defined by PR, so they are counted only in a PR report)")
    lines = [
        f"## Headline: {label} at the final checkpoint", "",
        f"Headline tap: `{tap}`, {TAP_MEANING.get(tap, 'see docs/metrics.md')}. "
        + METRIC_MEANING[metric].format(t=TENSOR_NAME.get(tensor, tensor), d=head_dim)
        + f" A layer's {name} is the mean over its heads. Values are seed means; ± is the 95% t-interval "
        f"half-width over seeds (shown only where an arm has more than one seed). {reading}; val loss is the "
        f"last evaluation (nats/token)." + _null_text(heads, metric), "",
        *_table(header, [r for *_, r in sorted(rows, key=lambda x: x[:2])]), "",  # references last
    ]
    refs = [h for h in heads if h.reference]
    if refs:
        lines += ["Rows marked (pretrained) are checkpoints probed once as loaded (`rankprobe.probes.hf`: a "
                  "Hugging Face model, or a finished RankProbe run probed again), on their own probe set and "
                  "tokenizer: " + "; ".join(
                      f"`{h.arm}` {h.n_layer} layers, {h.n_probe:,} probe tokens" for h in refs)
                  + ". They are references: no trained arm's number includes them.", ""]
    return lines


def _lens_cells(row: LensRow, digits: list[int]) -> list[str]:
    return [_pm(m, h, d) for (m, h), d in zip(row.cells, digits)]


def _lens_section(title: str, text: str, columns: list[tuple], digits: list[int], lens: list[LensRow],
                  heads: dict[str, Headline], label: str) -> list[str]:
    if not lens:
        return []
    rows = [[f"`{r.arm}`" + (" (pretrained)" if r.reference else ""), "—" if r.reference else str(r.n_seeds),
             "—" if r.reference else f"{r.tokens:,}",
             _pm(heads[r.arm].mean, heads[r.arm].mean_half, 2) if r.arm in heads else "n/a",
             *_lens_cells(r, digits)] for r in lens]
    header = ["arm", "seeds", "tokens", f"mean {label}", *(c[0] for c in columns)]
    return [title, "", text, "", *_table(header, rows), ""]


def _attention_section(runs: list[Run], heads: dict[str, Headline], label: str) -> list[str]:
    return _lens_section(
        "## Attention at the final checkpoint",
        "QK-Norm exists to keep attention logits bounded and attention from collapsing onto single keys (QK-Clip "
        "caps the logit directly), so these sit next to the key metric. Attention is recomputed on the probe set "
        "from the post-RoPE q and k. Normalised entropy is each query row's entropy divided by log(visible keys), "
        "averaged over rows t ≥ 1, heads and layers (1 = uniform over the visible keys, 0 = every query reads "
        "one key); the entropy in nats is averaged the same way; the max logit is the largest scaled "
        "pre-softmax logit q·k/√D, max over heads and layers (docs/lenses.md, section 2). Seed means ± 95% "
        "half-width; tokens = the last checkpoint with attention rows.",
        ATTENTION_COLUMNS, [3, 3, 2], lens_table(runs, ATTENTION_COLUMNS), heads, label)


def _weights_section(runs: list[Run], heads: dict[str, Headline], label: str) -> list[str]:
    return _lens_section(
        "## Weights at the final checkpoint",
        "Stable rank ‖W‖_F²/‖W‖₂² of the whole W_q and W_k (mean over layers) and their spectral norm σ₁ "
        "(max over layers), the operator norm that Muon's orthogonalised updates control (docs/lenses.md, "
        "section 3). "
        "Seed means ± 95% half-width; tokens = the last checkpoint with weight rows.",
        WEIGHT_COLUMNS, [2, 2, 3, 3], lens_table(runs, WEIGHT_COLUMNS), heads, label)


def _checkpoint_section(prs: dict, tensor: str, metric: str) -> list[str]:
    tokens = sorted({int(t) for pr in prs.values() for t in pr.tokens})
    cols = {}
    for arm, pr in prs.items():
        mean, half = pr.trajectory()
        cols[arm] = {int(t): _pm(m, h, 2) for t, m, h in zip(pr.tokens, mean, half)}
    rows = [[f"{t:,}" + (" (init)" if t == 0 else "")] + [cols[a].get(t, "—") for a in prs] for t in tokens]
    return [
        f"## Mean {metric_label(tensor, metric)} over layers at each checkpoint", "",
        "Only checkpoints that every seed of an arm reached are aggregated.", "",
        *_table(["tokens"] + [f"`{a}`" for a in prs], rows), "",
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
               ("weight_spectra.png", "Stable rank of W_k per layer at the final checkpoint")]
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
        rows.append([f"`{arm}`", seeds, *(_pm(m, h, d, ",") for m, h, d in zip(mean, half, digits))])
    if not rows:
        return []
    header = ["arm", "seeds", "wall time (s)", "training rate (tokens/s)", "set-up (%)", "first step (%)",
              "evals (%)", "probes (%)", "checkpoints (%)"]
    return [
        "## Where the time went", "",
        "From each run's `end` row (docs/metrics.md, section `end`). Wall time is the whole run, summed over "
        "resumed segments. Set-up runs from the start of a process to its first step (tokens, model, optimizer, "
        "checkpoint loading); the first step is mostly compiling and autotuning; probes include every lens. "
        "The shares are percentages of wall time; what they leave is the other training steps and saving the "
        "final weights, and the training rate is the tokens after the first step divided by that remainder. "
        "Values are seed means; ± is the 95% t-interval half-width over seeds (shown only where an arm has more "
        "than one seed with timings). Runs written before these fields have no timings and are left out; "
        "\"1 of 2\" seeds says one seed of two had them.", "",
        *_table(header, rows), "",
    ]


def _where(run: Run, root: Path) -> Path:
    """A run's metrics file, relative to the report's folder where it lies inside it."""
    return run.path.relative_to(root) if run.path.is_relative_to(root) else run.path


def _incomplete_section(incomplete: list[Run], root: Path) -> list[str]:
    if not incomplete:
        return []
    rows = []
    for r in incomplete:
        reached = max((int(x.get("tokens", 0)) for k in ("train", "eval", "probe") for x in r.rows.get(k, [])),
                      default=0)
        rows.append([f"`{r.name}`", f"`{r.arm}`", str(r.seed), f"{reached:,}", f"`{_where(r, root)}`"])
    return [
        "## Incomplete runs", "",
        f"{len(incomplete)} run(s) have no `end` row (crashed, killed, or still running). They are excluded "
        "from every number, table and figure in this report.", "",
        *_table(["run", "arm", "seed", "last tokens logged", "metrics file"], rows), "",
    ]


def _diverged_section(diverged: list[Run], root: Path) -> list[str]:
    if not diverged:
        return []
    rows = []
    for r in diverged:
        ckpt = r.rows["end"][-1].get("checkpoint_step")
        rows.append([f"`{r.name}`", f"`{r.arm}`", str(r.seed), f"{r.ended_at:,}",
                     "none" if ckpt is None else f"step {ckpt}", f"`{_where(r, root)}`"])
    return [
        "## Diverged runs", "",
        f"{len(diverged)} run(s) stopped because the training loss or the weights became NaN or infinite. "
        "They are excluded from every number, table and figure in this report; their last good checkpoint "
        "is kept in the run folder (`checkpoint.pt`).", "",
        *_table(["run", "arm", "seed", "diverged at tokens", "last good checkpoint", "metrics file"], rows), "",
    ]


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
        lines += ["Settings that differ between arms:", "", *_table(["key"] + [f"`{a}`" for a in arms], rows), ""]
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
            val = {a: heads[a].val_loss for a in arms}
            lines += findings_section(findings(arms, {a: prs[a] for a in arms}, runs, dead_pr, val, label))
        lines += _attention_section(runs, heads, label) if has_rows(runs, "attn") else []
        lines += _weights_section(runs, heads, label) if has_rows(runs, "weights") else []
        if arms:
            lines += _checkpoint_section({a: prs[a] for a in arms}, tensor, metric)
        lines += _figure_section(out_dir, list(arms), list(refs), label, figures)
        lines += _cost_section(arms)
    lines += _diverged_section(diverged, base)
    lines += _incomplete_section(incomplete, base)
    if arms:
        lines += _config_section(arms)
    if arms or refs:
        lines += _env_section([r for g in {**arms, **refs}.values() for r in g])
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "report.md"
    path.write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8")
    return path


def headline_numbers(runs: list[Run], tap: str | None = None, tensor: str = "k",
                     metric: str | None = None) -> list[Headline]:
    """The headline rows as data (for callers that want numbers, not Markdown): trained arms, then
    pretrained references (`Headline.reference`)."""
    metric = check_metric(metric)
    arms = finished_by_arm(runs)
    finished = [r for g in arms.values() for r in g]
    if not finished:
        return []
    trained = [r for r in finished if not r.reference] or finished
    tap = tap or default_tap(finished)
    return [headline(arm_pr(g, tap, tensor, metric), g, trained[0].dead_pr) for g in arms.values()]

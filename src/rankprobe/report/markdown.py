"""`report.md`: what was run, the headline key-PR table per arm, PR per checkpoint, figures, configs.

Numbers come from metrics files only (see docs/metrics.md). Every aggregate is a seed mean with a
95% Student-t half-width when an arm has more than one seed. Runs without an `end` row are listed as
incomplete, runs whose loss or weights went NaN/inf as diverged (with the token count where they stopped); both
are left out of every number and figure.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

from rankprobe.report.figures import TENSOR_NAME, fmt_tokens, heatmap_name
from rankprobe.report.metrics import (Headline, Run, arm_key, arm_pr, default_tap, find_runs, finished_by_arm,
                                      headline)

TAP_MEANING = {
    "proj": "right after the key projection W_k",
    "norm": "after QK-Norm (identical to `proj` in arms without QK-Norm)",
    "rope": "after RoPE, i.e. what attention actually consumes",
}
_SKIP_CONFIG = {"name", "out", "train.seed", "train.progress", "train.tensorboard"}


def _pm(mean: float, half: float, digits: int) -> str:
    if not math.isfinite(mean):
        return "n/a"
    return f"{mean:.{digits}f}" + (f" ± {half:.{digits}f}" if math.isfinite(half) else "")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(r) + " |" for r in rows)]


def _flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


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
    values = sorted({_flatten(r.config).get(key, "?") for r in runs}, key=str)
    return "/".join(fmt(v) if v != "?" else v for v in values)


def _summary(runs: list[Run], arms: dict[str, list[Run]], incomplete: list[Run], diverged: list[Run]) -> str:
    if not arms:
        why = f"{len(diverged)} diverged, the rest have no `end` row" if diverged else "no `end` row"
        return (f"Found {len(runs)} run(s) under this folder; none has finished ({why}), so there "
                "are no headline numbers yet.")
    ran = [r for g in arms.values() for r in g]
    per_arm = ", ".join(f"`{a}` × {len(g)} seed{'s' if len(g) != 1 else ''} ({', '.join(str(r.seed) for r in g)})"
                        for a, g in arms.items())
    params = sorted({r.info.get("n_params") for r in ran if r.info.get("n_params")})
    params_text = "/".join(dict.fromkeys(f"{p / 1e6:.2f}M" for p in params)) or "?"
    kv_heads = "/".join(sorted({str(_flatten(r.config).get("model.n_kv_head") or _flatten(r.config).get("model.n_head"))
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
    if diverged:
        text += f" {len(diverged)} run(s) diverged (NaN/inf) and are excluded (see below)."
    if incomplete:
        text += f" {len(incomplete)} further run(s) did not finish and are excluded (see below)."
    return text


def _headline_section(heads: list[Headline], tap: str, tensor: str, head_dim: int, dead_pr: float,
                      diverged: list[Run]) -> list[str]:
    lost: dict[str, list[Run]] = {}
    for r in diverged:
        lost.setdefault(r.arm, []).append(r)
    rows = {h.arm: [
        f"`{h.arm}`", str(h.n_seeds) + (f" (+{len(lost[h.arm])} diverged)" if h.arm in lost else ""),
        f"{h.tokens:,}", _pm(h.mean_pr, h.mean_pr_half, 2),
        f"L{h.weakest_layer}: {_pm(h.weakest_pr, h.weakest_half, 2)}",
        f"{len(h.dead_layers)}" + (f" ({', '.join(f'L{i}' for i in h.dead_layers)})" if h.dead_layers else ""),
        _pm(h.val_loss, h.val_loss_half, 4),
    ] for h in heads}
    for arm, group in lost.items():  # every seed diverged: say where instead of showing numbers
        if arm not in rows:
            where = ", ".join(f"{r.ended_at:,} tokens (seed {r.seed})" for r in group)
            rows[arm] = [f"`{arm}`", "0", "—", f"diverged at {where}", "—", "—", "—"]
    header = ["arm", "seeds", "tokens", f"mean {TENSOR_NAME.get(tensor, tensor)} PR", "weakest layer: PR",
              f"dead layers (PR < {dead_pr:g})", "val loss"]
    return [
        "## Headline: key PR at the final checkpoint", "",
        f"Headline tap: `{tap}`, {TAP_MEANING.get(tap, 'see docs/metrics.md')}. The Participation "
        f"Ratio PR = (Σλ)²/Σλ² of the eigenvalues λ of a head's centred key covariance counts how many "
        f"dimensions the keys effectively use: PR = head_dim = {head_dim} means all dimensions are used "
        f"equally, PR = 1 means the keys have collapsed onto one direction. A layer's PR is the mean over "
        f"its heads. Values are seed means; ± is the 95% t-interval half-width over seeds (shown only where "
        f"an arm has more than one seed). Mean PR averages the layers; the weakest layer and the dead layers "
        f"are read from the seed-mean layer profile; val loss is the last evaluation (nats/token).", "",
        *_table(header, [rows[a] for a in sorted(rows, key=arm_key)]), "",
    ]


def _checkpoint_section(prs: dict, tensor: str) -> list[str]:
    tokens = sorted({int(t) for pr in prs.values() for t in pr.tokens})
    cols = {}
    for arm, pr in prs.items():
        mean, half = pr.trajectory()
        cols[arm] = {int(t): _pm(m, h, 2) for t, m, h in zip(pr.tokens, mean, half)}
    rows = [[f"{t:,}" + (" (init)" if t == 0 else "")] + [cols[a].get(t, "—") for a in prs] for t in tokens]
    return [
        f"## Mean {TENSOR_NAME.get(tensor, tensor)} PR over layers at each checkpoint", "",
        "Only checkpoints that every seed of an arm reached are aggregated.", "",
        *_table(["tokens"] + [f"`{a}`" for a in prs], rows), "",
    ]


def _figure_section(out_dir: Path, arms: list[str]) -> list[str]:
    figures = [("pr_trajectory.png", "Mean key PR over layers vs training tokens"),
               ("layer_comparison.png", "Key PR per layer at the final checkpoint"),
               *((heatmap_name(a), f"`{a}`: key PR by layer and checkpoint") for a in arms),
               ("loss_curves.png", "Training and validation loss")]
    lines = ["## Figures", ""]
    for name, caption in figures:
        if (out_dir / name).exists():
            lines += [f"**{caption}**", "", f"![{caption}]({name})", ""]
    return lines if len(lines) > 2 else []


def _incomplete_section(incomplete: list[Run], root: Path) -> list[str]:
    if not incomplete:
        return []
    rows = []
    for r in incomplete:
        reached = max((int(x.get("tokens", 0)) for k in ("train", "eval", "probe") for x in r.rows.get(k, [])),
                      default=0)
        where = r.path.relative_to(root) if r.path.is_relative_to(root) else r.path
        rows.append([f"`{r.name}`", f"`{r.arm}`", str(r.seed), f"{reached:,}", f"`{where}`"])
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
        where = r.path.relative_to(root) if r.path.is_relative_to(root) else r.path
        rows.append([f"`{r.name}`", f"`{r.arm}`", str(r.seed), f"{r.ended_at:,}",
                     "none" if ckpt is None else f"step {ckpt}", f"`{where}`"])
    return [
        "## Diverged runs", "",
        f"{len(diverged)} run(s) stopped because the training loss or the weights became NaN or infinite. "
        "They are excluded from every number, table and figure in this report; their last good checkpoint "
        "is kept in the run folder (`checkpoint.pt`).", "",
        *_table(["run", "arm", "seed", "diverged at tokens", "last good checkpoint", "metrics file"], rows), "",
    ]


def _config_section(arms: dict[str, list[Run]]) -> list[str]:
    runs = [r for g in arms.values() for r in g]
    flat = {id(r): {k: v for k, v in _flatten(r.config).items() if k not in _SKIP_CONFIG} for r in runs}
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
                 tensor: str = "k", runs: list[Run] | None = None) -> Path:
    """Write `report.md` into `out_dir` (default: `root`) from the metrics files under `root`;
    links the figures already present there (build_report draws them first). Returns its path."""
    root = Path(root)
    out_dir = Path(out_dir) if out_dir is not None else (root if root.is_dir() else root.parent)
    runs = runs if runs is not None else find_runs(root)
    arms = finished_by_arm(runs)
    diverged = [r for r in runs if r.status == "diverged"]
    incomplete = [r for r in runs if not r.finished and r.status != "diverged"]
    base = root if root.is_dir() else root.parent
    lines = [f"# RankProbe report: `{base.resolve().name}`", "", _summary(runs, arms, incomplete, diverged), ""]
    if arms:
        finished = [r for g in arms.values() for r in g]
        tap = tap or default_tap(finished)
        head_dim = max(r.head_dim for r in finished)
        dead_pr = finished[0].dead_pr
        prs = {a: arm_pr(g, tap, tensor) for a, g in arms.items()}
        heads = [headline(prs[a], g, dead_pr) for a, g in arms.items()]
        lines += _headline_section(heads, tap, tensor, head_dim, dead_pr, diverged)
        lines += _checkpoint_section(prs, tensor)
        lines += _figure_section(out_dir, list(arms))
    lines += _diverged_section(diverged, base)
    lines += _incomplete_section(incomplete, base)
    if arms:
        lines += _config_section(arms)
        lines += _env_section([r for g in arms.values() for r in g])
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "report.md"
    path.write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8")
    return path


def headline_numbers(runs: list[Run], tap: str | None = None, tensor: str = "k") -> list[Headline]:
    """The headline rows as data (for callers that want numbers, not Markdown)."""
    arms = finished_by_arm(runs)
    finished = [r for g in arms.values() for r in g]
    if not finished:
        return []
    tap = tap or default_tap(finished)
    return [headline(arm_pr(g, tap, tensor), g, finished[0].dead_pr) for g in arms.values()]


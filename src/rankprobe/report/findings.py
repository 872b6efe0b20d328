"""The report's "Findings": the study's four questions answered from the metrics files alone.

1. early QK-Norm effect on the key metric, 2. which arm ends highest (and how many layers are dead),
3. whether validation loss ranks the arms the same way (Spearman), 4. attention-logit growth and
whether Muon keeps it below AdamW. Each question is one function from the study's series to its
Markdown lines; a question whose arms or rows are absent says why instead of answering. Differences
are judged by `series.verdict`.
"""

from __future__ import annotations

import math

import numpy as np

from rankprobe.report.fmt import ARM_COLUMNS, arm_cell, arm_cells, block, pm, prose, table
from rankprobe.report.metrics import Run
from rankprobe.report.series import ArmSeries, Study, estimate, spearman, verdict

EARLY_TOKENS = 1_000_000
"""the checkpoint question 1 looks for; runs with a smaller budget use EARLY_FRACTION of it instead"""
EARLY_FRACTION = 0.1


def early_checkpoint(tokens: list[int], budget: int) -> tuple[int | None, str]:
    """The checkpoint nearest EARLY_TOKENS (earlier on a tie) when the budget reaches it; else the
    first checkpoint at or after EARLY_FRACTION of the budget. Init (tokens 0) is never chosen."""
    positive = sorted(t for t in tokens if t > 0)
    if budget >= EARLY_TOKENS:
        if not positive:
            return None, "no checkpoint after init"
        return min(positive, key=lambda t: (abs(t - EARLY_TOKENS), t)), "the checkpoint nearest 1M tokens"
    later = [t for t in positive if t >= EARLY_FRACTION * budget]
    rule = prose("findings", "early_short", fraction=EARLY_FRACTION, budget=budget)
    return (later[0] if later else None), rule


def early_common(prs: list[ArmSeries], runs: list[Run]) -> tuple[int | None, str]:
    """`early_checkpoint` among the checkpoints common to `prs`, for the largest budget of `runs`
    (`train.tokens`, or the last checkpoint logged where that is larger)."""
    common = sorted(set.intersection(*(set(map(int, p.tokens)) for p in prs)))
    budgets = [int(r.config.get("train", {}).get("tokens") or 0) for r in runs]
    return early_checkpoint(common, max(budgets + [int(p.tokens[-1]) for p in prs]))


def qk_pairs(arms: dict[str, list[Run]]) -> list[tuple[str, str]]:
    """(`o`, `o+qknorm`): the arm names without and with QK-Norm of each of the arms' optimizers `o`, in arm
    order (either arm may be absent)."""
    return [(o, f"{o}+qknorm") for o in dict.fromkeys(g[0].optimizer for g in arms.values())]


def early_effect(study: Study, prs: dict[str, ArmSeries]) -> list[str]:
    """1. For every optimizer `o` with both arms `o` and `o+qknorm`: the key metric at the early checkpoint."""
    lines, skipped = ["### 1. Early effect of QK-Norm", ""], []
    for off, on in qk_pairs(study.arms):
        if on not in prs or off not in prs:
            missing = " and ".join(arm_cell(a) for a in (off, on) if a not in prs)
            skipped.append(f"`{off}`: no finished {missing} arm to compare")
            continue
        tokens, rule = early_common([prs[on], prs[off]], study.arms[on] + study.arms[off])
        if tokens is None:
            skipped.append(f"`{off}`: {rule}; no checkpoint common to both arms qualifies")
            continue
        a, b = prs[on].at_tokens(tokens), prs[off].at_tokens(tokens)
        lines += block(prose("findings", "early", opt=off, tokens=tokens, rule=rule, label=study.label, on=pm(a),
                             off=pm(b), diff=a.mean - b.mean,
                             verdict=verdict(a, b, "higher with QK-Norm", "lower with QK-Norm")))
    skipped += [] if study.arms else ["no finished trained arm"]
    return lines + [f"Not answered for {s}." for s in skipped] + ([""] if skipped else [])


def final_ranking(study: Study, prs: dict[str, ArmSeries]) -> tuple[list[str], list[str]]:
    """2. The arms by their final seed-mean key metric, highest first, with the per-seed count of dead
    layers (PR only); returns (lines, arms in that order)."""
    lines, label, dead_pr = ["### 2. Final checkpoint", ""], study.label, study.dead_pr
    dead = {a: estimate((pr.values[:, -1, :] < dead_pr).sum(axis=1)) for a, pr in prs.items() if pr.metric == "pr"}
    ranked = sorted(prs, key=lambda a: -prs[a].at(-1).mean)
    if not ranked:
        return lines + block("No finished trained arm."), ranked
    best = prs[ranked[0]].at(-1)
    if len(ranked) == 1:
        lines.append(f"Only one arm, `{ranked[0]}`: mean {label} {pm(best)}; there is no ranking to report.")
    else:
        second = prs[ranked[1]].at(-1)
        lines.append(prose("findings", "ranking", best=ranked[0], label=label, best_value=pm(best), second=ranked[1],
                           second_value=pm(second), verdict=verdict(best, second)))
    if not dead:
        lines.append("Dead layers are counted for PR only (`probe.dead_pr` is a PR value).")
    rows = [[*arm_cells(prs[a]), pm(prs[a].at(-1)), *([pm(dead[a], 1)] if dead else [])] for a in ranked]
    dead_column = [f"layers with PR < {dead_pr:g} (per-seed count)"] if dead else []
    return lines + ["", *block(table([*ARM_COLUMNS, f"mean {label}", *dead_column], rows))], ranked


def loss_agreement(study: Study, prs: dict[str, ArmSeries], ranked: list[str]) -> list[str]:
    """3. Spearman's rho between the arms' final key metric and their negative final val loss."""
    title = "### 3. Does validation loss agree with the ranking?"
    val_loss = {a: estimate([r.final_val_loss() for r in g]).mean for a, g in study.arms.items()}
    by_metric = [a for a in ranked if math.isfinite(val_loss.get(a, math.nan))]
    by_loss = sorted(by_metric, key=lambda a: val_loss[a])
    order = (f"By the key metric (highest first): {', '.join(map(arm_cell, by_metric)) or 'none'}; "
             f"by final val loss (lowest first): {', '.join(map(arm_cell, by_loss)) or 'none'}.")
    if len(by_metric) < 3:
        why = f"{len(by_metric)} arm(s) with a final val loss; a rank correlation needs at least 3"
        return block(title, f"Cannot be assessed: {why}. {order}")
    rho = spearman([prs[a].at(-1).mean for a in by_metric], [-val_loss[a] for a in by_metric])
    if not math.isfinite(rho):
        return block(title, f"Cannot be assessed: every arm ties on one of the two. {order}")
    return block(title, prose("findings", "loss_spearman", rho=rho, n=len(by_metric), order=order))


def logit_growth(study: Study) -> list[str]:
    """4. Max logit (max over layers and heads, per seed) at each trained arm's first checkpoint after
    init and its final one, and whether Muon ends below AdamW without QK-Norm."""
    title = "### 4. Attention-logit growth"
    series = study.series("attn", "max_logit", trained=True)
    first = {a: int(np.flatnonzero(s.tokens > 0)[0]) for a, s in series.items() if (s.tokens > 0).any()}
    if not first:
        return block(title, prose("findings", "logits_after_init" if series else "no_logits"))
    rows = []
    for arm, i in first.items():
        s = series[arm]
        a, b = s.at(i), s.at(-1)
        growth = b.mean / a.mean if a.mean else math.nan
        rows.append([arm_cell(arm), f"{int(s.tokens[i]):,}", pm(a), f"{int(s.tokens[-1]):,}", pm(b),
                     f"{growth:.2f}×" if math.isfinite(growth) else "n/a"])
    lines = block(title, prose("findings", "logits"), table(["arm", "first tokens", "max logit (first)",
                                                             "final tokens", "max logit (final)", "growth"], rows))
    if "muon" not in first or "adamw" not in first:
        missing = " and ".join(arm_cell(a) for a in ("adamw", "muon") if a not in first)
        return lines + block(f"Muon vs AdamW without QK-Norm: not answered, no {missing} arm with attention rows.")
    m, a = series["muon"].at(-1), series["adamw"].at(-1)
    return lines + block(prose("findings", "muon_logits", muon=pm(m), adamw=pm(a), verdict=verdict(m, a)))


def findings_section(study: Study) -> list[str]:
    """The "## Findings" Markdown lines for the study's trained arms, at its headline tap and metric."""
    prs = {a: study.prs[a] for a in study.arms}
    ranking, ranked = final_ranking(study, prs)
    return ["## Findings", "", prose("findings", "intro", label=study.label), "", *early_effect(study, prs),
            *ranking, *loss_agreement(study, prs, ranked), *logit_growth(study)]

"""The report's "Findings": the study's four questions answered from the metrics files alone.

1. early QK-Norm effect on the key metric, 2. which arm ends highest (and how many layers are dead),
3. whether validation loss ranks the arms the same way (Spearman), 4. attention-logit growth and
whether Muon keeps it below AdamW. Each answer is a dataclass computed by a pure function, then
rendered by `findings_section`; a question whose arms or rows are absent carries the reason instead.

A difference is called resolved only when the two arms' 95% t-intervals over seeds do not overlap
(a conservative check, stricter than a two-sample test); with one seed there is no interval and only
the point values are reported. Rules in docs/metrics.md, "Headline numbers".
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from rankprobe.report.fmt import pm, prose, table
from rankprobe.report.metrics import Run
from rankprobe.report.series import ArmSeries, lens_series
from rankprobe.report.stats import Estimate, estimate, spearman

EARLY_TOKENS = 1_000_000
"""the checkpoint question 1 looks for; runs with a smaller budget use EARLY_FRACTION of it instead"""
EARLY_FRACTION = 0.1


# ---------------------------------------------------------------------------------------------
# seed estimates and the resolution rule


def resolution(a: Estimate, b: Estimate) -> str:
    """'single seed' when either side has no interval, 'resolved' when the 95% intervals do not
    overlap, 'not resolved' otherwise."""
    if a.n < 2 or b.n < 2 or not (math.isfinite(a.half) and math.isfinite(b.half)):
        return "single seed"
    return "resolved" if abs(a.mean - b.mean) > a.half + b.half else "not resolved"


def _seeds(a: Estimate, b: Estimate) -> str:
    return f"{a.n} seeds" if a.n == b.n else f"{a.n} and {b.n} seeds"


def verdict(a: Estimate, b: Estimate, higher: str = "higher", lower: str = "lower") -> str:
    """How `a` stands against `b`, in words that never claim more than the intervals support."""
    status = resolution(a, b)
    if status == "single seed":
        return f"{higher if a.mean > b.mean else lower} on a single seed (no interval, point values only)"
    if status == "not resolved":
        return f"not resolved with {_seeds(a, b)} (the 95% intervals overlap)"
    return f"{higher if a.mean > b.mean else lower}, resolved (the 95% intervals do not overlap; {_seeds(a, b)})"


# ---------------------------------------------------------------------------------------------
# 1. early QK-Norm effect


@dataclass
class EarlyPair:
    optimizer: str
    tokens: int
    rule: str
    """how `tokens` was chosen, in words"""
    with_qk: Estimate
    without: Estimate

    @property
    def difference(self) -> float:
        return self.with_qk.mean - self.without.mean


@dataclass
class EarlyEffect:
    pairs: list[EarlyPair] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    """one reason per optimizer (or for the whole question) that could not be answered"""


def early_checkpoint(tokens: list[int], budget: int) -> tuple[int | None, str]:
    """The checkpoint nearest EARLY_TOKENS (earlier on a tie) when the budget reaches it; else the
    first checkpoint at or after EARLY_FRACTION of the budget. Init (tokens 0) is never chosen."""
    positive = sorted(t for t in tokens if t > 0)
    if budget >= EARLY_TOKENS:
        if not positive:
            return None, "no checkpoint after init"
        return min(positive, key=lambda t: (abs(t - EARLY_TOKENS), t)), "the checkpoint nearest 1M tokens"
    floor = EARLY_FRACTION * budget
    later = [t for t in positive if t >= floor]
    rule = (f"the first checkpoint at or after {EARLY_FRACTION:.0%} of the {budget:,}-token budget (the runs "
            "are shorter than 1M tokens)")
    return (later[0] if later else None), rule


def _budget(runs: list[Run], pr: ArmSeries) -> int:
    budgets = [int(r.config.get("train", {}).get("tokens") or 0) for r in runs]
    return max(budgets + [int(pr.tokens[-1])])


def _at(pr: ArmSeries, tokens: int) -> Estimate:
    return pr.at(int(np.flatnonzero(pr.tokens == tokens)[0]))


def early_effect(arms: dict[str, list[Run]], prs: dict[str, ArmSeries]) -> EarlyEffect:
    """For every optimizer `o` with both arms `o` and `o+qknorm`: the key metric at the early checkpoint."""
    out = EarlyEffect()
    optimizers = list(dict.fromkeys(g[0].optimizer for g in arms.values()))
    for opt in optimizers:
        on, off = f"{opt}+qknorm", opt
        if on not in prs or off not in prs:
            missing = " and ".join(f"`{a}`" for a in (off, on) if a not in prs)
            out.skipped.append(f"`{opt}`: no finished {missing} arm to compare")
            continue
        common = sorted(set(map(int, prs[on].tokens)) & set(map(int, prs[off].tokens)))
        budget = max(_budget(arms[on], prs[on]), _budget(arms[off], prs[off]))
        tokens, rule = early_checkpoint(common, budget)
        if tokens is None:
            out.skipped.append(f"`{opt}`: {rule}; no checkpoint common to both arms qualifies")
            continue
        out.pairs.append(EarlyPair(opt, tokens, rule, _at(prs[on], tokens), _at(prs[off], tokens)))
    if not optimizers:
        out.skipped.append("no finished trained arm")
    return out


# ---------------------------------------------------------------------------------------------
# 2. the final checkpoint


@dataclass
class FinalArm:
    arm: str
    tokens: int
    value: Estimate
    dead: Estimate | None
    """per-seed count of layers below dead_pr (PR only), as a seed mean"""


@dataclass
class FinalRanking:
    arms: list[FinalArm]
    """highest seed-mean value first"""
    dead_pr: float

    @property
    def best(self) -> FinalArm | None:
        return self.arms[0] if self.arms else None

    @property
    def runner_up(self) -> FinalArm | None:
        return self.arms[1] if len(self.arms) > 1 else None


def final_ranking(prs: dict[str, ArmSeries], dead_pr: float) -> FinalRanking:
    rows = []
    for arm, pr in prs.items():
        dead = estimate((pr.values[:, -1, :] < dead_pr).sum(axis=1)) if pr.metric == "pr" else None  # (S,)
        rows.append(FinalArm(arm, int(pr.tokens[-1]), pr.at(-1), dead))
    return FinalRanking(sorted(rows, key=lambda r: -r.value.mean), dead_pr)


# ---------------------------------------------------------------------------------------------
# 3. does validation loss agree?


@dataclass
class Agreement:
    by_metric: list[str]
    """arms by seed-mean key metric, highest first"""
    by_loss: list[str]
    """arms by seed-mean final val loss, lowest first"""
    rho: float
    skipped: str | None = None


def loss_agreement(ranking: FinalRanking, val_loss: dict[str, float]) -> Agreement:
    """Spearman's rho between the arms' final key metric and their negative final val loss."""
    arms = [r for r in ranking.arms if math.isfinite(val_loss.get(r.arm, math.nan))]
    by_metric = [r.arm for r in arms]
    by_loss = sorted(by_metric, key=lambda a: val_loss[a])
    if len(arms) < 3:
        why = f"{len(arms)} arm(s) with a final val loss; a rank correlation needs at least 3"
        return Agreement(by_metric, by_loss, math.nan, why)
    rho = spearman([r.value.mean for r in arms], [-val_loss[a] for a in by_metric])
    return Agreement(by_metric, by_loss, rho, None if math.isfinite(rho) else "every arm ties on one of the two")


# ---------------------------------------------------------------------------------------------
# 4. attention-logit growth


@dataclass
class LogitArm:
    arm: str
    first_tokens: int
    first: Estimate
    final_tokens: int
    final: Estimate

    @property
    def growth(self) -> float:
        """Ratio of the seed means, final over first."""
        return self.final.mean / self.first.mean if self.first.mean else math.nan


@dataclass
class LogitGrowth:
    arms: list[LogitArm] = field(default_factory=list)
    muon: LogitArm | None = None
    adamw: LogitArm | None = None
    """the arms without QK-Norm compared in the second sentence (None when absent)"""
    skipped: str | None = None


def logit_growth(runs: list[Run], trained: list[str]) -> LogitGrowth:
    """Max logit (max over layers and heads, per seed) at each arm's first checkpoint after init and its
    final one; `trained` names the arms to include (references are left out)."""
    series = {a: s for a, s in lens_series(runs, "attn", "max_logit", "max").items() if a in trained}
    if not series:
        return LogitGrowth(skipped="attention lenses were not recorded in these metrics files (no `attn` rows "
                                   "with `max_logit`)")
    out = LogitGrowth()
    for arm, s in series.items():
        positive = np.flatnonzero(s.tokens > 0)
        if positive.size == 0:
            continue
        i = int(positive[0])
        out.arms.append(LogitArm(arm, int(s.tokens[i]), s.at(i), int(s.tokens[-1]), s.at(-1)))
    if not out.arms:
        out.skipped = "the attention rows hold no checkpoint after init"
    by_arm = {r.arm: r for r in out.arms}
    out.muon, out.adamw = by_arm.get("muon"), by_arm.get("adamw")
    return out


# ---------------------------------------------------------------------------------------------
# all four, and the Markdown


@dataclass
class Findings:
    label: str
    """'key PR', 'key erank', ..."""
    early: EarlyEffect
    final: FinalRanking
    agreement: Agreement
    logits: LogitGrowth


def findings(arms: dict[str, list[Run]], prs: dict[str, ArmSeries], runs: list[Run], dead_pr: float,
             val_loss: dict[str, float], label: str) -> Findings:
    """The four answers for the trained `arms` (their `prs` at the headline tap and metric)."""
    prs = {a: prs[a] for a in arms}
    ranking = final_ranking(prs, dead_pr)
    return Findings(label, early_effect(arms, prs), ranking, loss_agreement(ranking, val_loss),
                    logit_growth(runs, list(arms)))


def _early_lines(e: EarlyEffect, label: str) -> list[str]:
    lines = ["### 1. Early effect of QK-Norm", ""]
    for p in e.pairs:
        lines += [f"`{p.optimizer}` at {p.tokens:,} tokens, {p.rule}: mean {label} {pm(p.with_qk)} with QK-Norm "
                  f"vs {pm(p.without)} without, difference {p.difference:+.2f}: "
                  f"{verdict(p.with_qk, p.without, 'higher with QK-Norm', 'lower with QK-Norm')}.", ""]
    lines += [f"Not answered for {s}." for s in e.skipped] + ([""] if e.skipped else [])
    return lines


def _final_lines(f: FinalRanking, label: str) -> list[str]:
    lines = ["### 2. Final checkpoint", ""]
    best, second = f.best, f.runner_up
    if best is None:
        return lines + ["No finished trained arm.", ""]
    if second is None:
        lines.append(f"Only one arm, `{best.arm}`: mean {label} {pm(best.value)}; there is no ranking to report.")
    else:
        lines.append(f"`{best.arm}` has the highest mean {label} ({pm(best.value)}); against the runner-up "
                     f"`{second.arm}` ({pm(second.value)}) it is {verdict(best.value, second.value)}.")
    if best.dead is None:
        lines.append("Dead layers are counted for PR only (`probe.dead_pr` is a PR value).")
    rows = [[f"`{r.arm}`", str(r.value.n), f"{r.tokens:,}", pm(r.value)] + ([pm(r.dead, 1)] if r.dead else [])
            for r in f.arms]
    header = ["arm", "seeds", "tokens", f"mean {label}"] + (
        [f"layers with PR < {f.dead_pr:g} (per-seed count)"] if best.dead else [])
    return lines + ["", *table(header, rows), ""]


def _agreement_lines(a: Agreement) -> list[str]:
    lines = ["### 3. Does validation loss agree with the ranking?", ""]
    order = (f"By the key metric (highest first): {', '.join(f'`{x}`' for x in a.by_metric) or 'none'}; "
             f"by final val loss (lowest first): {', '.join(f'`{x}`' for x in a.by_loss) or 'none'}.")
    if a.skipped:
        return lines + [f"Cannot be assessed: {a.skipped}. {order}", ""]
    return lines + [f"Spearman rank correlation between the arms' seed-mean key metric and their negative final "
                    f"val loss: ρ = {a.rho:+.2f} over {len(a.by_metric)} arms (+1: the same order, −1: reversed; "
                    f"seed means only, so no interval). {order}", ""]


def _logit_lines(g: LogitGrowth) -> list[str]:
    lines = ["### 4. Attention-logit growth", ""]
    if g.skipped:
        return lines + [f"Not answered: {g.skipped}.", ""]
    rows = [[f"`{r.arm}`", f"{r.first_tokens:,}", pm(r.first), f"{r.final_tokens:,}", pm(r.final),
             f"{r.growth:.2f}×" if math.isfinite(r.growth) else "n/a"] for r in g.arms]
    lines += [prose("findings", "logits"), "",
              *table(["arm", "first tokens", "max logit (first)", "final tokens", "max logit (final)", "growth"],
                      rows), ""]
    if g.muon is None or g.adamw is None:
        missing = " and ".join(f"`{a}`" for a, r in (("adamw", g.adamw), ("muon", g.muon)) if r is None)
        return lines + [f"Muon vs AdamW without QK-Norm: not answered, no {missing} arm with attention rows.", ""]
    m, a = g.muon.final, g.adamw.final
    return lines + [f"Without QK-Norm, the final max logit of `muon` ({pm(m)}) against `adamw` ({pm(a)}) is "
                    f"{verdict(m, a)}.", ""]


def findings_section(f: Findings) -> list[str]:
    """The "## Findings" Markdown lines."""
    return [
        "## Findings", "",
        prose("findings", "intro", label=f.label), "",
        *_early_lines(f.early, f.label), *_final_lines(f.final, f.label), *_agreement_lines(f.agreement),
        *_logit_lines(f.logits),
    ]

"""The report's mechanism findings (issue 18): why some optimizers collapse key rank, from the metrics alone.

Written after the four questions of `findings` whenever the runs' key `probe` rows carry the mechanism
lenses (docs/lenses.md, section 6); absent otherwise, so older reports rebuild unchanged. Each
question is one function from the study's series to Markdown:

5. do the coordinate-wise optimizers (OPTIMIZER_CLASS) collapse key PR and the rotation-equivariant not;
6. does axis alignment rise before, with or after the collapse, per checkpoint;
7. does QK-Norm concentrate keys on the sphere, and does that track PR;
8. are W_q, W_k closer to orthogonal under Muon, and does orthogonality predict key PR across arms;
   then the size and shape of W_k's update (`update` rows) beside where W_k ends;
9. how the early key PR depends on the warmup, for arms that differ only in `optim.warmup_frac`;
10. what the data leave unexplained.

Differences are judged by `series.verdict`; a question the arms present cannot answer says so and
why. Key PR here is always the keys' PR at the headline tap, whatever metric the headline uses.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from rankprobe.report.findings import early_common, qk_pairs
from rankprobe.report.fmt import ARM_COLUMNS, arm_cell, arm_cells, block, pm, prose, table
from rankprobe.report.metrics import Run
from rankprobe.report.series import (
    NO_VALUE, ArmSeries, Estimate, Study, arm_series, estimate, final, resolution, resolved_above, spearman, verdict,
)

COORDINATE, ROTATION, UNCLASSIFIED = "coordinate-wise", "rotation-equivariant", "unclassified"
OPTIMIZER_CLASS = {
    # each coordinate's step depends on that coordinate alone (a sign, or a per-coordinate scale)
    "adamw": COORDINATE, "lion": COORDINATE, "signum": COORDINATE, "adafactor": COORDINATE,
    # the step of a weight matrix W rotated to QW is Q times the step of W (momentum SGD, a step scaled
    # by a matrix norm, orthogonalisation, or a full-matrix preconditioner in its eigenbasis)
    "sgd": ROTATION, "normsgd": ROTATION, "muon": ROTATION, "soap": ROTATION,
}
"""the fixed classification of docs/metrics.md; any other optimizer (`custom`) is unclassified"""
COLLAPSE_FRACTION = 0.5
"""an arm has collapsed once its mean key PR is below this fraction of its value at init"""
ALIGN_MARGIN = 0.1
"""an arm is axis-aligned once its alignment index (axis_ratio − null)/(1 − null) exceeds this"""


def optimizer_class(optimizer: str) -> str:
    return OPTIMIZER_CLASS.get(optimizer, UNCLASSIFIED)


def setting(arm: str, runs: list[Run]) -> tuple[bool, str]:
    """What arms must share to be compared by class or against Muon: QK-Norm on or off, and the arm's
    variant (`@name`: the step-matched `@step` arms, the short-warmup `@warmup1` ones, ...; docs/metrics.md)."""
    return runs[0].qk_norm, arm.partition("@")[2]


def _when(tokens: int | None) -> str:
    return "never" if tokens is None else f"first at {tokens:,} tokens"


def _first(s: ArmSeries, mask: np.ndarray) -> int | None:
    """Tokens of the first checkpoint of `s` where `mask` (over its checkpoints) holds; None if none."""
    hits = np.flatnonzero(mask)
    return int(s.tokens[hits[0]]) if hits.size else None


def collapsed(pr: ArmSeries) -> np.ndarray:
    """(C,) whether the seed-mean key PR is below COLLAPSE_FRACTION of its value at init, per checkpoint
    (never, without an init checkpoint)."""
    mean = pr.trajectory()[0]
    return mean < COLLAPSE_FRACTION * mean[0] if pr.tokens[0] == 0 else np.zeros(mean.shape, dtype=bool)


def alignment_index(runs: list[Run], tap: str) -> ArmSeries | None:
    """(axis_ratio − axis_ratio_null)/(1 − axis_ratio_null) per (seed, checkpoint, layer): 0 at the
    random-rotation null, 1 for an axis-aligned key covariance (docs/lenses.md, section 6)."""
    ratio = arm_series(runs, "probe", "axis_ratio", tap=tap, tensor="k")
    null = arm_series(runs, "probe", "axis_ratio_null", tap=tap, tensor="k")
    if ratio is None or null is None:
        return None
    with np.errstate(invalid="ignore", divide="ignore"):
        return replace(ratio, values=(ratio.values - null.values) / (1.0 - null.values))


def orth_devs(arms: dict[str, list[Run]]) -> dict[str, tuple[ArmSeries, ArmSeries, ArmSeries | None]]:
    """arm -> the orth_dev series of W_q and W_k and W_k's Gaussian null, for the arms with `orth_dev` weight rows."""
    out = {}
    for arm, runs in arms.items():
        q, k = (arm_series(runs, "weights", "orth_dev", matrix=m) for m in "qk")
        if q is not None and k is not None:
            out[arm] = (q, k, arm_series(runs, "weights", "orth_dev_null", matrix="k"))
    return out


def final_orth(q: ArmSeries, k: ArmSeries) -> np.ndarray:
    """(S,) per seed: the mean of W_q's and W_k's orth_dev (each a mean over layers) at the final checkpoint."""
    return 0.5 * (q.per_seed()[:, -1] + k.per_seed()[:, -1])


# ---------------------------------------------------------------------------------------------
# the questions


def class_split(arms: dict[str, list[Run]], prs: dict[str, ArmSeries]) -> tuple[list[str], dict[str, str]]:
    """5. Final key PR per arm grouped by class; per `setting` (QK-Norm, variant), the highest
    coordinate-wise arm against the lowest rotation-equivariant one. Returns (lines, arm -> class)."""
    cls = {a: optimizer_class(g[0].optimizer) for a, g in arms.items()}
    order = sorted(arms, key=lambda a: ([COORDINATE, ROTATION, UNCLASSIFIED].index(cls[a]), -prs[a].at(-1).mean))
    rows = [[arm_cell(a), cls[a], str(prs[a].n_seeds), f"{int(prs[a].tokens[-1]):,}",
             pm(prs[a].at(0)) if prs[a].tokens[0] == 0 else "n/a", pm(prs[a].at(-1))] for a in order]
    lines = block("### 5. Coordinate-wise against rotation-equivariant optimizers", prose("mechanism", "classes"),
                  table(["arm", "class", "seeds", "tokens", "key PR at init", "final key PR"], rows))
    groups: dict[tuple[bool, str], list[str]] = {}
    for a in arms:
        groups.setdefault(setting(a, arms[a]), []).append(a)
    for (qk, variant), group in sorted(groups.items()):
        words = ("With QK-Norm" if qk else "Without QK-Norm") + (f", arms `@{variant}`" if variant else "")
        coord = [a for a in group if cls[a] == COORDINATE]
        rot = [a for a in group if cls[a] == ROTATION]
        if not coord or not rot:
            missing = "coordinate-wise" if not coord else "rotation-equivariant"
            lines += block(f"{words}: cannot be answered, no {missing} arm.")
            continue
        hi = max(coord, key=lambda a: prs[a].at(-1).mean)
        lo = min(rot, key=lambda a: prs[a].at(-1).mean)
        a, b = prs[hi].at(-1), prs[lo].at(-1)
        reading = ("split_holds" if resolved_above(b, a) else "split_contradicted" if resolved_above(a, b)
                   else "split_with" if a.mean < b.mean else "split_against")
        lines += block(prose("mechanism", "split", setting=words, hi=hi, lo=lo, a=pm(a), b=pm(b), verdict=verdict(a, b),
                             reading=prose("mechanism", reading)))
    return lines, cls


def alignment_timing(arms: dict[str, list[Run]], prs: dict[str, ArmSeries], tap: str) -> tuple[list[str], dict]:
    """6. Per arm, the first checkpoint where the alignment index exceeds ALIGN_MARGIN against the first
    where key PR has collapsed, with the per-checkpoint trajectories. Returns (lines, arm -> timing word)."""
    lines = block("### 6. Does axis alignment come before the collapse?",
                  prose("mechanism", "alignment", margin=ALIGN_MARGIN, fraction=COLLAPSE_FRACTION))
    timing, summary, rows = {}, [], []
    for arm, group in arms.items():
        idx = alignment_index(group, tap)
        if idx is None:
            summary.append(f"{arm_cell(arm)}: not answered, its key rows have no `axis_ratio`.")
            continue
        pr, ratio = prs[arm], arm_series(group, "probe", "axis_ratio", tap=tap, tensor="k")
        rows += [[arm_cell(arm), f"{int(t):,}", pm(pr.at_tokens(int(t))), pm(ratio.at(c), 3), pm(idx.at(c), 3)]
                 for c, t in enumerate(idx.tokens) if t in pr.tokens]  # skipping checkpoints whose key rows lack PR
        align_at, collapse_at = _first(idx, idx.trajectory()[0] > ALIGN_MARGIN), _first(pr, collapsed(pr))
        if collapse_at is None:
            word = "no collapse" + ("" if align_at is None else ", aligned anyway")
        elif align_at is None:
            word = "collapse without alignment"
        else:
            word = "before" if align_at < collapse_at else "with" if align_at == collapse_at else "after"
        timing[arm] = word
        summary.append(f"{arm_cell(arm)}: aligned {_when(align_at)}, collapsed {_when(collapse_at)}: **{word}**.")
    trajectories = block(table(["arm", "tokens", "key PR", "axis_ratio", "alignment index"], rows)) if rows else []
    return lines + block([f"- {s}" for s in summary]) + trajectories, timing


def sphere_pairs(arms: dict[str, list[Run]], prs: dict[str, ArmSeries], tap: str) -> tuple[list[str], list[str]]:
    """7. For every optimizer with arms `o` and `o+qknorm`: final sphere_r (and its null), centred and
    uncentred key PR, and whether the arm with the higher sphere_r has the lower PR. Returns (lines, the
    pairs where QK-Norm raised sphere_r, resolved, without lowering PR, resolved)."""
    title, odd, rows, verdicts = "### 7. Does QK-Norm put keys in a cap of the sphere?", [], [], []
    pairs = [(off, on) for off, on in qk_pairs(arms) if off in arms and on in arms]
    if not pairs:
        return block(title, "Not answered: no optimizer has both an arm without and one with QK-Norm."), odd
    ends = {}  # arm -> the final Estimate of each key (n/a where its rows lack it), for arms with sphere_r
    for arm in (a for p in pairs for a in p):
        got = {k: final(arm_series(arms[arm], "probe", k, tap=tap, tensor="k"))
               for k in ("sphere_r", "sphere_r_null", "pr_uncentered")}
        if got["sphere_r"] is not NO_VALUE:
            ends[arm] = got
            rows.append([arm_cell(arm), pm(got["sphere_r"], 3), f"{got['sphere_r_null'].mean:.4f}",
                         pm(prs[arm].at(-1)), pm(got["pr_uncentered"])])
    n_track = 0
    for off, on in pairs:
        if off not in ends or on not in ends:
            verdicts.append(f"`{off}`: not answered, a side has no `sphere_r`.")
            continue
        ra, rb, pa, pb = ends[on]["sphere_r"], ends[off]["sphere_r"], prs[on].at(-1), prs[off].at(-1)
        verdicts.append(f"`{off}`: sphere_r with QK-Norm {pm(ra, 3)} vs {pm(rb, 3)} without is "
                        f"{verdict(ra, rb)}; key PR {pm(pa)} vs {pm(pb)} is {verdict(pa, pb)}.")
        n_track += (ra.mean - rb.mean) * (pa.mean - pb.mean) < 0
        if resolved_above(ra, rb) and not resolved_above(pb, pa):
            odd.append(f"QK-Norm raises `{off}`'s sphere_r (resolved) without a resolved drop in its key PR")
    header = ["arm", "final sphere_r", "null 1/√n", "key PR (centred)", "key PR (uncentred)"]
    return block(title, prose("mechanism", "sphere"), table(header, rows), [f"- {v}" for v in verdicts],
                 prose("mechanism", "sphere_track", n=n_track, pairs=len(pairs))), odd


def orthogonality(arms: dict[str, list[Run]], prs: dict[str, ArmSeries]) -> tuple[list[str], list[str]]:
    """8. Final orth_dev of W_q and W_k (mean over layers) per arm, Muon against each other arm of its
    `setting` (W_k), and Spearman's ρ over arms between the q/k mean orth_dev and key PR. Returns
    (lines, arms more orthogonal than Muon, resolved)."""
    title, odd = "### 8. Are W_q and W_k closer to orthogonal under Muon?", []
    dev = orth_devs(arms)
    if not dev:
        return block(title, prose("mechanism", "no_orth")), odd
    rows = [[*arm_cells(k), pm(q.at(-1), 3), pm(k.at(-1), 3), pm(final(null), 3), pm(prs[a].at(-1))]
            for a, (q, k, null) in dev.items()]
    header = [*ARM_COLUMNS, "W_q orth_dev", "W_k orth_dev", "Gaussian null", "final key PR"]
    lines = block(title, prose("mechanism", "orthogonality"), table(header, rows))
    muons = [a for a in dev if arms[a][0].optimizer == "muon"]
    if not muons:
        lines += block("Muon against the others: not answered, no `muon` arm with weight rows.")
    for m in muons:
        others = [a for a in dev if a != m and setting(a, arms[a]) == setting(m, arms[m])]
        for a in others:
            x, y, null = dev[m][1].at(-1), dev[a][1].at(-1), final(dev[a][2])
            # at the null only where the intervals say so: one seed has no interval and settles nothing
            at_null = null is not NO_VALUE and resolution(y, null) == "not resolved"
            lines.append(f"- W_k orth_dev of {arm_cell(m)} ({pm(x, 3)}) against {arm_cell(a)} ({pm(y, 3)}): "
                         f"{verdict(x, y, 'farther from orthogonal', 'closer to orthogonal')}"
                         + ("; its W_k has not left the Gaussian null (a random matrix's value)." if at_null else "."))
            if resolved_above(x, y) and not at_null:  # an arm whose W_k never left its random init proves nothing
                odd.append(f"{arm_cell(a)} ends with W_k closer to orthogonal than {arm_cell(m)} (resolved)")
        lines += [] if others else [f"- {arm_cell(m)}: no other arm of its setting (QK-Norm, variant) has weight rows."]
    lines += [""] if muons else []
    if len(dev) < 3:
        return lines + block(prose("mechanism", "orth_few", n=len(dev))) + update_shape(arms, prs), odd
    rho = spearman([final_orth(q, k).mean() for q, k, _ in dev.values()], [prs[a].at(-1).mean for a in dev])
    said = "every arm ties on one side" if not math.isfinite(rho) else f"ρ = {rho:+.2f} over {len(dev)} arms"
    return lines + block(prose("mechanism", "orth_spearman", rho=said)) + update_shape(arms, prs), odd


def _over_training(s: ArmSeries | None) -> Estimate:
    """The Estimate of each seed's mean over all of `s`'s checkpoints (its layers reduced first)."""
    return NO_VALUE if s is None else estimate(np.nanmean(s.per_seed(), axis=1))


def update_shape(arms: dict[str, list[Run]], prs: dict[str, ArmSeries]) -> list[str]:
    """8, continued. The size and shape of W_k's update per arm (the `update` rows: one step's ΔW at each
    checkpoint after init), beside where W_k ends (stable rank) and the final key PR; [] without rows."""
    rows = []
    for arm, group in arms.items():
        size = arm_series(group, "update", "update_rel", matrix="k")
        if size is None:
            continue
        shape, null = (arm_series(group, "update", key, matrix="k") for key in ("orth_dev", "orth_dev_null"))
        rank = arm_series(group, "weights", "stable_rank", matrix="k")
        first = NO_VALUE if rank is None or rank.tokens[0] != 0 else rank.at(0)
        rows.append([*arm_cells(size), pm(_over_training(size), 1, style="e"), pm(_over_training(shape), 3),
                     pm(_over_training(null), 3), pm(first, 1), pm(final(rank), 1), pm(prs[arm].at(-1))])
    return block(prose("mechanism", "update_shape"),
                 table([*ARM_COLUMNS, "‖ΔW_k‖/‖W_k‖ per step", "ΔW_k orth_dev", "Gaussian null",
                        "W_k stable rank at init", "final W_k stable rank", "final key PR"], rows)) if rows else []


def _warmup_groups(arms: dict[str, list[Run]]) -> list[list[str]]:
    """Sets of ≥ 2 arms whose runs' configs agree on everything but `optim.warmup_frac` (and the run's
    name, seed and output), ordered by warmup."""
    groups: dict[tuple, list[str]] = {}
    for arm, group in arms.items():
        flat = {tuple(sorted((k, str(v)) for k, v in r.settings("arm", "optim.warmup_frac").items())) for r in group}
        if len(flat) == 1:
            groups.setdefault(flat.pop(), []).append(arm)
    return [sorted(g, key=lambda a: _warmup(arms[a])) for g in groups.values()
            if len({_warmup(arms[a]) for a in g}) > 1]


def _warmup(group: list[Run]) -> float:
    return float(group[0].config.get("optim", {}).get("warmup_frac", math.nan))


def warmup_effect(arms: dict[str, list[Run]], prs: dict[str, ArmSeries]) -> list[str]:
    """9. For arms differing only in warmup: key PR at the checkpoint common to them nearest 1M tokens."""
    lines = block("### 9. Warmup and the early dip")
    groups = _warmup_groups(arms)
    if not groups:
        return lines + block(prose("mechanism", "no_warmup"))
    for g in groups:
        tokens, rule = early_common([prs[a] for a in g], [r for a in g for r in arms[a]])
        if tokens is None:
            lines += block(f"{', '.join(map(arm_cell, g))}: not answered, {rule}.")
            continue
        parts = [f"{arm_cell(a)} (warmup_frac {_warmup(arms[a]):g}) {pm(prs[a].at_tokens(tokens))}" for a in g]
        short, long_ = prs[g[0]].at_tokens(tokens), prs[g[-1]].at_tokens(tokens)
        lines += block(prose("mechanism", "warmup", tokens=tokens, rule=rule, parts="; ".join(parts),
                             verdict=verdict(short, long_)))
    return lines


def unexplained(prs: dict[str, ArmSeries], cls: dict[str, str], timing: dict[str, str], odd: list[str]) -> list[str]:
    """10. Arms and pairs the story (coordinate-wise updates align and collapse keys, QK-Norm huddles
    them, orthogonality spreads them) does not explain, from the answers above."""
    items, by_timing = [], {}
    for arm, pr in prs.items():
        ended = bool(collapsed(pr)[-1])
        if cls[arm] == UNCLASSIFIED:
            items.append(f"{arm_cell(arm)} is unclassified (its optimizer is in no class), so no prediction is made")
        elif ended == (cls[arm] == ROTATION):  # the class predicted the other outcome
            items.append(f"{arm_cell(arm)} is {cls[arm]} but ends with key PR {'below' if ended else 'above'} "
                         f"{COLLAPSE_FRACTION:g} of its init value ({pm(pr.at(-1))} against {pm(pr.at(0))})")
        if timing.get(arm) in prose("unexplained"):
            by_timing.setdefault(timing[arm], []).append(arm_cell(arm))
    items += [f"{'Every arm' if len(cells) == len(prs) > 1 else ', '.join(cells)} {prose('unexplained', t)}"
              for t, cells in by_timing.items()] + odd
    title = "### 10. What still goes unexplained"
    if not items:
        return block(title, prose("mechanism", "nothing_unexplained"))
    return block(title, [f"- {i}." for i in items], prose("mechanism", "unexplained_note"))


def mechanism_section(study: Study) -> list[str]:
    """Questions 5–10 for the study's trained arms at its tap (key PR); [] when no key row has the
    mechanism lenses."""
    arms, tap = study.arms, study.tap
    if not any("axis_ratio" in r for g in arms.values() for run in g for r in run.rows.get("probe", [])
               if r.get("tap") == tap and r.get("tensor") == "k"):
        return []
    prs = study.key_prs
    split, cls = class_split(arms, prs)
    timing_lines, timing = alignment_timing(arms, prs, tap)
    sphere, odd_sphere = sphere_pairs(arms, prs, tap)
    orth, odd_orth = orthogonality(arms, prs)
    return [*split, *timing_lines, *sphere, *orth, *warmup_effect(arms, prs),
            *unexplained(prs, cls, timing, odd_sphere + odd_orth)]

"""The report's mechanism findings (report/mechanism.py, questions 5–10) on synthetic metrics files whose
key PR, axis alignment, sphere concentration and weight orthogonality are set by hand, so every number
and every resolved / not-resolved word of the section has a known answer."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from scipy import stats

from rankprobe.config import Config, to_dict
from rankprobe.report import build_report
from rankprobe.report.mechanism import OPTIMIZER_CLASS, optimizer_class

CHECKPOINTS = [0, 1_000_000, 2_000_000, 4_000_000]
N_PROBE, HEAD_DIM, N_LAYER = 4096, 64, 2
SEEDS = {0: -0.5, 1: 0.0, 2: 0.5}  # per-seed shift of PR; a hundredth of it for the lenses
HALF = stats.t.ppf(0.975, 2) * 0.5 / math.sqrt(3)  # 95% half-width of three seeds at ±0.5: 1.242
NULL = 0.2  # axis_ratio_null of every row: the alignment index is (axis_ratio − 0.2)/0.8

# arm -> (optimizer, qk_norm, warmup_frac, key PR per checkpoint, alignment index per checkpoint,
#         final sphere_r, final orth_dev of W_q and W_k)
ARMS = {
    "adamw": ("adamw", False, 0.05, [40, 30, 15, 8], [0, 0.2, 0.5, 0.6], 0.2, 0.9),  # aligns before collapse
    "adamw-short-warmup": ("adamw", False, 0.01, [40, 20, 12, 8], [0, 0.3, 0.5, 0.6], 0.2, 0.9),
    "adamw+qknorm": ("adamw", True, 0.05, [40, 30, 12, 7], [0, 0.2, 0.5, 0.6], 0.6, 0.95),
    "lion": ("lion", False, 0.05, [40, 18, 10, 9], [0, 0.3, 0.4, 0.5], 0.2, 0.8),  # aligns with the collapse
    "muon": ("muon", False, 0.05, [40, 38, 35, 33], [0, 0, 0.02, 0.05], 0.1, 0.3),  # never either
    "sgd": ("sgd", False, 0.05, [40, 30, 25, 16], [0, 0, 0, 0], 0.1, 0.5),  # collapses without aligning
    "custom": ("custom", False, 0.05, [40, 39, 38, 37], [0, 0, 0, 0], 0.1, 0.6),
}


UPDATE = {"adamw": (8e-3, 6.0), "muon": (1.1e-2, 0.5)}  # W_k's step: (size at the first checkpoint, orth_dev)
"""the other arms step (1e-4, 5.0); the size grows with the checkpoint index (×1, ×2, ×3: mean ×2)"""


def write_run(root: Path, arm: str, seed: int, mechanism: bool = True, pr: list[float] | None = None,
              sweep: dict | None = None, label: str | None = None, orth: float | None = None) -> None:
    """A finished run in the documented schema: key probe rows at tap `norm` (two layers, equal), eval
    rows, and q/k weight rows; `mechanism=False` writes files from before the mechanism lenses; `pr`
    replaces the arm's key PR per checkpoint, `orth` its final orth_dev; `sweep` updates the config's
    sweep table (how the run was launched); `label` names the arm (default `arm`, whose ARMS entry
    gives the rest)."""
    optimizer, qk, warmup, arm_pr, index, sphere, arm_orth = ARMS[arm]
    pr, orth, arm = pr or arm_pr, arm_orth if orth is None else orth, label or arm
    d = SEEDS[seed]
    cfg = to_dict(Config())
    cfg["name"] = f"{arm}-s{seed}"
    cfg["model"].update(n_layer=N_LAYER, head_dim=HEAD_DIM, qk_norm=qk)
    cfg["optim"].update(name=optimizer, warmup_frac=warmup)
    cfg["train"].update(seed=seed, tokens=CHECKPOINTS[-1])
    cfg["sweep"].update(sweep or {})
    rows = [{"kind": "run", "schema": 1, "run": cfg["name"], "arm": arm, "optimizer": optimizer, "qk_norm": qk,
             "seed": seed, "config": cfg, "env": {}, "head_dim": HEAD_DIM, "n_layer": N_LAYER,
             "probe_checkpoints": CHECKPOINTS}]
    for c, tokens in enumerate(CHECKPOINTS):
        last = c == len(CHECKPOINTS) - 1
        rows.append({"kind": "eval", "step": c, "tokens": tokens, "val_loss": 3.0 + d / 100})
        for layer in range(N_LAYER):
            row = {"kind": "probe", "step": c, "tokens": tokens, "tap": "norm", "tensor": "k", "layer": layer,
                   "pr": pr[c] + d, "n": N_PROBE, "dim": HEAD_DIM}
            if mechanism:
                row.update(axis_ratio=NULL + (1 - NULL) * (index[c] + d / 100), axis_ratio_null=NULL,
                           sphere_r=(sphere if last else 0.05) + d / 100, sphere_r_null=1 / math.sqrt(N_PROBE),
                           pr_uncentered=pr[c] + d - 2.0)
            rows.append(row)
            for matrix in "qk":
                weights = {"kind": "weights", "step": c, "tokens": tokens, "layer": layer, "matrix": matrix,
                           "shape": [128, 128], "stable_rank": 10.0, "spectral_norm": 1.0}
                if mechanism:
                    weights.update(orth_dev=(orth if last else 1.0) + d / 100, orth_dev_null=1.0)
                rows.append(weights)
                if mechanism and c > 0:
                    size, shape = UPDATE.get(arm, (1e-4, 5.0))
                    rows.append({"kind": "update", "step": c, "tokens": tokens, "layer": layer, "matrix": matrix,
                                 "update_rms": 1e-3, "update_rel": size * c, "orth_dev": shape + d / 100,
                                 "orth_dev_null": 1.0})
    rows.append({"kind": "end", "step": len(CHECKPOINTS), "tokens": CHECKPOINTS[-1], "wall_s": 1.0,
                 "status": "finished"})
    path = root / f"{arm}-s{seed}" / "metrics.jsonl"
    path.parent.mkdir(parents=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> tuple[Path, str]:
    root = tmp_path_factory.mktemp("mechanism")
    for arm in ARMS:
        for seed in SEEDS:
            write_run(root, arm, seed)
    return root, build_report(root).read_text()


def question(text: str, number: int) -> str:
    return text.split(f"### {number}. ", 1)[1].split("\n### ", 1)[0].split("\n## ", 1)[0]


def rows_of(section: str, first: str = "arm") -> dict[str, list[str]]:
    lines = section.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first} |"))
    out = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        out.setdefault(cells[0].strip("`"), []).append(cells[1:])
    return out


def pm(x: float, digits: int = 2) -> str:
    return f"{x:.{digits}f} ± {HALF if digits == 2 else HALF / 100:.{digits}f}"


def test_classification_table_is_fixed():
    assert {o for o, c in OPTIMIZER_CLASS.items() if c == "coordinate-wise"} == {"adamw", "lion", "signum", "adafactor"}
    assert {o for o, c in OPTIMIZER_CLASS.items() if c == "rotation-equivariant"} == {"sgd", "normsgd", "muon", "soap"}
    assert optimizer_class("custom") == "unclassified"


def test_class_split_resolved(study):
    text = question(study[1], 5)
    rows = rows_of(text)
    assert rows["lion"][0] == ["coordinate-wise", "3", "4,000,000", pm(40), pm(9)]
    assert rows["muon"][0][0] == "rotation-equivariant" and rows["custom"][0][0] == "unclassified"
    # without QK-Norm the best coordinate-wise arm is lion (9), the worst rotation-equivariant sgd (16)
    assert (f"Without QK-Norm: the highest coordinate-wise arm `lion` ({pm(9)}) against the lowest rotation-"
            f"equivariant arm `sgd` ({pm(16)}) is lower, resolved") in text
    assert "the predicted split holds" in text
    assert "With QK-Norm: cannot be answered, no rotation-equivariant arm." in text


def test_class_split_not_resolved_and_contradicted(tmp_path):
    """sgd ending at 8.5 against lion's 9: the means go against the prediction, the intervals overlap."""
    for seed in SEEDS:
        write_run(tmp_path, "lion", seed)
        write_run(tmp_path, "sgd", seed, pr=[40, 30, 25, 8.5])
    five = question(build_report(tmp_path).read_text(), 5)
    assert f"`lion` ({pm(9)}) against the lowest rotation-equivariant arm `sgd` ({pm(8.5)}) is not resolved" in five
    assert "the point values go against the prediction, which these seeds cannot settle" in five
    assert "With QK-Norm" not in five  # no arm with QK-Norm: nothing to say about it


def test_class_split_within_each_variant(tmp_path):
    """Arms `@step` (another rate for each optimizer) are compared among themselves, never with the base
    arms: the base arms keep the split, the step-matched ones contradict it."""
    for seed in SEEDS:
        write_run(tmp_path, "lion", seed)
        write_run(tmp_path, "sgd", seed)
        write_run(tmp_path, "lion", seed, label="lion@step", pr=[40, 30, 20, 20])
        write_run(tmp_path, "sgd", seed, label="sgd@step", pr=[40, 20, 5, 2])
    five = question(build_report(tmp_path).read_text(), 5)
    assert (f"Without QK-Norm: the highest coordinate-wise arm `lion` ({pm(9)}) against the lowest rotation-"
            f"equivariant arm `sgd` ({pm(16)}) is lower, resolved") in five
    assert (f"Without QK-Norm, arms `@step`: the highest coordinate-wise arm `lion@step` ({pm(20)}) against the "
            f"lowest rotation-equivariant arm `sgd@step` ({pm(2)}) is higher, resolved") in five
    assert "the prediction is contradicted" in five


def test_orthogonality_at_the_null_is_no_evidence(tmp_path):
    """Muon's W_k ends at 1.05, above the Gaussian null (1.0): an arm whose W_k is still at the null is
    'closer to orthogonal' only in the sense that it never moved, and is not listed as unexplained;
    one that left the null towards orthogonal (0.9) is."""
    for seed in SEEDS:
        write_run(tmp_path, "muon", seed, orth=1.05)
        write_run(tmp_path, "lion", seed, orth=1.0)
        write_run(tmp_path, "adamw", seed, orth=0.9)
    text = build_report(tmp_path).read_text()
    eight = question(text, 8)
    assert (f"against `lion` ({pm(1.0, 3)}): farther from orthogonal, resolved (the 95% intervals do not overlap; "
            "3 seeds); its W_k has not left the Gaussian null (a random matrix's value).") in eight
    assert f"against `adamw` ({pm(0.9, 3)}): farther from orthogonal, resolved (the 95% intervals do not overlap; 3 seeds)." in eight
    ten = question(text, 10)
    assert "`adamw` ends with W_k closer to orthogonal than `muon` (resolved)" in ten
    assert "`lion` ends with W_k closer" not in ten


def test_orthogonality_on_one_seed_claims_nothing_about_the_null(tmp_path):
    """With one seed there is no interval, so whether W_k has left the Gaussian null cannot be judged:
    an arm at 0.5 (far from the null 1.0) must not be said to be still at the null."""
    write_run(tmp_path, "muon", 0, orth=1.05)
    write_run(tmp_path, "adamw", 0, orth=0.5)
    eight = question(build_report(tmp_path).read_text(), 8)
    line = next(x for x in eight.splitlines() if "against `adamw`" in x)
    assert "on a single seed" in line and "Gaussian null" not in line


def test_alignment_timing(study):
    text = question(study[1], 6)
    assert "`adamw`: aligned first at 1,000,000 tokens, collapsed first at 2,000,000 tokens: **before**." in text
    assert "`lion`: aligned first at 1,000,000 tokens, collapsed first at 1,000,000 tokens: **with**." in text
    assert "`muon`: aligned never, collapsed never: **no collapse**." in text
    assert "`sgd`: aligned never, collapsed first at 4,000,000 tokens: **collapse without alignment**." in text
    traj = rows_of(text)["adamw"]
    assert [r[0] for r in traj] == [f"{t:,}" for t in CHECKPOINTS]
    assert traj[2][1:] == [pm(15), f"{NULL + 0.8 * 0.5:.3f} ± {0.8 * HALF / 100:.3f}", pm(0.5, 3)]


def test_sphere_pairs(study):
    text = question(study[1], 7)
    rows = rows_of(text)
    assert rows["adamw+qknorm"][0] == [pm(0.6, 3), f"{1 / 64:.4f}", pm(7), pm(5)]
    assert (f"`adamw`: sphere_r with QK-Norm {pm(0.6, 3)} vs {pm(0.2, 3)} without is higher, resolved") in text
    assert f"key PR {pm(7)} vs {pm(8)} is not resolved with 3 seeds" in text
    assert "In 1 of 1 pair(s) the arm with the higher sphere_r has the lower key PR" in text


def test_orthogonality(study):
    text = question(study[1], 8)
    assert rows_of(text)["muon"][0] == ["3", "4,000,000", pm(0.3, 3), pm(0.3, 3), "1.000 ± 0.000", pm(33)]
    assert (f"W_k orth_dev of `muon` ({pm(0.3, 3)}) against `adamw` ({pm(0.9, 3)}): closer to orthogonal, "
            "resolved") in text
    compared = text.split("W_k orth_dev of", 1)[1].split("The step itself", 1)[0]
    assert "`adamw+qknorm`" not in compared  # compared within its QK-Norm setting only
    arms = list(ARMS)
    rho = stats.spearmanr([ARMS[a][6] for a in arms], [ARMS[a][3][-1] for a in arms]).statistic
    assert f"ρ = {rho:+.2f} over {len(arms)} arms" in text and "suggestive, not causal" in text


def test_update_size_and_shape(study):
    """Each cell is a seed mean over the checkpoints after init (the size grows ×1, ×2, ×3: mean ×2)."""
    text = question(study[1], 8).split("The step itself", 1)[1]
    rows = rows_of(text)
    assert rows["muon"][0] == ["3", "4,000,000", "2.2e-02 ± 0.0e+00", pm(0.5, 3), "1.000 ± 0.000", "10.0 ± 0.0",
                               "10.0 ± 0.0", pm(33)]
    assert rows["adamw"][0][2:4] == ["1.6e-02 ± 0.0e+00", pm(6.0, 3)]
    assert rows["sgd"][0][2] == "2.0e-04 ± 0.0e+00" and set(rows) == set(ARMS)


def test_update_size_and_shape_with_two_arms(tmp_path):
    """Two arms (too few for the rank correlation over arms) still get the table of their steps."""
    for seed in SEEDS:
        write_run(tmp_path, "muon", seed)
        write_run(tmp_path, "adamw", seed)
    eight = question(build_report(tmp_path).read_text(), 8)
    assert "a rank correlation needs at least 3" in eight
    rows = rows_of(eight.split("The step itself", 1)[1])
    assert set(rows) == {"muon", "adamw"} and rows["muon"][0][2:4] == ["2.2e-02 ± 0.0e+00", pm(0.5, 3)]


def test_warmup(study):
    text = question(study[1], 9)
    assert (f"At 1,000,000 tokens, the checkpoint nearest 1M tokens: `adamw-short-warmup` (warmup_frac 0.01) "
            f"{pm(20)}; `adamw` (warmup_frac 0.05) {pm(30)}. The shortest warmup against the longest is lower, "
            "resolved") in text


def test_warmup_arms_from_separate_sweeps(tmp_path):
    """A study made in parts: the short-warmup arm came from another sweep, whose sweep.* keys (the arm
    list, another arm's rate) differ from the first's. They say how the runs were launched, not what
    they computed, so the two arms still differ only in warmup."""
    for seed in SEEDS:
        write_run(tmp_path, "adamw", seed, sweep={"arms": ["adamw"]})
        write_run(tmp_path, "adamw-short-warmup", seed,
                  sweep={"arms": ["adamw-short-warmup"], "settings": {"lion": {"optim.hidden_lr": 1e-5}}})
    text = question(build_report(tmp_path).read_text(), 9)
    assert "`adamw-short-warmup` (warmup_frac 0.01)" in text and "`adamw` (warmup_frac 0.05)" in text


def test_unexplained(study):
    text = question(study[1], 10)
    assert "`custom` is unclassified" in text
    assert f"`sgd` is rotation-equivariant but ends with key PR below 0.5 of its init value ({pm(16)}" in text
    assert "`sgd` collapsed (fell below half their init key PR at some checkpoint, question 6) without aligning." in text
    assert "QK-Norm raises `adamw`'s sphere_r (resolved) without a resolved drop in its key PR" in text
    assert "`lion`" not in text and "`muon`" not in text  # both behave as the story says


def test_mechanism_figures(study):
    root = study[0]
    for name in ("axis_alignment.png", "orthogonality_pr.png"):
        assert (root / name).stat().st_size > 10_000
        assert f"]({name})" in study[1]


def test_section_absent_without_mechanism_fields(tmp_path):
    for arm in ("adamw", "muon"):
        for seed in SEEDS:
            write_run(tmp_path, arm, seed, mechanism=False)
    text = build_report(tmp_path).read_text()
    assert "### 4. " in text and "### 5. " not in text and "alignment" not in text
    assert not (tmp_path / "axis_alignment.png").exists() and not (tmp_path / "orthogonality_pr.png").exists()


def test_alignment_without_collapse_is_unexplained(tmp_path):
    for seed in SEEDS:
        write_run(tmp_path, "muon", seed, pr=[40, 38, 36, 35])
        write_run(tmp_path, "lion", seed, pr=[40, 38, 36, 35])  # aligns from 1M (index 0.3) but keeps PR
    text = build_report(tmp_path).read_text()
    assert "`lion`: aligned first at 1,000,000 tokens, collapsed never: **no collapse, aligned anyway**." in text
    ten = question(text, 10)
    assert "`lion` aligned with coordinate axes without collapsing." in ten
    assert "`lion` is coordinate-wise but ends with key PR above 0.5 of its init value" in ten


def test_questions_the_arms_cannot_answer_say_why(tmp_path):
    """An arm written before the lenses beside two that have them: named, never silently dropped."""
    for seed in SEEDS:
        write_run(tmp_path, "lion", seed)
        write_run(tmp_path, "muon", seed)
        write_run(tmp_path, "sgd", seed, mechanism=False)
    text = build_report(tmp_path).read_text()
    assert "`sgd`: not answered, its key rows have no `axis_ratio`." in question(text, 6)
    assert "Not answered: no optimizer has both an arm without and one with QK-Norm." in question(text, 7)
    eight = question(text, 8)
    assert "`sgd`" not in eight and "cannot be assessed, 2 arm(s) with weight rows" in eight
    assert "Not answered: no two arms differ only in `optim.warmup_frac`" in question(text, 9)

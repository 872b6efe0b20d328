"""Report tests on synthetic metrics.jsonl files with known values (4 arms x 2 seeds + 1 unfinished).

Key PR at tap `norm` is 60 at init and moves linearly (in checkpoint index) to a per-arm final layer
profile, plus -0.5 / +0.5 for seeds 0 / 1, so every seed mean and 95% half-width (t_{0.975,1}·0.5) is
known by hand. Other taps and tensors carry offset values so reading the wrong one shows up. The
lens keys and kinds (docs/metrics.md) are fixed functions of the same numbers: erank = PR + 2,
stable rank = PR / 2, RankMe = PR + 1, per-head values PR + HEAD_OFFSETS, constant nulls; attention
entropy and max logit, and weight spectra, move linearly to per-arm finals like the PR.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from rankprobe.config import Config, UserError, to_dict
from rankprobe.report import build_report, find_runs, layer_pr, mean_ci, read_metrics, t_quantile
from rankprobe.report.figures import _nulls
from rankprobe.report.metrics import MetricsError, arm_key
from rankprobe.report.series import ArmSeries, Study, arm_pr, arm_series

CHECKPOINTS = [0, 1_000, 10_000, 100_000]
FINAL = {  # arm -> final key PR per layer (seed mean) at tap `norm`
    "adamw": [40.0, 8.0, 5.0, 30.0],
    "adamw+qknorm": [50.0, 45.0, 9.8, 40.0],
    "muon": [60.0, 55.0, 58.0, 62.0],
    "muon+qknorm": [62.0, 61.0, 10.2, 63.0],  # seeds give 9.7 and 10.7 at L2: seed mean 10.2 is alive
}
VAL = {"adamw": 3.0, "adamw+qknorm": 2.9, "muon": 2.8, "muon+qknorm": 2.7}
SEED_DELTA = {0: -0.5, 1: 0.5}
VAL_DELTA = {0: -0.01, 1: 0.03}
T1 = 12.706204736174698  # t_{0.975, 1}
HEAD_DIM = 64
N_PROBE = 4096
PR_NULL = ((N_PROBE - 1) * HEAD_DIM + 2) / (N_PROBE + HEAD_DIM)  # 63.0005: the closed form
NULLS = {"pr": PR_NULL, "erank": 63.5, "stable_rank": 54.0, "rankme": 63.8}
DERIVED = {"erank": lambda v: v + 2.0, "stable_rank": lambda v: v / 2.0, "rankme": lambda v: v + 1.0}
HEAD_OFFSETS = [-1.5, -0.5, 0.5, 1.5]  # per head, around the layer value (their mean is 0)
ENTROPY = {"adamw": 0.40, "adamw+qknorm": 0.70, "muon": 0.55, "muon+qknorm": 0.80}  # final normalised entropy
MAX_LOGIT = {"adamw": 300.0, "adamw+qknorm": 11.0, "muon": 80.0, "muon+qknorm": 10.0}  # final, layer 3
WK_STABLE = {"adamw": 5.0, "adamw+qknorm": 8.0, "muon": 30.0, "muon+qknorm": 32.0}  # final, layer mean
WK_NORM = {"adamw": 9.0, "adamw+qknorm": 6.0, "muon": 3.0, "muon+qknorm": 2.5}  # final, layer 3


def ramp(start: float, end: float, c: int) -> float:
    return start + (end - start) * c / (len(CHECKPOINTS) - 1)


def probe_row(tokens: int, tap: str, tensor: str, layer: int, value: float, lenses: bool) -> dict:
    row = {"kind": "probe", "step": tokens // 1_000, "tokens": tokens, "tap": tap, "tensor": tensor, "layer": layer,
           "pr": value, "pr_heads": [value + o for o in HEAD_OFFSETS], "mean_norm": [0.1] * 4, "n": N_PROBE,
           "dim": HEAD_DIM}
    if lenses:
        for m, f in DERIVED.items():
            row[m], row[f"{m}_heads"] = f(value), [f(value + o) for o in HEAD_OFFSETS]
        row.update({f"{m}_null": v for m, v in NULLS.items()})
    return row


def lens_rows(arm: str, c: int, tokens: int, seed: int, n_layer: int) -> list[dict]:
    """attn, weights and update rows of one checkpoint; seeds shift entropies by ±0.01, logits by ±1."""
    s = SEED_DELTA.get(seed, 0.0)
    rows = []
    for layer in range(n_layer):
        ent = ramp(0.95, ENTROPY[arm], c) + 0.02 * s + 0.01 * (layer - 1.5)  # layer mean = ramp + 0.02·s
        top = ramp(3.0, MAX_LOGIT[arm], c) * (layer + 1) / n_layer + 2 * s  # the last layer holds the max
        rows.append({"kind": "attn", "step": tokens // 1_000, "tokens": tokens, "layer": layer,
                     "entropy": ent * 6.0, "entropy_heads": [ent * 6.0] * 4, "entropy_norm": ent,
                     "entropy_norm_heads": [ent] * 4, "entropy_max": 6.0, "max_logit": top,
                     "max_logit_heads": [top - 1, top, top - 2, top - 3], "n_rows": 4000, "seq_len": 64})
        for matrix in "qkvo":
            sr = ramp(60.0, WK_STABLE[arm], c) + (layer - 1.5) + (0 if matrix == "k" else 10.0)
            norm = ramp(1.0, WK_NORM[arm], c) * (layer + 1) / n_layer + (0 if matrix == "k" else 0.5)
            rows.append({"kind": "weights", "step": tokens // 1_000, "tokens": tokens, "layer": layer,
                         "matrix": matrix, "shape": [256, 256], "spectral_norm": norm, "stable_rank": sr,
                         "erank": 100.0, "spectral_norm_heads": [norm] * 4, "stable_rank_heads": [sr / 4] * 4,
                         "erank_heads": [30.0] * 4})
            if tokens:
                rows.append({"kind": "update", "step": tokens // 1_000, "tokens": tokens, "layer": layer,
                             "matrix": matrix, "update_rms": 1e-3, "update_rel": 1e-2})
    return rows


def key_pr(arm: str, c: int, layer: int, seed: int) -> float:
    """Key PR at tap norm for checkpoint index c."""
    final = FINAL[arm][layer]
    return 60.0 + (final - 60.0) * c / (len(CHECKPOINTS) - 1) + SEED_DELTA.get(seed, 0.0)


def write_run(root: Path, arm: str, seed: int, *, finished: bool = True, checkpoints=CHECKPOINTS,
              pr=key_pr, n_layer: int = 4, lenses: bool = True, budget: int | None = None,
              timing: dict | None = None) -> Path:
    """A metrics.jsonl in the documented schema (docs/metrics.md); `lenses=False` writes the rows of a
    run made before the lenses (no extra probe keys, no attn / weights / update rows); `budget` is
    `train.tokens` (default the last of CHECKPOINTS); `timing` adds the `end` row's phase seconds
    (without it the `end` row is that of a run made before them). One step is 4 × 250 = 1,000 tokens."""
    optimizer, qk = arm.split("+")[0], "qknorm" in arm
    cfg = to_dict(Config())
    cfg["name"] = f"{arm}-s{seed}"
    cfg["model"].update(n_layer=n_layer, head_dim=HEAD_DIM, qk_norm=qk, seq_len=250)
    cfg["optim"].update(name=optimizer, qk_clip="qkclip" in arm)
    cfg["train"].update(seed=seed, tokens=budget or CHECKPOINTS[-1], batch_size=4)
    cfg["probe"]["checkpoints"] = list(CHECKPOINTS)
    rows = [{"kind": "run", "schema": 1, "run": f"{arm}-s{seed}", "arm": arm, "optimizer": optimizer,
             "qk_norm": qk, "seed": seed, "config": cfg, "n_params": 1_234_567, "param_groups": {},
             "env": {"git_sha": "abc123def4567890", "python": "3.11.7", "torch": "2.5.1", "platform": "linux",
                     "device": "NVIDIA H100", "hostname": "h", "rankprobe": "0.1.0", "time": "now"},
             "head_dim": HEAD_DIM, "n_layer": n_layer, "probe_checkpoints": list(CHECKPOINTS),
             "future_key": "ignored"}]
    step_tokens = 1_000
    for c, tokens in enumerate(checkpoints):
        step = tokens // step_tokens
        if c:
            for t in range(checkpoints[c - 1] + 2 * step_tokens, tokens + 1, 2 * step_tokens):
                rows.append({"kind": "train", "step": t // step_tokens, "tokens": t,
                             "loss": 3.0 + 5.0 * math.exp(-t / 20_000) + 0.05 * math.sin(t), "lr_scale": 1.0,
                             "grad_norm": 1.0, "step_time_s": 0.01, **({"qk_clipped": 1} if lenses else {})})
        val = 8.3 - (8.3 - VAL[arm]) * c / (len(CHECKPOINTS) - 1) + VAL_DELTA.get(seed, 0.0)
        rows.append({"kind": "eval", "step": step, "tokens": tokens, "val_loss": val, "val_tokens": 4096})
        for layer in range(n_layer):
            k = pr(arm, c, layer, seed)
            for tap, tensor, value in [("proj", "k", k + 5), ("norm", "k", k), ("rope", "k", k - 3),
                                       ("proj", "q", 20.0), ("norm", "q", 21.0), ("rope", "q", 22.0),
                                       ("proj", "v", 30.0)]:
                rows.append(probe_row(tokens, tap, tensor, layer, value, lenses))
        if lenses:
            rows += lens_rows(arm, c, tokens, seed, n_layer)
    rows.append({"kind": "some_future_kind", "x": 1})
    if finished:
        rows.append({"kind": "end", "step": checkpoints[-1] // step_tokens, "tokens": checkpoints[-1],
                     "wall_s": 12.0, "status": "finished", **(timing or {})})
    path = root / f"{arm}-s{seed}" / "metrics.jsonl"
    path.parent.mkdir(parents=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


REF_LAYERS, REF_HEAD_DIM, REF_PR = 6, 128, [100.0, 90.0, 80.0, 70.0, 60.0, 50.0]


def write_pretrained(root: Path, arm: str = "hf:qwen3") -> Path:
    """What probe_checkpoint_to_dir writes for a Hugging Face model: one checkpoint at tokens 0, as
    loaded, with 6 layers of head_dim 128 (unlike the trained runs' 4 × 64), no eval row."""
    cfg = {"name": "hf-qwen3", "model": {"n_layer": REF_LAYERS, "head_dim": REF_HEAD_DIM, "n_head": 8,
                                         "n_kv_head": 2, "qk_norm": True},
           "probe": {"tap": "norm", "dead_pr": 10.0, "checkpoints": [0], "tokens": 8192}}
    rows = [{"kind": "run", "schema": 1, "run": "hf-qwen3", "arm": arm, "optimizer": "pretrained", "qk_norm": True,
             "seed": 0, "config": cfg, "env": {"torch": "2.5.1", "device": "cpu"}, "n_params": 7_000_000,
             "param_groups": {}, "head_dim": REF_HEAD_DIM, "n_layer": REF_LAYERS, "probe_checkpoints": [0],
             "data": {"probe_tokens": 8192}, "source": {"path": "/models/qwen3", "kind": "hf"}}]
    for layer, value in enumerate(REF_PR):
        for tap in ("proj", "norm", "rope"):
            row = probe_row(0, tap, "k", layer, value, lenses=True)
            rows.append({**row, "n": 8192, "dim": REF_HEAD_DIM, "pr_null": 126.0})
        rows.append({"kind": "attn", "step": 0, "tokens": 0, "layer": layer, "entropy": 2.0, "entropy_heads": [2.0],
                     "entropy_norm": 0.3, "entropy_norm_heads": [0.3], "entropy_max": 6.0, "max_logit": 20.0 + layer,
                     "max_logit_heads": [20.0 + layer], "n_rows": 8000, "seq_len": 64})
        for matrix in "qkvo":
            rows.append({"kind": "weights", "step": 0, "tokens": 0, "layer": layer, "matrix": matrix,
                         "shape": [256, 1024], "spectral_norm": 4.0, "stable_rank": 12.0, "erank": 200.0})
    rows.append({"kind": "end", "step": 0, "tokens": 0, "wall_s": 1.0, "status": "finished"})
    path = root / "hf-qwen3" / "metrics.jsonl"
    path.parent.mkdir(parents=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sweep")
    for arm in FINAL:
        for seed in (0, 1):
            write_run(root, arm, seed)
    # crashed halfway, with collapsed keys: must not move any headline number
    write_run(root, "muon", 2, finished=False, checkpoints=CHECKPOINTS[:2], pr=lambda *a: 1.0)
    return root


@pytest.fixture(scope="module")
def report(sweep) -> Path:
    return build_report(sweep)


def table_header(text: str, section: str) -> list[str]:
    lines = text.splitlines()
    after = next(i for i, line in enumerate(lines) if line.startswith(section))
    line = next(line for line in lines[after:] if line.startswith("|"))
    return [cell.strip() for cell in line.strip("|").split("|")]


def parse_table(text: str, first_header: str, section: str = "") -> list[list[str]]:
    """The body of the first table whose first column is `first_header` (after heading `section`)."""
    lines = text.splitlines()
    after = next(i for i, line in enumerate(lines) if line.startswith(section)) if section else 0
    start = next(i for i, line in enumerate(lines) if i >= after and line.startswith(f"| {first_header} |"))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def pm(cell: str) -> tuple[float, float]:
    """'20.75 ± 6.35' -> (20.75, 6.35); '20.75' -> (20.75, nan)."""
    mean, _, half = cell.partition("±")
    return float(mean), float(half) if half else math.nan


# ---------------------------------------------------------------------------------------------
# statistics


def test_t_quantile_known_values():
    assert t_quantile(1) == pytest.approx(12.706, abs=1e-3)
    assert t_quantile(2) == pytest.approx(4.303, abs=1e-3)
    assert t_quantile(9) == pytest.approx(2.262, abs=1e-3)
    assert t_quantile(30) == pytest.approx(2.042, abs=1e-3)
    assert t_quantile(100_000) == pytest.approx(1.960, abs=1e-3)


def test_mean_ci_by_hand():
    mean, half = mean_ci([1.0, 2.0, 6.0])  # sd = sqrt(7)
    assert mean == pytest.approx(3.0)
    assert half == pytest.approx(4.302653 * math.sqrt(7 / 3), rel=1e-5)
    mean, half = mean_ci([[1.0, 5.0], [3.0, 5.0]])
    np.testing.assert_allclose(mean, [2.0, 5.0])
    np.testing.assert_allclose(half, [T1 * 1.0, 0.0], rtol=1e-6)
    mean, half = mean_ci([4.0])  # one seed: no band
    assert mean == 4.0 and math.isnan(half)


def test_arm_order():
    arms = ["muon", "zeta", "adamw+qknorm", "alpha", "muon+qknorm", "adamw"]
    assert sorted(arms, key=arm_key) == ["adamw", "adamw+qknorm", "muon", "muon+qknorm", "alpha", "zeta"]


# ---------------------------------------------------------------------------------------------
# reading


def test_find_runs_and_layer_pr(sweep):
    runs = find_runs(sweep)
    assert [r.name for r in runs] == ["adamw-s0", "adamw-s1", "adamw+qknorm-s0", "adamw+qknorm-s1",
                                      "muon-s0", "muon-s1", "muon-s2", "muon+qknorm-s0", "muon+qknorm-s1"]
    muon2 = next(r for r in runs if r.name == "muon-s2")
    assert not muon2.finished and all(r.finished for r in runs if r is not muon2)
    run = runs[0]
    assert (run.arm, run.optimizer, run.qk_norm, run.seed, run.head_dim) == ("adamw", "adamw", False, 0, 64)
    assert run.env["torch"] == "2.5.1" and run.config["model"]["n_layer"] == 4
    pr = layer_pr(run, "norm")
    assert list(pr) == CHECKPOINTS
    np.testing.assert_allclose(pr[100_000], np.array(FINAL["adamw"]) - 0.5)
    np.testing.assert_allclose(layer_pr(run, "proj")[0], [64.5] * 4)  # 60 - 0.5 + 5
    np.testing.assert_allclose(layer_pr(run, "proj", "v")[0], [30.0] * 4)


def test_torn_last_line_dropped_with_warning(tmp_path):
    path = write_run(tmp_path, "adamw", 0)
    n = len(read_metrics(path))
    with path.open("a") as f:
        f.write('{"kind": "train", "step": 9, "tok')
    with pytest.warns(UserWarning, match=r"adamw-s0.metrics\.jsonl.*torn"):
        rows = read_metrics(path)
    assert len(rows) == n


def test_corrupt_middle_line_raises(tmp_path):
    path = write_run(tmp_path, "adamw", 0)
    lines = path.read_text().splitlines()
    lines[2] = lines[2][:20]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(MetricsError, match=r"metrics\.jsonl, line 3"):
        read_metrics(path)


def test_empty_folder_raises_user_error(tmp_path):
    (tmp_path / "nothing-here").mkdir()
    with pytest.raises(UserError, match="no metrics.jsonl"):
        find_runs(tmp_path)


def test_only_checkpoints_common_to_all_seeds(tmp_path):
    write_run(tmp_path, "adamw", 0)
    write_run(tmp_path, "adamw", 1, checkpoints=[0, 1_000, 100_000])
    pr = arm_pr(find_runs(tmp_path), "norm")
    assert pr.tokens.tolist() == [0, 1_000, 100_000]
    assert pr.values.shape == (2, 3, 4)


# ---------------------------------------------------------------------------------------------
# aggregation and the report


def test_aggregation_against_hand_values(sweep):
    prs = Study(find_runs(sweep), "norm").prs
    assert list(prs) == ["adamw", "adamw+qknorm", "muon", "muon+qknorm"]
    muon = prs["muon"]
    assert muon.seeds == [0, 1]  # the unfinished seed 2 is not aggregated
    mean, half = muon.trajectory()
    final_mean = np.mean(FINAL["muon"])
    np.testing.assert_allclose(mean, [60 + (final_mean - 60) * c / 3 for c in range(4)])
    np.testing.assert_allclose(half, [T1 * 0.5] * 4, rtol=1e-6)
    mean, half = prs["adamw"].layers_at(-1)
    np.testing.assert_allclose(mean, FINAL["adamw"])
    np.testing.assert_allclose(half, [T1 * 0.5] * 4, rtol=1e-6)



def test_every_row_kind_stacks_through_one_series(sweep):
    """Lens, loss and probe rows all become ArmSeries over the seeds' common token counts; layers reduce
    by mean or max skipping layers without a value, checked against float64 sums by hand."""
    runs = [r for r in find_runs(sweep) if r.arm == "muon" and r.finished]
    loss = arm_series(runs, "train", "loss")
    expect = [[r["loss"] for r in run.rows["train"]] for run in runs]  # both seeds log the same tokens
    assert loss.values.shape == (2, len(expect[0]), 1)
    np.testing.assert_array_equal(loss.per_seed(), np.array(expect, dtype=np.float64))
    logit = arm_series(runs, "attn", "max_logit", "max")
    by_hand = [max(r["max_logit"] for r in run.rows["attn"] if r["tokens"] == CHECKPOINTS[-1]) for run in runs]
    assert logit.at(-1).mean == pytest.approx(sum(by_hand) / 2)
    assert arm_series(runs, "attn", "no_such_key") is None and arm_series(runs, "weights", "x", matrix="z") is None
    values = np.array([[[1.0, np.nan, 4.0], [np.nan, np.nan, np.nan]]])  # (S=1, C=2, L=3)
    for how, first in (("mean", 2.5), ("max", 4.0)):
        s = ArmSeries("a", [0], np.array([0, 1]), values, reduce=how)
        np.testing.assert_array_equal(s.per_seed(), [[first, np.nan]])

def test_headlines_and_dead_layers(sweep):
    heads = {h.arm: h for h in Study(find_runs(sweep)).headlines()}
    assert heads["adamw"].dead_layers == [1, 2]
    assert heads["adamw+qknorm"].dead_layers == [2]
    assert heads["muon"].dead_layers == []
    assert heads["muon+qknorm"].dead_layers == []  # 10.2 is above dead_pr = 10
    assert (heads["muon+qknorm"].weakest_layer, heads["muon+qknorm"].weakest.mean) == (2, pytest.approx(10.2))
    assert heads["muon"].val_loss.mean == pytest.approx(2.81)
    assert heads["muon"].val_loss.half == pytest.approx(T1 * 0.02, rel=1e-6)
    proj = {h.arm: h for h in Study(find_runs(sweep), tap="proj").headlines()}
    assert proj["adamw"].mean.mean == pytest.approx(np.mean(FINAL["adamw"]) + 5)
    assert proj["adamw"].dead_layers == []  # proj profile 45, 13, 10, 35: dead means strictly below 10
    rope = {h.arm: h for h in Study(find_runs(sweep), tap="rope").headlines()}
    assert rope["adamw+qknorm"].dead_layers == [2] and rope["muon+qknorm"].dead_layers == [2]  # 6.8, 7.2


def test_report_headline_table(report):
    text = report.read_text()
    rows = {r[0].strip("`"): r for r in parse_table(text, "arm")}
    assert list(rows) == ["adamw", "adamw+qknorm", "muon", "muon+qknorm"]
    expect_weakest = {"adamw": (2, 5.0), "adamw+qknorm": (2, 9.8), "muon": (1, 55.0), "muon+qknorm": (2, 10.2)}
    expect_dead = {"adamw": "2 (L1, L2)", "adamw+qknorm": "1 (L2)", "muon": "0", "muon+qknorm": "0"}
    assert table_header(text, "## Headline") == ["arm", "seeds", "tokens", "mean key PR", "isotropic null",
                                                  "weakest layer: PR", "dead layers (PR < 10)", "val loss"]
    for arm, (_, seeds, tokens, mean_pr, null, weakest, dead, val) in rows.items():
        assert null == "63.00 (N = 4,096)"
        assert seeds == "2" and tokens == "100,000"
        m, h = pm(mean_pr)
        assert m == pytest.approx(np.mean(FINAL[arm]), abs=0.005)
        assert h == pytest.approx(T1 * 0.5, abs=0.005)
        layer, rest = weakest.split(":")
        assert (int(layer[1:]), pm(rest)[0]) == (expect_weakest[arm][0], pytest.approx(expect_weakest[arm][1]))
        assert dead == expect_dead[arm]
        assert pm(val)[0] == pytest.approx(VAL[arm] + 0.01, abs=5e-5)
        assert pm(val)[1] == pytest.approx(T1 * 0.02, abs=5e-5)
    assert "Headline tap: `norm`" in text and "head_dim = 64" in text


def test_report_checkpoint_table_and_sections(report):
    text = report.read_text()
    rows = parse_table(text, "tokens")
    assert [r[0] for r in rows] == ["0 (init)", "1,000", "10,000", "100,000"]
    assert pm(rows[0][1]) == (pytest.approx(60.0), pytest.approx(T1 * 0.5, abs=0.005))
    assert pm(rows[-1][3])[0] == pytest.approx(np.mean(FINAL["muon"]), abs=0.005)
    for section in ("## Configuration", "## Environment", "## Figures", "## Incomplete runs"):
        assert section in text
    assert "`optim.name`" in text and "`model.qk_norm`" in text  # the keys that differ across arms
    assert "2.5.1" in text and "abc123def456" in text and "NVIDIA H100" in text


def test_incomplete_run_listed_and_excluded(report):
    text = report.read_text()
    incomplete = parse_table(text, "run")
    assert [r[0] for r in incomplete] == ["`muon-s2`"]
    assert incomplete[0][3] == "1,000"
    assert "excluded" in text.split("## Incomplete runs")[1]
    assert "1.00" not in parse_table(text, "arm")[2][3]
    assert parse_table(text, "arm", "## Attention")[2][1] == "2"  # muon: the unfinished seed is not counted


def test_figures_written_and_nontrivial(report):
    out = report.parent
    names = ["pr_trajectory.png", "layer_comparison.png", "heatmap_adamw.png", "heatmap_adamw+qknorm.png",
             "heatmap_muon.png", "heatmap_muon+qknorm.png", "loss_curves.png", "heads_adamw.png",
             "heads_muon+qknorm.png", "attention_entropy.png", "max_logit.png", "weight_spectra.png"]
    text = report.read_text()
    for name in names:
        path = out / name
        assert path.stat().st_size > 15_000, name
        pixels = imread(path)
        assert pixels.ndim == 3 and pixels.shape[0] > 300 and pixels.std() > 0.05, name
        assert f"]({name})" in text, name


def test_single_seed_has_no_interval(tmp_path):
    write_run(tmp_path, "muon", 0)
    text = build_report(tmp_path).read_text()
    row = parse_table(text, "arm")[0]
    assert row[1] == "1" and "±" not in row[3] and pm(row[3])[0] == pytest.approx(np.mean(FINAL["muon"]) - 0.5)
    assert (tmp_path / "pr_trajectory.png").exists()


def test_only_unfinished_runs_still_report(tmp_path):
    write_run(tmp_path, "adamw", 0, finished=False)
    text = build_report(tmp_path).read_text()
    assert "none has finished" in text and "`adamw-s0`" in text
    assert not (tmp_path / "pr_trajectory.png").exists()


def test_report_package_does_not_import_torch():
    code = "import sys, rankprobe.report; assert 'torch' not in sys.modules, 'torch imported'"
    src = str(Path(__file__).resolve().parents[1] / "src")
    result = subprocess.run([sys.executable, "-c", code], env={"PYTHONPATH": src}, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------------------------------------
# lenses: --metric, nulls, attention and weight tables, pretrained references, old files


def headline_rows(text: str) -> dict[str, dict[str, str]]:
    """The headline table as {arm label: {column: cell}}."""
    header = table_header(text, "## Headline")
    return {r[0].strip("`").replace("` (pretrained)", " (pretrained)"): dict(zip(header, r))
            for r in parse_table(text, "arm", "## Headline")}


@pytest.fixture(scope="module")
def with_reference(tmp_path_factory) -> Path:
    """Two trained arms × 2 seeds and one pretrained Hugging Face checkpoint (6 layers, head_dim 128)."""
    root = tmp_path_factory.mktemp("with_reference")
    for arm in ("adamw", "muon+qknorm"):
        for seed in (0, 1):
            write_run(root, arm, seed)
    write_pretrained(root)
    return root


def test_metric_erank_changes_the_headline(sweep, tmp_path):
    text = build_report(sweep, metric="erank", out_dir=tmp_path).read_text()
    rows = headline_rows(text)
    assert "## Headline: key erank at the final checkpoint" in text
    assert list(next(iter(rows.values()))) == ["arm", "seeds", "tokens", "mean key erank", "isotropic null",
                                               "weakest layer: erank", "val loss"]  # no dead layers: a PR notion
    for arm in FINAL:
        assert pm(rows[arm]["mean key erank"]) == (pytest.approx(np.mean(FINAL[arm]) + 2, abs=0.005),
                                                   pytest.approx(T1 * 0.5, abs=0.005))
        assert rows[arm]["isotropic null"] == "63.50 (N = 4,096)"
    assert rows["adamw"]["weakest layer: erank"].startswith("L2: 7.00")
    assert "is 63.50 for the 4,096 probe tokens" in text
    checkpoints = parse_table(text, "tokens")
    assert pm(checkpoints[0][1])[0] == pytest.approx(62.0)  # init: 60 + 2
    stable = {h.arm: h for h in Study(find_runs(sweep), metric="stable_rank").headlines()}
    assert stable["adamw"].mean.mean == pytest.approx(np.mean(FINAL["adamw"]) / 2)
    assert stable["adamw"].dead_layers is None and stable["adamw"].null == pytest.approx(54.0)
    for name in ("pr_trajectory.png", "layer_comparison.png", "heatmap_muon.png", "heads_muon.png"):
        assert (tmp_path / name).stat().st_size > 15_000, name


def test_unknown_metric_is_a_user_error(sweep, tmp_path):
    with pytest.raises(UserError, match="choose one of pr, erank, stable_rank, rankme"):
        build_report(sweep, metric="entropy", out_dir=tmp_path)


def test_nulls_are_drawn_and_stated(sweep, report):
    prs = Study(find_runs(sweep), "norm", metric="rankme").prs
    np.testing.assert_allclose(prs["muon"].null, [63.8] * 4)
    assert _nulls(list(prs.values())) == [(63.8, N_PROBE)]
    assert _nulls(list(Study(find_runs(sweep), "norm").prs.values())) == [(63.0, N_PROBE)]
    text = report.read_text()
    assert "isotropic null" in text and "is 63.00 for the 4,096 probe tokens" in text
    assert (report.parent / "pr_trajectory.png").exists() and (report.parent / "layer_comparison.png").exists()


def test_per_head_values_at_the_final_checkpoint(sweep):
    pr = Study(find_runs(sweep), "norm").prs["muon+qknorm"]
    assert pr.heads.shape == (2, 4, 4)  # (seed, layer, head)
    np.testing.assert_allclose(pr.heads.mean(axis=0), np.add.outer(FINAL["muon+qknorm"], HEAD_OFFSETS))


def test_attention_table(report):
    text = report.read_text()
    header = table_header(text, "## Attention")
    rows = {r[0].strip("`"): dict(zip(header, r)) for r in parse_table(text, "arm", "## Attention")}
    assert list(rows) == list(FINAL)
    for arm, row in rows.items():
        assert pm(row["mean key PR"])[0] == pytest.approx(np.mean(FINAL[arm]), abs=0.005)  # next to PR
        assert pm(row["attention entropy (normalised, mean)"]) == (pytest.approx(ENTROPY[arm], abs=5e-4),
                                                                  pytest.approx(T1 * 0.01, abs=5e-4))
        assert pm(row["max logit (max over layers, heads)"]) == (pytest.approx(MAX_LOGIT[arm], abs=0.005),
                                                                 pytest.approx(T1 * 1.0, abs=0.005))


def test_weight_table(report):
    text = report.read_text()
    header = table_header(text, "## Weights")
    rows = {r[0].strip("`"): dict(zip(header, r)) for r in parse_table(text, "arm", "## Weights")}
    for arm, row in rows.items():
        assert pm(row["W_k stable rank (mean)"])[0] == pytest.approx(WK_STABLE[arm])
        assert pm(row["W_q stable rank (mean)"])[0] == pytest.approx(WK_STABLE[arm] + 10)
        assert pm(row["W_k spectral norm (max)"])[0] == pytest.approx(WK_NORM[arm])


def test_pretrained_is_a_reference_not_an_arm(sweep, with_reference, tmp_path):
    runs = find_runs(with_reference)
    assert [r.arm for r in runs][-1] == "hf:qwen3" and runs[-1].reference  # last, though 'h' < 'm'
    text = build_report(with_reference, out_dir=tmp_path).read_text()
    rows = headline_rows(text)
    assert list(rows) == ["adamw", "muon+qknorm", "hf:qwen3 (pretrained)"]
    ref = rows["hf:qwen3 (pretrained)"]
    assert (ref["seeds"], ref["tokens"], ref["val loss"]) == ("—", "—", "n/a")
    assert pm(ref["mean key PR"]) == (pytest.approx(np.mean(REF_PR)), pytest.approx(math.nan, nan_ok=True))
    assert ref["isotropic null"] == "126.00 (N = 8,192)" and ref["weakest layer: PR"] == "L5: 50.00"
    # trained arms are untouched by the reference: same numbers as without it
    alone = {h.arm: h for h in Study(find_runs(sweep)).headlines()}
    assert pm(rows["adamw"]["mean key PR"])[0] == pytest.approx(alone["adamw"].mean.mean, abs=0.005)
    assert rows["adamw"]["seeds"] == "2" and "is 63.00 for the 4,096 probe tokens" in text
    assert [r[0] for r in parse_table(text, "tokens")] == ["0 (init)", "1,000", "10,000", "100,000"]
    assert table_header(text, "## Mean key PR") == ["tokens", "`adamw`", "`muon+qknorm`"]  # no column at "init"
    attention = {r[0]: r for r in parse_table(text, "arm", "## Attention")}
    assert pm(attention["`hf:qwen3` (pretrained)"][6])[0] == pytest.approx(25.0)  # max over its 6 layers
    assert "`hf:qwen3` (6 layers, head_dim 128)" in text
    for name in ("pr_trajectory.png", "layer_comparison.png", "heads_hf_qwen3.png", "weight_spectra.png",
                 "loss_curves.png"):
        assert f"]({name})" in text and (tmp_path / name).exists(), name
    assert not (tmp_path / "heatmap_hf_qwen3.png").exists()  # one checkpoint: no layer × checkpoint map
    assert "`optim.name`" in text and "`model.n_kv_head`" not in text  # config compares trained arms only


def test_only_pretrained_runs_report(tmp_path):
    write_pretrained(tmp_path)
    text = build_report(tmp_path).read_text()
    assert "No trained run has finished" in text
    assert list(headline_rows(text)) == ["hf:qwen3 (pretrained)"]
    assert (tmp_path / "heads_hf_qwen3.png").exists() and (tmp_path / "layer_comparison.png").exists()
    assert not (tmp_path / "pr_trajectory.png").exists() and not (tmp_path / "attention_entropy.png").exists()


def test_old_metrics_files_still_report(tmp_path):
    for arm in ("adamw", "muon"):
        for seed in (0, 1):
            write_run(tmp_path, arm, seed, lenses=False)
    text = build_report(tmp_path).read_text()
    rows = headline_rows(text)
    assert pm(rows["muon"]["mean key PR"])[0] == pytest.approx(np.mean(FINAL["muon"]), abs=0.005)
    assert rows["adamw"]["dead layers (PR < 10)"] == "2 (L1, L2)"
    assert rows["adamw"]["isotropic null"] == "63.00 (N = 4,096)"  # PR's closed form from n and dim
    for section in ("## Attention", "## Weights"):
        assert section not in text
    for name in ("attention_entropy.png", "max_logit.png", "weight_spectra.png"):
        assert not (tmp_path / name).exists() and name not in text
    assert (tmp_path / "heads_adamw.png").exists()  # pr_heads was always written
    with pytest.raises(UserError, match="no 'erank'.*available: pr"):
        build_report(tmp_path, metric="erank")


def test_qkclip_arm_order_and_colours():
    from rankprobe.report.figures import ARM_COLOURS, arm_colour
    arms = ["adamw", "muon", "muon+qkclip", "muon+qknorm+qkclip", "hf:llama"]
    assert sorted(arms, key=arm_key) == ["adamw", "muon", "hf:llama", "muon+qkclip", "muon+qknorm+qkclip"]
    colours = {a: arm_colour(a, arms, references={"hf:llama"}) for a in arms}
    assert len(set(colours.values())) == len(arms) and colours["muon"] == ARM_COLOURS["muon"]


def test_compressed_metrics_rebuild_the_same_report(tmp_path):
    """A published study ships metrics.jsonl.gz / .xz; the report must read them and say the same."""
    import gzip
    import lzma

    plain, packed = tmp_path / "plain", tmp_path / "packed"
    for i, arm in enumerate(["adamw", "adamw+qknorm", "muon", "muon+qknorm"]):
        for seed in (0, 1):
            path = write_run(plain, arm, seed)
            dest = packed / path.parent.name
            dest.mkdir(parents=True)
            codec, suffix = (gzip, ".gz") if i % 2 else (lzma, ".xz")
            (dest / f"metrics.jsonl{suffix}").write_bytes(codec.compress(path.read_bytes()))
    assert [r.name for r in find_runs(packed)] == [r.name for r in find_runs(plain)]
    a = build_report(plain).read_text().split("## Configuration")[0]
    b = build_report(packed).read_text().split("## Configuration")[0]
    assert a.replace("plain", "packed") == b
    broken = packed / "muon-s0" / "metrics.jsonl.xz"
    broken.write_bytes(broken.read_bytes()[:50])
    with pytest.raises(MetricsError, match="cannot read metrics file"):
        read_metrics(broken)


# ---------------------------------------------------------------------------------------------
# findings (report/findings.py): the study's questions, answered with seed intervals


def findings_text(text: str, question: str = "") -> str:
    """The "## Findings" section, or its "### <question>" part."""
    section = text.split("## Findings", 1)[1].split("\n## ", 1)[0] if "## Findings" in text else text
    if not question:
        return section
    return section.split(f"### {question}", 1)[1].split("\n### ", 1)[0]


def test_findings_section_placed_after_headline(report):
    text = report.read_text()
    assert text.index("## Headline") < text.index("## Findings") < text.index("## Attention")
    for q in ("1. Early", "2. Final", "3. Does validation", "4. Attention-logit"):
        assert f"### {q}" in findings_text(text)


def test_findings_early_qknorm_resolved_at_1m(tmp_path):
    """3 seeds (-0.5, +0.5, 0): half-width t_{0.975,2}·0.5/√3 ≈ 1.24, far below the 20-PR gap at 1M."""
    checkpoints = [0, 300_000, 900_000, 1_200_000]

    def pr(arm, c, layer, seed):
        return (50.0 if "qknorm" in arm else 30.0) + {0: -0.5, 1: 0.5}.get(seed, 0.0)

    for arm in ("adamw", "adamw+qknorm"):
        for seed in (0, 1, 2):
            write_run(tmp_path, arm, seed, checkpoints=checkpoints, pr=pr, budget=1_200_000)
    early = findings_text(build_report(tmp_path).read_text(), "1. Early")
    half = t_quantile(2) * 0.5 / math.sqrt(3)
    assert "`adamw` at 900,000 tokens, the checkpoint nearest 1M tokens" in early
    assert f"50.00 ± {half:.2f} with QK-Norm vs 30.00 ± {half:.2f} without, difference +20.00" in early
    assert "higher with QK-Norm, resolved" in early and "3 seeds" in early
    assert "`muon`" not in early  # no muon arms at all: nothing to skip or claim


def test_findings_overlapping_seeds_not_resolved(report):
    """The default sweep: at 10,000 tokens (10% of 100,000) adamw+qknorm leads by 10.3 PR, but with 2
    seeds each half-width is t_{0.975,1}·0.5 ≈ 6.35, so the intervals overlap."""
    text = report.read_text()
    early = findings_text(text, "1. Early")
    assert "`adamw` at 10,000 tokens, the first checkpoint at or after 10% of the 100,000-token budget" in early
    assert "44.13 ± 6.35 with QK-Norm vs 33.83 ± 6.35 without, difference +10.30: not resolved with 2 seeds" in early
    assert "resolved (" not in early.replace("not resolved", "")
    final = findings_text(text, "2. Final")
    assert "`muon` has the highest mean key PR (58.75 ± 6.35)" in final
    assert "runner-up `muon+qknorm` (49.05 ± 6.35) it is not resolved with 2 seeds" in final
    rows = {r[0].strip("`"): r for r in parse_table(final, "arm")}
    assert list(rows) == ["muon", "muon+qknorm", "adamw+qknorm", "adamw"]
    assert rows["adamw"][4] == "2.0 ± 0.0"  # L1, L2 dead in both seeds
    assert pm(rows["muon+qknorm"][4]) == pytest.approx((0.5, T1 * 0.5), abs=0.05)  # 9.7 dead in seed 0 only


def test_findings_single_seed_has_no_interval(tmp_path):
    for arm in ("adamw", "adamw+qknorm"):
        write_run(tmp_path, arm, 0)
    text = findings_text(build_report(tmp_path).read_text())
    early = findings_text(text, "1. Early")
    assert "higher with QK-Norm on a single seed (no interval" in early and "±" not in early
    assert "43.63 with QK-Norm vs 33.33 without, difference +10.30" in early  # seed 0: 0.5 below the mean
    assert "on a single seed (no interval" in findings_text(text, "2. Final")
    assert "Cannot be assessed: 2 arm(s)" in findings_text(text, "3. Does")


def test_spearman_known_answers():
    from rankprobe.report.series import spearman
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3, 4], [1, 2, 4, 3]) == pytest.approx(0.8)  # 1 - 6·2/(4·15)
    assert spearman([5, 1, 5, 2], [1, 2, 3, 4]) == pytest.approx(-1 / math.sqrt(22.5))  # ties: ranks 3.5, 1, 3.5, 2
    assert math.isnan(spearman([1, 2, 3], [7, 7, 7]))


def test_findings_loss_agreement(report, tmp_path):
    """Default sweep: PR ranks muon > muon+qknorm, val loss the other way round: ρ = 0.8."""
    text = findings_text(report.read_text(), "3. Does")
    assert "ρ = +0.80 over 4 arms" in text
    assert ("(highest first): `muon`, `muon+qknorm`, `adamw+qknorm`, `adamw`; by final val loss (lowest "
            "first): `muon+qknorm`, `muon`, `adamw+qknorm`, `adamw`") in text

    def pr(arm, c, layer, seed):  # key PR opposite to val loss (adamw worst loss, highest PR)
        return {"adamw": 50.0, "adamw+qknorm": 40.0, "muon": 30.0, "muon+qknorm": 20.0}[arm]

    for arm in FINAL:
        write_run(tmp_path, arm, 0, pr=pr)
    assert "ρ = -1.00 over 4 arms" in findings_text(build_report(tmp_path).read_text(), "3. Does")


def test_findings_logit_growth(report):
    """Max logit (layer 3, seeds ±1) ramps from 3 at init to MAX_LOGIT: 3 + (final - 3)/3 at 1,000 tokens."""
    text = findings_text(report.read_text(), "4. Attention")
    rows = {r[0].strip("`"): r for r in parse_table(text, "arm")}
    for arm, final in MAX_LOGIT.items():
        first = 3.0 + (final - 3.0) / 3
        assert rows[arm][1] == "1,000" and rows[arm][3] == "100,000"
        assert pm(rows[arm][2]) == pytest.approx((first, T1 * 1.0), abs=0.01)
        assert pm(rows[arm][4]) == pytest.approx((final, T1 * 1.0), abs=0.01)
        assert rows[arm][5] == f"{final / first:.2f}×"
    assert "`muon` (80.00 ± 12.71) against `adamw` (300.00 ± 12.71) is lower, resolved" in text


def test_findings_old_files_without_attention(tmp_path):
    for arm in ("adamw", "muon"):
        for seed in (0, 1):
            write_run(tmp_path, arm, seed, lenses=False)
    text = findings_text(build_report(tmp_path).read_text())
    assert "attention lenses were not recorded" in findings_text(text, "4. Attention")
    early = findings_text(text, "1. Early")
    assert "`adamw`: no finished `adamw+qknorm` arm" in early and "`muon`: no finished `muon+qknorm` arm" in early


# ---------------------------------------------------------------------------------------------
# where the time went: the `end` row's phase seconds


def timing(wall: float, setup: float, first: float, evals: float, probes: float, ckpt: float) -> dict:
    return {"wall_s": wall, "setup_s": setup, "first_step_s": first, "eval_s": evals, "probe_s": probes,
            "checkpoint_s": ckpt}


def test_cost_table_rate_and_shares(tmp_path):
    # 100,000 tokens, one step 1,000: the rate is 99,000 / (wall − the five phases)
    write_run(tmp_path, "adamw", 0, timing=timing(200.0, 20.0, 40.0, 10.0, 30.0, 1.0))  # rest 99: 1,000/s
    write_run(tmp_path, "adamw", 1, timing=timing(250.0, 50.0, 50.0, 25.0, 50.0, 25.5))  # rest 49.5: 2,000/s
    write_run(tmp_path, "muon", 0, timing=timing(100.0, 5.0, 10.0, 2.5, 7.5, 0.0))  # rest 75: 1,320/s
    write_run(tmp_path, "muon", 1)  # written before the phase fields: left out of muon's numbers
    write_run(tmp_path, "muon+qknorm", 0)  # no seed has them: no row
    write_run(tmp_path, "adamw+qknorm", 0, timing=timing(100.0, 5.0, 10.0, 2.5, 7.5, 0.0))
    diverged = write_run(tmp_path, "adamw+qknorm", 1, timing=timing(100.0, 90.0, 1.0, 1.0, 1.0, 1.0))
    lines = diverged.read_text().splitlines()
    end = json.loads(lines[-1]) | {"status": "diverged", "reason": "non-finite loss", "checkpoint_step": None}
    diverged.write_text("\n".join([*lines[:-1], json.dumps(end)]) + "\n")
    text = build_report(tmp_path).read_text()
    assert text.index("## Figures") < text.index("## Where the time went") < text.index("## Diverged runs")
    assert table_header(text, "## Where the time went") == [
        "arm", "seeds", "wall time (s)", "training rate (tokens/s)", "set-up (%)", "first step (%)", "evals (%)",
        "probes (%)", "checkpoints (%)"]
    rows = {r[0].strip("`"): r[1:] for r in parse_table(text, "arm", "## Where the time went")}
    assert list(rows) == ["adamw", "adamw+qknorm", "muon"]

    def two(a: float, b: float, digits: int) -> str:  # seed mean ± t_{0.975,1}·sd/√2 = T1·|a − b|/2
        return f"{(a + b) / 2:,.{digits}f} ± {T1 * abs(a - b) / 2:,.{digits}f}"
    assert rows["adamw"] == ["2", two(200, 250, 1), two(1_000, 2_000, 0), two(10, 20, 1), two(20, 20, 1),
                             two(5, 10, 1), two(15, 20, 1), two(0.5, 10.2, 1)]
    assert rows["adamw"][2] == "1,500 ± 6,353"
    one = ["100.0", "1,320", "5.0", "10.0", "2.5", "7.5", "0.0"]  # one seed: no interval
    assert rows["muon"] == ["1 of 2", *one]
    assert rows["adamw+qknorm"] == ["1", *one]  # the diverged seed is not counted


def test_old_end_rows_give_no_cost_section(tmp_path, report):
    for seed in (0, 1):
        write_run(tmp_path, "muon", seed)
    for text in (build_report(tmp_path).read_text(), report.read_text()):
        assert "## Where the time went" not in text and "## Figures" in text


def test_env_records_the_commit_and_whether_the_package_differs_from_it(tmp_path):
    import torch

    from rankprobe.runlog import _git, env_info

    git = lambda *a: subprocess.run(["git", *a], cwd=tmp_path, check=True, capture_output=True)
    git("init", "-q")
    (tmp_path / "f.py").write_text("x = 1\n")
    git("add", "f.py")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c")
    assert len(_git(tmp_path, "rev-parse", "HEAD")) == 40 and _git(tmp_path, "status", "--porcelain") == ""
    (tmp_path / "f.py").write_text("x = 2\n")
    assert _git(tmp_path, "status", "--porcelain") == "M f.py"
    assert _git(tmp_path / "nowhere", "status") is None  # no such folder: no answer, no exception
    env = env_info(torch.device("cpu"))
    assert (env["git_sha"] is None) == (env["git_dirty"] is None)


def test_a_study_made_by_several_sweeps_lists_no_sweep_settings(tmp_path):
    """Runs launched by different sweeps (a study made in parts, one arm per sweep) differ in sweep.*
    only; that says how they were launched, not what they computed, so the report does not list it."""
    for arm in ("adamw", "muon"):
        path = write_run(tmp_path, arm, 0)
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        rows[0]["config"]["sweep"].update(arms=[arm], seeds=[0])
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = build_report(tmp_path).read_text()
    section = text[text.index("## Configuration"):]
    assert "`optim.name`" in section and "sweep." not in section

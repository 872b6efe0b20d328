"""Report tests on synthetic metrics.jsonl files with known PR values (4 arms x 2 seeds + 1 unfinished).

Key PR at tap `norm` is 60 at init and moves linearly (in checkpoint index) to a per-arm final layer
profile, plus -0.5 / +0.5 for seeds 0 / 1, so every seed mean and 95% half-width (t_{0.975,1}·0.5) is
known by hand. Other taps and tensors carry offset values so reading the wrong one shows up.
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
from rankprobe.report.markdown import headline_numbers
from rankprobe.report.metrics import MetricsError, aggregate, arm_key, arm_pr

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


def key_pr(arm: str, c: int, layer: int, seed: int) -> float:
    """Key PR at tap norm for checkpoint index c."""
    final = FINAL[arm][layer]
    return 60.0 + (final - 60.0) * c / (len(CHECKPOINTS) - 1) + SEED_DELTA.get(seed, 0.0)


def write_run(root: Path, arm: str, seed: int, *, finished: bool = True, checkpoints=CHECKPOINTS,
              pr=key_pr, n_layer: int = 4) -> Path:
    """A metrics.jsonl in the documented schema (docs/metrics.md)."""
    optimizer, qk = arm.split("+")[0], "qknorm" in arm
    cfg = to_dict(Config())
    cfg["name"] = f"{arm}-s{seed}"
    cfg["model"].update(n_layer=n_layer, head_dim=HEAD_DIM, qk_norm=qk)
    cfg["optim"]["name"] = optimizer
    cfg["train"].update(seed=seed, tokens=CHECKPOINTS[-1], batch_size=4)
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
                             "grad_norm": 1.0, "step_time_s": 0.01})
        val = 8.3 - (8.3 - VAL[arm]) * c / (len(CHECKPOINTS) - 1) + VAL_DELTA.get(seed, 0.0)
        rows.append({"kind": "eval", "step": step, "tokens": tokens, "val_loss": val, "val_tokens": 4096})
        for layer in range(n_layer):
            k = pr(arm, c, layer, seed)
            for tap, tensor, value in [("proj", "k", k + 5), ("norm", "k", k), ("rope", "k", k - 3),
                                       ("proj", "q", 20.0), ("norm", "q", 21.0), ("rope", "q", 22.0),
                                       ("proj", "v", 30.0)]:
                rows.append({"kind": "probe", "step": step, "tokens": tokens, "tap": tap, "tensor": tensor,
                             "layer": layer, "pr": value, "pr_heads": [value] * 4, "mean_norm": [0.1] * 4,
                             "n": 4096, "dim": HEAD_DIM})
    rows.append({"kind": "some_future_kind", "x": 1})
    if finished:
        rows.append({"kind": "end", "step": checkpoints[-1] // step_tokens, "tokens": checkpoints[-1],
                     "wall_s": 12.0, "status": "finished"})
    path = root / f"{arm}-s{seed}" / "metrics.jsonl"
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


def parse_table(text: str, first_header: str) -> list[list[str]]:
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
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
    prs = aggregate(find_runs(sweep), "norm")
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


def test_headline_numbers_and_dead_layers(sweep):
    heads = {h.arm: h for h in headline_numbers(find_runs(sweep))}
    assert heads["adamw"].dead_layers == [1, 2]
    assert heads["adamw+qknorm"].dead_layers == [2]
    assert heads["muon"].dead_layers == []
    assert heads["muon+qknorm"].dead_layers == []  # 10.2 is above dead_pr = 10
    assert (heads["muon+qknorm"].weakest_layer, heads["muon+qknorm"].weakest_pr) == (2, pytest.approx(10.2))
    assert heads["muon"].val_loss == pytest.approx(2.81)
    assert heads["muon"].val_loss_half == pytest.approx(T1 * 0.02, rel=1e-6)
    proj = {h.arm: h for h in headline_numbers(find_runs(sweep), tap="proj")}
    assert proj["adamw"].mean_pr == pytest.approx(np.mean(FINAL["adamw"]) + 5)
    assert proj["adamw"].dead_layers == []  # proj profile 45, 13, 10, 35: dead means strictly below 10
    rope = {h.arm: h for h in headline_numbers(find_runs(sweep), tap="rope")}
    assert rope["adamw+qknorm"].dead_layers == [2] and rope["muon+qknorm"].dead_layers == [2]  # 6.8, 7.2


def test_report_headline_table(report):
    text = report.read_text()
    rows = {r[0].strip("`"): r for r in parse_table(text, "arm")}
    assert list(rows) == ["adamw", "adamw+qknorm", "muon", "muon+qknorm"]
    expect_weakest = {"adamw": (2, 5.0), "adamw+qknorm": (2, 9.8), "muon": (1, 55.0), "muon+qknorm": (2, 10.2)}
    expect_dead = {"adamw": "2 (L1, L2)", "adamw+qknorm": "1 (L2)", "muon": "0", "muon+qknorm": "0"}
    for arm, (_, seeds, tokens, mean_pr, weakest, dead, val) in rows.items():
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


def test_figures_written_and_nontrivial(report):
    out = report.parent
    names = ["pr_trajectory.png", "layer_comparison.png", "heatmap_adamw.png", "heatmap_adamw+qknorm.png",
             "heatmap_muon.png", "heatmap_muon+qknorm.png", "loss_curves.png"]
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

"""Several arms at a time (`--workers K`, `--gpus N --per-gpu K`): each arm's metrics as when it runs alone,
the workers spread round-robin over the GPUs, the memory check for K arms on one GPU, and the wait of an arm
for the worker that compiles its graph."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from rankprobe.config import ConfigError, load
from rankprobe.runfolder import METRICS, WALL_CLOCK_FIELDS, read_rows
from rankprobe.sweep import (FirstStep, _worker_env, arm_bytes, arms, check_fit, graph_key, next_arm,
                             run_sweep)
from rankprobe.train import train

ROOT = Path(__file__).resolve().parents[1]


def _deterministic(path) -> list[dict]:
    """The rows of a metrics file without what depends on the clock or the host (docs/metrics.md)."""
    out = []
    for row in read_rows(path):
        row = {k: v for k, v in row.items() if k not in WALL_CLOCK_FIELDS and k != "env"}
        out.append(row)
    return out


def _numbers(rows: list[dict]) -> list[float]:
    """Every number of `rows` (lists flattened), in order, None as NaN."""
    out = []
    for row in rows:
        for v in row.values():
            for x in v if isinstance(v, list) else [v]:
                if x is None or (isinstance(x, (int, float)) and not isinstance(x, bool)):
                    out.append(float("nan") if x is None else float(x))
    return out


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_arms_two_at_a_time_on_one_gpu_compute_what_each_computes_alone(tiny, tmp_path):
    """`--gpus 1 --per-gpu 2`, regionally compiled (the muon arm waits for the adamw arm's compile):
    each arm's rows as alone, bit for bit where two runs alone agree bit for bit, else within ten
    times their own spread (an atomic-add kernel can make a GPU run differ from itself)."""
    cfg = load("demo", {**tiny, "sweep.arms": "adamw,adamw+qknorm,muon", "train.compile": "regional"})
    grid = arms(cfg)
    for rep in ("alone", "again"):
        for a in grid:
            train(a, tmp_path / rep / a.name)
    run_sweep(cfg, tmp_path / "together", report=False, workers=2, gpus=1)
    for a in grid:
        alone, again, together = (_deterministic(tmp_path / rep / a.name / METRICS)
                                  for rep in ("alone", "again", "together"))
        assert [r["kind"] for r in together] == [r["kind"] for r in alone]
        x, y, z = (torch.tensor(_numbers(rows), dtype=torch.float64) for rows in (alone, again, together))
        assert torch.equal(x.isnan(), z.isnan()), a.name
        spread = (x - y).abs().nan_to_num().max().item()
        if spread == 0:
            assert together == alone, a.name
        else:
            assert (z - x).abs().nan_to_num().max().item() <= 10 * spread, a.name


def test_workers_go_round_robin_over_the_visible_gpus(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    got = [_worker_env(slot, 4, 2)["CUDA_VISIBLE_DEVICES"] for slot in range(4)]
    assert got == ["3", "5", "3", "5"]  # two arms on each GPU
    assert "OMP_NUM_THREADS" in _worker_env(0, 4, 2)  # four processes share the host's cores
    assert "OMP_NUM_THREADS" not in _worker_env(0, 2, 2)  # one per GPU: as before
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert [_worker_env(slot, 3, 1)["CUDA_VISIBLE_DEVICES"] for slot in range(3)] == ["0", "0", "0"]


def test_memory_check_refuses_arms_that_do_not_fit_on_one_gpu_together():
    grid = arms(load("seed-22l", {}))
    each = arm_bytes(grid[0])
    # the estimate against the 21.5 GiB peak measured at seed-22l on an H200 (BENCHMARKS.md), before the
    # allocator's slack and the CUDA context
    assert 19 * 2**30 < (each - 2**30) / 1.2 < 23 * 2**30
    h200 = int(139.8 * 2**30)
    check_fit(grid, 4, h200)  # four seed-22l arms fit on an H200
    with pytest.raises(ConfigError) as e:
        check_fit(grid, 3, 3 * each - 1)
    msg = str(e.value)
    assert "\n" not in msg and "--per-gpu 3" in msg and "use --per-gpu 2" in msg
    check_fit([replace(a, train=replace(a.train, allow_large=True)) for a in grid], 3, 3 * each - 1)  # insisted
    fp32 = arms(load("seed-22l", {"train.dtype": "fp32"}))[0]
    assert arm_bytes(fp32) > 1.8 * (each - 2**30)  # fp32 activations take twice the bytes


def test_per_gpu_without_gpus_refuses_in_one_line(tmp_path, capsys):
    from rankprobe.cli import main

    for args, words in ((["--per-gpu", "2"], "--per-gpu needs --gpus"),
                        (["--workers", "2", "--per-gpu", "2"], "--per-gpu needs --gpus"),
                        (["--gpus", "1", "--per-gpu", "0"], "--per-gpu takes")):
        assert main(["sweep", "demo", "--out", str(tmp_path / "s"), *args]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and words in err, err
    assert not (tmp_path / "s").exists()


def test_an_arm_waits_only_for_a_worker_compiling_its_own_graph():
    grid = arms(load("seed-22l", {}))  # adamw, adamw+qknorm, muon, muon+qknorm
    keys = [graph_key(a, gpus=1) for a in grid]
    assert keys[0] == keys[2] and keys[1] == keys[3] and keys[0] != keys[1]  # the optimizer is not compiled
    assert next_arm(grid[2:], {keys[0]}, gpus=1) == 1  # muon waits for adamw; muon+qknorm may start
    assert next_arm(grid[2:], {keys[0], keys[1]}, gpus=1) is None
    assert next_arm(grid[2:], set(), gpus=1) == 0
    assert graph_key(grid[0], gpus=0) is None  # "auto" compiles only on a GPU
    eager = arms(load("seed-22l", {"train.compile": "false"}))
    assert {graph_key(a, gpus=1) for a in eager} == {None}


def test_first_step_is_read_from_the_metrics_a_worker_writes(tiny, tmp_path):
    cfg = arms(load("demo", tiny))[0]
    run = tmp_path / "run"
    first = FirstStep(run, "k", fresh=True)
    assert not first.done()  # no file yet
    train(cfg, run)
    assert first.done()
    again = FirstStep(run, "k", fresh=True)  # a forced rerun finds the old file
    assert not again.done()  # unchanged since the worker started: none of its rows are the new run's
    with open(run / METRICS, "a") as f:  # the new run's file so far: a run row and step-0 probes
        f.truncate(0)
        for row in read_rows(tmp_path / "run" / METRICS):
            if row["kind"] == "train":
                break
            f.write(json.dumps(row) + "\n")
        f.write('{"kind": "train", "st')  # a row being written
    assert not again.done()
    with open(run / METRICS, "a") as f:
        f.write('ep": 1, "tokens": 64, "loss": 5.0}\n')
    assert again.done()


def test_first_step_of_a_resumed_run_is_past_its_checkpoint(cutoff, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(cutoff, run)
    rows = read_rows(run / METRICS)
    last = max(r["step"] for r in rows if r["kind"] == "train")
    first = FirstStep(run, "k", fresh=False)
    assert first.after == last
    with open(run / METRICS, "a") as f:
        f.write(json.dumps({"kind": "train", "step": last, "tokens": 1, "loss": 1.0}) + "\n")
    assert not first.done()  # a step the checkpoint had seen, logged again
    with open(run / METRICS, "a") as f:
        f.write(json.dumps({"kind": "train", "step": last + 1, "tokens": 1, "loss": 1.0}) + "\n")
    assert first.done()


@pytest.mark.slow
def test_arms_two_at_a_time_compute_what_each_computes_alone(tmp_path, corpus_file, monkeypatch):
    """benchmarks/study.py --smoke: `rankprobe sweep demo --workers 2` (the CPU's stand-in for `--gpus 1
    --per-gpu 2`) from empty caches, timed; then each arm alone in this process, and every row of each
    arm's metrics compared bit for bit, timings and host aside."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import study

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the workers' threads, which the arms alone use too
    out, work = tmp_path / "study.json", tmp_path / "work"
    extra = ["--data.corpus", str(corpus_file), "--sweep.arms", "adamw,muon+qknorm"]
    cmd = [sys.executable, str(ROOT / "benchmarks" / "study.py"), "--smoke", "--per-gpu", "2", "--json", str(out),
           "--work", str(work), "--", *extra]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    got = json.loads(out.read_text())["2"]
    assert got["exit"] == 0 and got["wall_s"] > 0 and "--workers 2" in got["command"]
    assert set(got["arms"]) == {"adamw-s0", "muon+qknorm-s0"}
    for a in got["arms"].values():
        assert a["status"] == "finished" and a["setup_s"] > 0 and a["train_tokens_per_s"] > 0
        assert 0 <= a["start_s"] < a["end_s"] <= got["wall_s"] and a["outside_run_s"] >= 0
        assert a["final_val_loss"] > 0 and set(a["final_key_pr"]) == {"proj", "norm", "rope"}
    assert max(a["start_s"] for a in got["arms"].values()) < min(a["end_s"] for a in got["arms"].values())
    assert got["before_first_arm_s"] > 0 and got["after_last_arm_s"] > 0
    assert "| adamw-s0 |" in run.stdout and "| 2 | **" in run.stdout
    again = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "study.py"), "--render", str(out)],
                           capture_output=True, text=True)
    assert again.stdout == run.stdout

    overrides = {**study.SMOKE, "data.corpus": str(corpus_file), "data.cache_dir": str(work / "tokens"),
                 "train.progress": "false", "sweep.arms": "adamw,muon+qknorm", "out": str(work / "sweep")}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for a in arms(load("demo", overrides)):
            train(a, tmp_path / "alone" / a.name)
            alone = _deterministic(tmp_path / "alone" / a.name / METRICS)
            together = _deterministic(work / "sweep" / a.name / METRICS)
            assert {"run", "train", "eval", "probe", "attn", "end"} <= {r["kind"] for r in alone}
            assert together == alone, a.name  # losses, evals, every probe value: bit for bit
    finally:
        torch.set_num_threads(threads)

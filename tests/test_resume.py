"""Runs that survive: exact resume after SIGKILL, safe checkpoint loading, divergence, bad input, locks."""

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from conftest import with_corpus
from rankprobe.checkpoint import load_checkpoint
from rankprobe.cli import main
from rankprobe.config import DataError, UserError, load
from rankprobe.runfolder import CHECKPOINT, WALL_CLOCK_FIELDS
from rankprobe.sweep import arms, is_finished, run_sweep
from rankprobe.train import train

# 100 steps of 128 tokens, probed at 0, 25, 75 and 100 steps: long enough to kill in the middle
SMALL = {
    "model.n_layer": "2", "model.d_model": "64", "model.n_head": "2", "model.head_dim": "16",
    "model.seq_len": "32", "data.vocab_size": "300", "train.tokens": "12800", "train.batch_size": "4",
    "train.eval_tokens": "256", "train.log_every": "2", "train.progress": "false", "probe.tokens": "256",
    "probe.checkpoints": "0,3200,9600", "train.checkpoint_minutes": "0",
    "sweep.optimizers": "adamw", "sweep.qk_norm": "false", "sweep.seeds": "0",
}
WALL_CLOCK = (*WALL_CLOCK_FIELDS, "env")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """Overrides for a small run on ~100 KB of the embedded corpus, with a warm token cache."""
    return with_corpus(tmp_path_factory, "data", 100_000, SMALL)


def flags(overrides: dict) -> list[str]:
    return [x for k, v in overrides.items() for x in (f"--{k}", v)]


def cli_process(*args) -> subprocess.Popen:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    return subprocess.Popen([sys.executable, "-m", "rankprobe.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def strip(rs: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in WALL_CLOCK} for r in rs]


def last_step(path: Path) -> int:
    try:
        lines = path.read_bytes().splitlines()
        return json.loads(lines[-2]).get("step", 0) if len(lines) > 1 else 0
    except (OSError, ValueError):
        return 0


def freeze_after(proc: subprocess.Popen, metrics: Path, ckpt: Path, step: int) -> None:
    """SIGSTOP `proc` once a checkpoint exists and it has logged rows past `step`: frozen, it holds
    what a crash at that instant would leave, and its locks."""
    deadline = time.monotonic() + 120
    while not (ckpt.exists() and last_step(metrics) >= step):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the run never reached the kill point"
        time.sleep(0.005)
    proc.send_signal(signal.SIGSTOP)
    assert not is_finished(metrics.parent), "the run ended before it could be killed"


def kill(proc: subprocess.Popen) -> None:
    proc.kill()
    proc.wait()


@pytest.fixture(scope="module")
def killed(base, tmp_path_factory):
    """A run folder as SIGKILL left it: a checkpoint (at step 25, or 75 on a starved machine), rows
    logged after it, and a torn last line."""
    run = tmp_path_factory.mktemp("killed") / "run"
    proc = cli_process("train", "demo", "--out", str(run), *flags(base))
    freeze_after(proc, run / "metrics.jsonl", run / CHECKPOINT, step=35)
    kill(proc)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "step": 3')  # what a kill in the middle of a write leaves
    return run


@pytest.fixture
def copy_of(killed, tmp_path):
    return lambda: Path(shutil.copytree(killed, tmp_path / "run"))


@pytest.mark.slow
def test_killed_run_resumes_bit_for_bit(base, copy_of, tmp_path):
    run = copy_of()
    state = load_checkpoint(run / CHECKPOINT)
    assert state["step"] in (25, 75) and state["metrics_bytes"] < (run / "metrics.jsonl").stat().st_size
    proc = cli_process("train", "demo", "--out", str(run), "--resume", *flags(base))
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert f"resuming at step {state['step']}" in err and "torn last line" in err

    ref = train(load("demo", base), tmp_path / "ref")
    resumed = rows(run / "metrics.jsonl")
    assert strip(resumed) == strip(rows(ref))  # no duplicated, missing or different row
    assert (run / "model.safetensors").read_bytes() == (ref.parent / "model.safetensors").read_bytes()
    assert not (run / CHECKPOINT).exists()  # finished: the weights are the result
    assert [r["step"] for r in json.loads((run / "env.json").read_text())["resumes"]] == [state["step"]]


@pytest.mark.slow
def test_second_sweep_is_refused_and_a_killed_sweep_resumes(base, tmp_path, caplog):
    cfg = load("demo", {**base, "train.checkpoint_minutes": "0.0003", "out": str(tmp_path / "sweep")})
    out = Path(cfg.out)
    first = cli_process("sweep", "demo", "--out", str(out), *flags({**base, "train.checkpoint_minutes": "0.0003"}))
    arm = out / "adamw-s0"
    freeze_after(first, arm / "metrics.jsonl", arm / CHECKPOINT, step=40)
    try:
        second = cli_process("sweep", "demo", "--out", str(out), *flags(base))
        _, err = second.communicate(timeout=120)
    finally:
        kill(first)
    assert second.returncode == 2 and err.splitlines() == [
        f"rankprobe: error: {out} is in use by another rankprobe process (pid {first.pid}); wait for it to end "
        "or use another --out"]

    step = load_checkpoint(arm / CHECKPOINT)["step"]
    assert step > 25  # a time-based checkpoint (every ~20 ms), not the probe checkpoint at step 25
    with caplog.at_level("INFO"):
        run_sweep(cfg, out, report=False)  # the dead sweep's lock went with it
    assert f"resuming at step {step}" in caplog.text
    ref = run_sweep(cfg, tmp_path / "ref", report=False)[0]
    assert strip(rows(arm / "metrics.jsonl")) == strip(rows(ref))


class Payload:
    """Unpickling this calls Path.touch: what a booby-trapped checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def expect_refusal(capsys, argv: list[str], needle: str, run: Path) -> None:
    """One `rankprobe: error:` line naming the problem, exit 2, and nothing in the folder changed."""
    def files():
        return {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name != ".rankprobe.lock"}
    before = files()
    capsys.readouterr()
    assert main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("rankprobe: error: ") and needle in err[0], err
    assert files() == before


def test_malicious_checkpoint_is_refused_unrun(base, copy_of, tmp_path, capsys):
    run = copy_of()
    marker = tmp_path / "pwned"
    torch.save({"format": 1, "model": Payload(marker)}, run / CHECKPOINT)
    expect_refusal(capsys, ["train", "demo", "--out", str(run), "--resume", *flags(base)],
                   "refusing to load checkpoint", run)
    raw = tmp_path / "raw.pt"  # a bare pickle rather than torch's zip format
    raw.write_bytes(pickle.dumps(Payload(marker), protocol=2))
    with pytest.raises(DataError, match="refusing to load"):
        load_checkpoint(raw)
    assert not marker.exists()


def _truncate(run):
    data = (run / CHECKPOINT).read_bytes()
    (run / CHECKPOINT).write_bytes(data[: len(data) // 2])


def _garbage(run):
    (run / CHECKPOINT).write_bytes(os.urandom(4096))


def _not_ours(run):
    torch.save({"weights": torch.ones(3)}, run / CHECKPOINT)


def _shortened_metrics(run):
    (run / "metrics.jsonl").write_text((run / "metrics.jsonl").read_text()[:200])


@pytest.mark.parametrize("damage, extra, needle", [
    (_truncate, {}, "is corrupt or truncated"),
    (_garbage, {}, "is corrupt or truncated"),
    (_not_ours, {}, "is not a RankProbe checkpoint"),
    (_shortened_metrics, {}, "no longer matches"),
    (None, {"model.d_model": "32"}, "holds a model of a different shape (model.d_model: 64 in the checkpoint, 32 now)"),
    (None, {"optim.lr": "0.01"}, "was written with other settings (optim.lr: 0.003 in the checkpoint, 0.01 now)"),
], ids=["truncated", "garbage", "foreign", "metrics-shortened", "model-shape", "other-lr"])
def test_unusable_checkpoint_is_one_line_and_exit_2(base, copy_of, capsys, damage, extra, needle):
    run = copy_of()
    if damage:
        damage(run)
    expect_refusal(capsys, ["train", "demo", "--out", str(run), "--resume", *flags({**base, **extra})], needle, run)


def test_non_empty_folder_needs_resume_or_force(base, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    expect_refusal(capsys, ["train", "demo", "--out", str(run), *flags(base)],
                   "is not empty (notes.txt); pass --resume", run)


def test_divergence_stops_the_arm_and_the_sweep_goes_on(base, tmp_path, caplog):
    # muon_lr = 1e30 overflows the hidden matrices to inf within a step or two (1e6 does not: the loss
    # just sticks at ln(vocab)); the AdamW arm keeps lr 3e-3 and trains normally
    cfg = load("demo", {**base, "sweep.optimizers": "adamw,muon", "optim.muon_lr": "1e30",
                        "train.tokens": "3200", "probe.checkpoints": "0,1280"})
    with caplog.at_level("WARNING"):
        run_sweep(cfg, tmp_path)
    muon = tmp_path / "muon-s0"
    end = rows(muon / "metrics.jsonl")[-1]
    assert end["kind"] == "end" and end["status"] == "diverged" and end["loss"] is None
    assert end["reason"] == "non-finite loss"
    assert end["tokens"] == end["step"] * 128 and 0 < end["step"] <= 10 and end["checkpoint_step"] == 0
    assert f"muon-s0 diverged: non-finite loss at step {end['step']} ({end['tokens']} tokens; training loss nan)" \
        in caplog.text
    assert (muon / CHECKPOINT).exists() and not (muon / "model.safetensors").exists()
    assert is_finished(tmp_path / "adamw-s0") and is_finished(muon)

    report = (tmp_path / "report.md").read_text()
    assert f"`muon` | 0 | — | diverged at {end['tokens']:,} tokens" in report
    assert "## Diverged runs" in report and "`adamw`" in report

    mtimes = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("metrics.jsonl")}
    run_sweep(cfg, tmp_path, report=False)  # ended arms, diverged ones included, are not recomputed
    assert mtimes == {p: p.stat().st_mtime_ns for p in tmp_path.rglob("metrics.jsonl")}

    # resumed from the step-0 checkpoint it kept (its `end` row cut off), the arm diverges again, identically
    original = rows(muon / "metrics.jsonl")
    (muon / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in original[:-1]))
    with caplog.at_level("INFO"):
        train(arms(cfg)[1], muon, resume=True)
    assert "muon-s0: resuming at step 0" in caplog.text
    assert strip(rows(muon / "metrics.jsonl")) == strip(original)

    other = replace(cfg, optim=replace(cfg.optim, lr=0.01))  # not mixed into a folder of other settings
    with pytest.raises(UserError, match=r"adamw-s0 holds a run made with other settings \(optim.lr: 0.003"):
        run_sweep(other, tmp_path)



def test_non_finite_weights_stop_the_run_before_they_are_probed(base, tmp_path):
    # lr 1e39 overflows the first AdamW update to inf while the first loss is still finite: caught by the
    # weight check before the probe at step 1, so no probe row or checkpoint holds those weights
    inf = train(load("demo", {**base, "optim.lr": "1e39", "probe.checkpoints": "0,128"}), tmp_path / "inf")
    end = rows(inf)[-1]
    assert (end["status"], end["reason"], end["step"], end["checkpoint_step"]) == \
        ("diverged", "non-finite weights", 1, 0) and end["loss"] > 5
    assert max(r["tokens"] for r in rows(inf) if r["kind"] == "probe") == 0


def test_a_diverged_train_exits_1(base, tmp_path, capsys):
    # the run is recorded (an `end` row), but it has no result: scripts must notice
    assert main(["train", "demo", "--out", str(tmp_path / "one"), *flags(
        {**base, "optim.name": "muon", "optim.muon_lr": "1e30", "train.tokens": "3200", "probe.checkpoints": ""})]) == 1
    assert "rankprobe: demo diverged at " in capsys.readouterr().err


def test_torn_last_line_is_dropped_by_is_finished(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    end = json.dumps({"kind": "end", "step": 3, "tokens": 96, "status": "finished"})
    (run / "metrics.jsonl").write_text('{"kind": "run"}\n' + end + '\n{"kind": "tra')
    with pytest.warns(UserWarning, match="dropped torn last line 3"):  # runfolder.parse_rows, the one rule
        assert is_finished(run)
    (run / "metrics.jsonl").write_text('{"kind": "run"}\n{"kind": "train", "step": 2}\n' + end[:-3])
    assert not is_finished(run)


def test_checkpoints_follow_the_clock_and_the_end_row_splits_the_wall_time(base, tmp_path, monkeypatch):
    import rankprobe.train as train_mod

    # checkpoint_minutes > 0: no checkpoint at the probe points of a run shorter than the interval
    cfg = load("demo", {**base, "train.checkpoint_minutes": "10"})
    monkeypatch.setattr(train_mod, "_save_weights", lambda *a: (_ for _ in ()).throw(RuntimeError("cut")))
    with pytest.raises(RuntimeError, match="cut"):
        train(cfg, tmp_path / "cut")
    assert not (tmp_path / "cut" / CHECKPOINT).exists()
    monkeypatch.undo()

    end = rows(train(cfg, tmp_path / "run"))[-1]
    phases = [end[k] for k in ("setup_s", "first_step_s", "eval_s", "probe_s", "checkpoint_s")]
    assert end["checkpoint_s"] == 0 and all(p > 0 for p in phases[:4])
    assert sum(phases) < end["wall_s"]

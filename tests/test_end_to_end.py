"""Train, sweep and report end to end on a tiny model and a slice of the embedded corpus, on the CPU."""

import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import refused
from rankprobe.config import load
from rankprobe.sweep import arms, is_finished, run_sweep
from rankprobe.runfolder import WALL_CLOCK_FIELDS
from rankprobe.loop import probe_schedule
from rankprobe.train import train

TINY = {
    "model.n_layer": "2", "model.d_model": "64", "model.n_head": "2", "model.head_dim": "16",
    "model.seq_len": "32", "data.vocab_size": "300", "train.tokens": "3000", "train.batch_size": "4",
    "train.eval_tokens": "256", "train.log_every": "2", "train.progress": "false", "probe.tokens": "256",
    "probe.n_checkpoints": "3", "sweep.seeds": "0", "train.checkpoint_minutes": "0",
}


def tiny_cfg(corpus_file, cache, **extra):
    return load("demo", {**TINY, "data.corpus": str(corpus_file), "data.cache_dir": str(cache), **extra})


def rows(path, kind=None):
    out = [json.loads(line) for line in path.read_text().splitlines()]
    return [r for r in out if kind is None or r["kind"] == kind]


def test_probe_schedule_is_init_log_spaced_and_final():
    s = probe_schedule(1_000_000, 1000, 5, [])
    assert s[0] == 0 and s[-1] == 1_000_000 and s == sorted(set(s))
    gaps = [b - a for a, b in zip(s[1:], s[2:])]
    assert gaps == sorted(gaps)  # dense early
    assert probe_schedule(10_000, 3000, 4, [0, 5000]) == [0, 6000, 12000]  # snapped up to steps, final added


def test_train_writes_schema_and_is_deterministic(corpus_file, cache, tmp_path):
    cfg = tiny_cfg(corpus_file, cache, **{"optim.name": "muon", "model.qk_norm": "true"})
    a = train(cfg, tmp_path / "a")
    b = train(cfg, tmp_path / "b")
    run = rows(a, "run")[0]
    assert (run["arm"], run["schema"], run["seed"], run["head_dim"], run["n_layer"]) == ("muon+qknorm", 1, 0, 16, 2)
    assert set(run["param_groups"]) == {"muon", "adamw_decay", "adamw_no_decay"}
    assert sum(g["n_params"] for g in run["param_groups"].values()) == run["n_params"]
    probes = rows(a, "probe")
    ckpts = sorted({r["tokens"] for r in probes})
    assert ckpts == run["probe_checkpoints"] and ckpts[0] == 0 and ckpts[-1] == 3072
    assert {r["tokens"] for r in rows(a, "eval")} == set(ckpts)
    k = [r for r in probes if r["tensor"] == "k" and r["tap"] == "norm"]
    assert len(k) == 2 * len(ckpts) and all(1 <= r["pr"] <= 16 and r["n"] == 256 for r in k)
    assert rows(a, "end")[0]["status"] == "finished"
    assert (a.parent / "model.safetensors").exists() and (a.parent / "config.json").exists()

    def strip(rs):  # everything but wall-clock fields must match bit for bit
        return [{k: v for k, v in r.items() if k not in (*WALL_CLOCK_FIELDS, "env")} for r in rs]
    assert strip(rows(a)) == strip(rows(b))
    losses = [r["loss"] for r in rows(a, "train")]
    assert losses[-1] < losses[0]  # it learns


def test_weight_rows_from_the_worker_thread_describe_each_checkpoints_weights(corpus_file, cache, tmp_path):
    """The weight spectra are decomposed on a worker thread while training goes on, yet each
    checkpoint's rows sit between its own probe rows and the next checkpoint, and the final ones are
    exactly the spectra of the saved weights."""
    from rankprobe.probes.hf import load_run_checkpoint
    from rankprobe.probes.lenses import weight_lenses

    path = train(tiny_cfg(corpus_file, cache, **{"train.checkpoint_minutes": "10"}), tmp_path / "w")
    got = rows(path)
    ckpts = rows(path, "run")[0]["probe_checkpoints"]
    for tokens in ckpts:
        at = [j for j, r in enumerate(got) if r["kind"] == "weights" and r["tokens"] == tokens]
        assert len(at) == 2 * 4 and at == list(range(at[0], at[0] + 8))
        own = max(j for j, r in enumerate(got) if r["kind"] == "probe" and r["tokens"] == tokens)
        nxt = next(j for j, r in enumerate(got) if (r["kind"] == "eval" and r["tokens"] > tokens) or r["kind"] == "end")
        assert own < at[0] and at[-1] < nxt
    final = [{k: v for k, v in r.items() if k not in ("kind", "step", "tokens")}
             for r in got if r["kind"] == "weights" and r["tokens"] == ckpts[-1]]
    assert final == weight_lenses(load_run_checkpoint(path.parent))


@pytest.mark.slow
def test_sweep_runs_every_arm_skips_finished_and_reports(corpus_file, cache, tmp_path):
    cfg = tiny_cfg(corpus_file, cache)
    grid = arms(cfg)
    assert [a.name for a in grid] == ["adamw-s0", "adamw+qknorm-s0", "muon-s0", "muon+qknorm-s0"]
    run_sweep(cfg, tmp_path)
    assert all(is_finished(tmp_path / a.name) for a in grid)
    for name in ("report.md", "pr_trajectory.png", "layer_comparison.png", "loss_curves.png",
                 "heatmap_muon+qknorm.png"):
        assert (tmp_path / name).stat().st_size > 1000
    report = (tmp_path / "report.md").read_text()
    assert all(f"`{arm}`" in report for arm in ("adamw", "adamw+qknorm", "muon", "muon+qknorm"))
    before = {a.name: (tmp_path / a.name / "metrics.jsonl").stat().st_mtime_ns for a in grid}
    # a cut-off arm (no `end` row) is retrained; finished ones are not touched
    cut = tmp_path / "muon-s0" / "metrics.jsonl"
    cut.write_text("".join(line + "\n" for line in cut.read_text().splitlines()[:-1]))
    run_sweep(cfg, tmp_path, report=False)
    after = {a.name: (tmp_path / a.name / "metrics.jsonl").stat().st_mtime_ns for a in grid}
    assert [n for n in before if before[n] != after[n]] == ["muon-s0"]
    assert is_finished(tmp_path / "muon-s0")
    # a finished arm archived as metrics.jsonl.xz (as results/ publishes them) counts as finished too;
    # an archived arm that never ended does not
    import lzma

    for name, keep in (("adamw-s0", None), ("adamw+qknorm-s0", -1)):
        plain = tmp_path / name / "metrics.jsonl"
        lines = plain.read_text().splitlines(keepends=True)
        (tmp_path / name / "metrics.jsonl.xz").write_bytes(lzma.compress("".join(lines[:keep]).encode()))
        plain.unlink()
    assert is_finished(tmp_path / "adamw-s0") and not is_finished(tmp_path / "adamw+qknorm-s0")
    archive = (tmp_path / "adamw-s0" / "metrics.jsonl.xz").read_bytes()
    train(grid[0], tmp_path / "adamw-s0", resume=True)  # `train --resume` leaves an archived run alone
    assert (tmp_path / "adamw-s0" / "metrics.jsonl.xz").read_bytes() == archive
    run_sweep(cfg, tmp_path)
    assert not (tmp_path / "adamw-s0" / "metrics.jsonl").exists()  # not retrained
    assert is_finished(tmp_path / "adamw+qknorm-s0")  # retrained, its stale archive removed
    assert not (tmp_path / "adamw+qknorm-s0" / "metrics.jsonl.xz").exists()
    assert "`adamw`" in (tmp_path / "report.md").read_text()


def cli(*args, cwd=None):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "rankprobe.cli", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=300)


def overrides(corpus, cache, **extra):
    return [x for k, v in {**TINY, "data.corpus": str(corpus), "data.cache_dir": str(cache), **extra}.items()
            for x in (f"--{k}", v)]


@pytest.mark.slow
def test_cli_train_then_report(corpus_file, cache, tmp_path):
    out = tmp_path / "run"
    r = cli("train", "demo", "--out", str(out), *overrides(corpus_file, cache))
    assert r.returncode == 0, r.stderr
    assert (out / "metrics.jsonl").exists()
    first = (out / "metrics.jsonl").read_bytes()
    again = cli("train", "demo", "--out", str(out), *overrides(corpus_file, cache))
    assert again.returncode == 2 and "--force" in again.stderr
    assert (out / "metrics.jsonl").read_bytes() == first  # nothing overwritten
    r = cli("report", str(tmp_path), "--tap", "rope")
    assert r.returncode == 0, r.stderr
    assert "Headline tap: `rope`" in (tmp_path / "report.md").read_text()


@pytest.mark.parametrize("command", [[], ["demo"], ["train"], ["sweep"], ["report"]])
def test_help(command):
    r = cli(*command, "--help")
    assert r.returncode == 0 and "usage: rankprobe" in r.stdout
    if command in (["train"], ["sweep"]):
        assert "--model.n_layer" in r.stdout and "number of decoder blocks" in r.stdout


def _bad_inputs(tmp_path, corpus_file):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    binary = tmp_path / "blob.txt"
    binary.write_bytes(b"\x00\x01\x02" * 1000)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("Un café au lait, s'il vous plaît. ".encode("latin-1") * 200)
    small = tmp_path / "small.txt"
    small.write_text("A few words only.")
    a_file = tmp_path / "not-a-dir"
    a_file.write_text("x")
    return {
        "unknown key": (["--model.n_layers", "3"], "unknown config key model.n_layers; did you mean model.n_layer?"),
        "wrong type": (["--train.tokens", "lots"], "train.tokens must be an integer"),
        "out-of-range value": (["--train.checkpoint_minutes", "-1"], "train.checkpoint_minutes must be a number >= 0"),
        "missing corpus": (["--data.corpus", str(tmp_path / "nope.txt")], "nope.txt"),
        "empty corpus": (["--data.corpus", str(empty)], "empty"),
        "binary corpus": (["--data.corpus", str(binary)], "binary"),
        "non-UTF-8 corpus": (["--data.corpus", str(latin1)], "is not UTF-8: invalid byte 0xe9"),
        "corpus smaller than one batch": (["--data.corpus", str(small)], "one batch needs"),
        "unwritable output": (["--out", str(a_file / "sub")], "cannot write to output folder"),
    }


@pytest.mark.parametrize("case", ["unknown key", "wrong type", "out-of-range value", "missing corpus", "empty corpus",
                                  "binary corpus", "non-UTF-8 corpus", "corpus smaller than one batch",
                                  "unwritable output"])
@pytest.mark.parametrize("command", ["train", "sweep"])
def test_bad_input_is_one_line_and_exit_2(case, command, corpus_file, cache, tmp_path, capfd, caplog):
    """`rankprobe.cli.main` in this process (a process of its own per case costs ~2 s of imports; the
    refusals of real processes are checked in test_cli_train_then_report and the tests after it)."""
    args, needle = _bad_inputs(tmp_path, corpus_file)[case]
    base = overrides(corpus_file, cache, **{"data.vocab_size": "260"})
    if "--out" not in args:
        args = args + ["--out", str(tmp_path / "out")]
    caplog.set_level(logging.INFO)
    refused(capfd, [command, "demo", *base, *args], needle)
    # what a process of its own would also print on stderr: the CLI logs INFO and above there on rank 0
    assert not caplog.records, caplog.text


def test_report_on_a_folder_without_metrics(tmp_path):
    r = cli("report", str(tmp_path))
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_bf16_autocast_run_probes_in_float(corpus_file, cache, tmp_path):
    """The CUDA path's autocast, exercised on the CPU: every lens must cope with bf16 activations."""
    cfg = tiny_cfg(corpus_file, cache, **{"train.dtype": "bf16", "optim.name": "muon", "optim.qk_clip": "true"})
    path = train(cfg, tmp_path / "bf16")
    kinds = {r["kind"] for r in rows(path)}
    assert {"probe", "attn", "weights", "update", "end"} <= kinds
    attn = [r for r in rows(path, "attn")]
    assert all(r["max_logit"] is not None and 0 < r["entropy_norm"] <= 1 for r in attn)
    assert all(isinstance(r.get("qk_clipped"), int) for r in rows(path, "train"))


def test_tensorboard_mirror_holds_every_lens(corpus_file, cache, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    path = train(tiny_cfg(corpus_file, cache, **{"train.tensorboard": "true"}), tmp_path / "tb")
    acc = EventAccumulator(str(tmp_path / "tb" / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "eval/val_loss", "rankprobe/norm/k_pr/L00", "rankprobe/attn_entropy/L00",
            "rankprobe/Wk_stable_rank/L00", "rankprobe/k_rankme/L01"} <= tags
    logged = [r["loss"] for r in rows(path, "train")]
    assert [e.value for e in acc.Scalars("train/loss")] == pytest.approx(logged, rel=1e-6)


@pytest.mark.slow
def test_scan_trains_one_run_per_value_and_marks_the_best(corpus_file, cache, tmp_path):
    from rankprobe.cli import main
    from rankprobe.report.scan import scan_rows

    out = tmp_path / "scan"
    args = ["scan", "demo", "--param", "optim.lr", "--values", "1e-3,3e-2,1e39", "--out", str(out),
            "--workers", "2", *overrides(corpus_file, cache)]  # subprocesses, as `--gpus` runs them
    assert main(args) == 0
    paths = [out / f"optim.lr={v}" / "metrics.jsonl" for v in ("1e-3", "3e-2", "1e39")]
    got = scan_rows("optim.lr", paths)
    assert [r["status"] for r in got] == ["finished", "finished", "diverged"]
    lrs = [rows(p, "run")[0]["config"]["optim"]["lr"] for p in paths]
    assert lrs == [1e-3, 3e-2, 1e39]
    best = min(got[:2], key=lambda r: r["val_loss"])
    table = (out / "scan.md").read_text()
    assert f"| {best['value']} **(best)** | finished |" in table and "| 1e39 | diverged | 128 | – | – | – | – |" in table
    for r, p in zip(got[:2], paths[:2]):  # W_k's step: the mean of the run's own `update` rows of W_k
        steps = [u["update_rel"] for u in rows(p, "update") if u["matrix"] == "k"]
        assert steps and r["k_step"] == pytest.approx(sum(steps) / len(steps)) and f"{r['k_step']:.1e} |" in table
    before = [p.stat().st_mtime_ns for p in paths]
    assert main(args) == 0  # nothing to redo
    assert [p.stat().st_mtime_ns for p in paths] == before
    assert main(["scan", "demo", "--param", "optim.lrr", "--values", "1", "--out", str(out)]) == 2


@pytest.mark.slow
def test_regional_compile_trains_like_eager_with_qk_clip(corpus_file, cache, tmp_path):
    """train.compile = "regional" (Inductor on the CPU here) follows the eager run's losses, and QK-Clip's
    hooks still record inside the compiled blocks (its tracker raises if they record nothing)."""
    kw = {"optim.qk_clip": "true", "optim.qk_clip_tau": "2.0", "train.tokens": "1500"}
    losses = {}
    for mode in ("false", "regional"):
        path = train(tiny_cfg(corpus_file, cache, **{"train.compile": mode, **kw}), tmp_path / mode)
        losses[mode] = [r["loss"] for r in rows(path, "train")]
        assert rows(path, "end")[0]["status"] == "finished"
    assert len(losses["false"]) > 3
    np.testing.assert_allclose(losses["regional"], losses["false"], rtol=1e-4)


def test_step_clock_leaves_out_what_timing_booked_and_the_first_step():
    """step_time_s is the mean step over the stretch since the previous train row: the evals, probes
    and checkpoints booked in `timing` there, and the first step (compile), are not steps. A probe of
    0.5 s inside a stretch of five 10 ms steps would add 100 ms a step if it were counted."""
    import time

    from rankprobe.loop import StepClock, new_timing

    timing = new_timing()
    clock = StepClock(timing, 0)

    def phase(key: str, seconds: float) -> None:
        t0 = time.perf_counter()
        time.sleep(seconds)
        timing[key] += time.perf_counter() - t0

    phase("first_step_s", 0.2)  # step 1, compiling
    assert clock.lap(1) == pytest.approx(timing["first_step_s"])  # alone in its stretch: its own time
    for step in range(2, 7):
        time.sleep(0.01)
        if step == 4:
            phase("probe_s", 0.5)
    assert 0.01 <= clock.lap(6) < 0.06
    clock = StepClock(timing, 6)  # resumed at 6: the stretch 7..11 holds this process's first step
    phase("first_step_s", 0.2)
    for _ in range(4):
        time.sleep(0.01)
    assert 0.01 <= clock.lap(11) < 0.06  # 4 steps of 10 ms: counting the first step as one would give 8 ms

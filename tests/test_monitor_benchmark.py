"""benchmarks/monitor_overhead.py keeps working: its CPU smoke run times both loops with and without the
Monitor, at the steps that really produced rows, and splits each measured step into capture and statistics."""

import json
import runpy
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "monitor_overhead.py"


def test_monitor_overhead_smoke_times_both_loops_at_the_measured_steps(tmp_path):
    pytest.importorskip("transformers")
    out = tmp_path / "smoke.json"
    runpy.run_path(str(SCRIPT), run_name="bench")["main"](["--smoke", "--json", str(out)])
    R = json.loads(out.read_text())
    assert R["device"] == "cpu" and R["every"] == 2 and R["steps"] == 5
    hf, loop = R["hf"], R["loop"]
    for arm in (hf["without"], hf["train_forward"], hf["fixed_batch"], loop["without"], loop["train_forward"]):
        assert arm["steps"] == 5 and arm["median_step_s"] > 0
    assert hf["without"]["measured_at"] == loop["without"]["measured_at"] == []
    assert R["background"] == "auto" and hf["train_forward"]["background"] is loop["train_forward"]["background"] is False
    # from the training forward: the steps whose global_step is due; warm-up (step 0) left out
    assert hf["train_forward"]["measured_at"] == loop["train_forward"]["measured_at"] == [0, 2, 4]
    # the fixed batch is probed after global_step 2 and 4 (the ends of steps 1 and 3), and step 0 before training
    assert hf["fixed_batch"]["measured_at"] == [1, 3] and hf["fixed_batch"]["train_begin_s"] > 0
    for arm in (hf["train_forward"], hf["fixed_batch"], loop["train_forward"]):
        assert arm["measured_steps"] == 2 and "overhead_at_cadence" in arm
        assert arm["split"]["statistics_s"] > 0 and "capture_s" in arm["split"]
    for arm in (hf["train_forward"], loop["train_forward"]):
        assert set(arm["split"]) == {"capture_s", "statistics_s", "spectra_s", "attention_s", "weights_s"}
        assert arm["split"]["spectra_s"] > 0 and arm["split"]["weights_s"] > 0
    assert set(hf["fixed_batch"]["split"]) == {"capture_s", "statistics_s", "lenses_s", "weights_s"}
    assert hf["fixed_batch"]["split"]["statistics_s"] >= hf["fixed_batch"]["split"]["lenses_s"] > 0
    assert loop["fixed_batch_probe_s"] > 0 and loop["eager_step_s"] > 0 and loop["fixed_batch_probe_split"]["lenses_s"] > 0


def test_monitor_overhead_smoke_in_the_background_counts_the_waits_and_the_last_flush(tmp_path):
    """With --background on (the default on CUDA) the measured steps are still the steps that measured,
    though their rows come a measurement later; the split holds the wait for the previous host half and
    the arm the final flush."""
    out = tmp_path / "smoke.json"
    runpy.run_path(str(SCRIPT), run_name="bench")["main"](["--smoke", "--sections", "loop", "--background", "on",
                                                           "--json", str(out)])
    R = json.loads(out.read_text())
    arm = R["loop"]["train_forward"]
    assert R["background"] == "on" and arm["background"] is True and arm["measured_at"] == [0, 2, 4]
    assert set(arm["split"]) == {"capture_s", "statistics_s", "spectra_s", "attention_s", "weights_s", "wait_s"}
    assert arm["flush_s"] >= 0 and R["loop"]["fixed_batch_flush_s"] >= 0
    assert set(R["loop"]["fixed_batch_probe_split"]) == {"lenses_s", "weights_s", "wait_s"}


def test_monitor_overhead_smoke_with_the_fused_sums(tmp_path, monkeypatch):
    """--fused-sums on makes the hooks' moment sums the compiled ones (moments.FUSED), recorded in the
    results; the measured steps are the same."""
    from rankprobe.probes import moments

    monkeypatch.setattr(moments, "FUSED", moments.FUSED)  # the script sets the package's default: restore it
    monkeypatch.setattr(moments, "_fused_rows", {})
    out = tmp_path / "smoke.json"
    runpy.run_path(str(SCRIPT), run_name="bench")["main"](["--smoke", "--sections", "loop", "--fused-sums", "on",
                                                           "--json", str(out)])
    R = json.loads(out.read_text())
    assert R["fused_sums"] is True and R["loop"]["train_forward"]["measured_at"] == [0, 2, 4]
    assert {family[:2] for family in moments._fused_rows} == {(2, 32)}  # the tiny shape's taps (H, D)

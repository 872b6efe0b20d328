"""benchmarks/monitor_overhead.py keeps working: its CPU smoke run times both loops with and without the Monitor."""

import json
import runpy
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "monitor_overhead.py"


def test_monitor_overhead_smoke_times_both_loops(tmp_path):
    pytest.importorskip("transformers")
    out = tmp_path / "smoke.json"
    runpy.run_path(str(SCRIPT), run_name="bench")["main"](["--smoke", "--json", str(out)])
    R = json.loads(out.read_text())
    assert R["device"] == "cpu" and R["every"] == 2 and R["steps"] == 5
    for arm in (R["hf"]["without"], R["hf"]["train_forward"], R["hf"]["fixed_batch"], R["loop"]["without"],
                R["loop"]["train_forward"]):
        assert arm["steps"] == 5 and arm["median_step_s"] > 0
    assert R["hf"]["train_forward"]["measured_steps"] == R["loop"]["train_forward"]["measured_steps"] == 2
    assert "overhead_at_cadence" in R["loop"]["train_forward"] and R["loop"]["fixed_batch_probe_s"] > 0

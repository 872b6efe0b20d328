"""benchmarks/throughput.py keeps working: its CPU smoke run measures the training, optimizer and probe sections and renders them."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_throughput_smoke_measures_its_sections_and_renders(tmp_path):
    # `wide` and `recompile` rerun the same code at another shape, compiling again (~20 s of a cold CI
    # run): left to the GPU runs, which take every section. The compiled arms use the aot_eager backend:
    # Dynamo and AOTAutograd trace the same forward and backward graphs, without Inductor's C++ build of
    # two whole models (~30 s on 2 cores, cold); Inductor on the CPU is exercised on RankProbe's own
    # blocks by the regional-compile tests (test_model, test_end_to_end, test_distributed).
    out, md = tmp_path / "smoke.json", tmp_path / "bench.md"
    md.write_text("# kept\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "throughput.py"), "--smoke", "--json", str(out),
                          "--out", str(md), "--sections", "seed,opt,eager,probes", "--compile-backend", "aot_eager",
                          "--inductor", "coordinate_descent_tuning=False"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    R = json.loads(out.read_text())
    assert not R["skipped"] and R["env"]["inductor"] == {"coordinate_descent_tuning": False}
    arms = {(r["impl"], r["mode"], r["optimizer"]) for r in R["train"]}
    for impl in ("rankprobe", "hf"):
        for mode in ("compile", "eager"):
            assert {(impl, mode, o) for o in ("adamw", "muon", "torch-muon")} <= arms
    assert all(r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1 for r in R["train"])
    assert {r["optimizer"] for r in R["opt"]} >= {"muon (RankProbe, shape-batched)", "torch.optim.Muon"}
    P = R["probe"]
    assert all(P[k] > 0 for k in ("probe_pr_s", "probe_spectra_s", "probe_activations_s", "weights_whole_s",
                                  "weights_s", "lenses_s", "eval_s", "weights_start_s", "weights_host_s", "loop_s",
                                  "checkpoint_s",
                                  "attn_fused_s", "attn_reference_s"))
    parts = {"forward", "moment_sums", "attention", "head_batch", "transfer", "host_spectra", "mechanism", "rows"}
    assert set(P["parts"]) == parts and all(v >= 0 for v in P["parts"].values())
    assert "1" in P["token_blocks"] and all(v > 0 for v in P["token_blocks"].values())
    # eager against fused moment_sums on every tap shape: the fused form compiled (Inductor's C++ on the
    # CPU) and equal to the eager passes to float64 round-off
    F = P["moment_sums_fused"]
    assert F["shapes"] and all(r["calls"] > 0 and r["eager_s"] > 0 and r["fused_s"] > 0 and r["max_rel_diff"] < 1e-13
                               for r in F["shapes"])
    assert F["eager_s"] == pytest.approx(sum(r["eager_s"] for r in F["shapes"])) and F["default_fused"] is None
    # the probe section's Prober runs its host halves on its worker, as on a GPU, and is profiled before
    # it closes: probing a closed Prober killed the H200 run after its JSON was written (issue 13)
    assert "the training loop's probe work at one checkpoint, smoke" in R["profiles"]
    text = md.read_text()
    assert text.startswith("# kept\n")  # the hand-written part above the marker is kept
    assert "### Probes and eval at one checkpoint" in text and "its parts:" in text and "by component" in text
    assert "blocks C" in text
    assert "eager passes against the fused form" in text
    rendered = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "throughput.py"), "--render", str(out),
                               "--out", str(tmp_path / "again.md")], capture_output=True, text=True, env=env)
    assert rendered.returncode == 0, rendered.stderr[-2000:]
    assert (tmp_path / "again.md").read_text().split("Command:")[1] == text.split("Command:")[1]


def test_throughput_inductor_settings_are_applied_and_checked(monkeypatch):
    """--inductor KEY=VALUE sets torch._inductor.config before anything compiles (to compare settings
    side by side on a card); an unknown key or a value that is no literal stops it in one line."""
    import runpy

    import torch._inductor.config as inductor_config

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # its sibling modules, as when run as a script
    set_inductor = runpy.run_path(str(ROOT / "benchmarks" / "throughput.py"), run_name="bench")["set_inductor"]
    before = inductor_config.coordinate_descent_tuning
    with inductor_config.patch(coordinate_descent_tuning=before):  # restored on exit
        assert set_inductor([f"coordinate_descent_tuning={not before}"]) == {"coordinate_descent_tuning": not before}
        assert inductor_config.coordinate_descent_tuning is (not before)
    assert inductor_config.coordinate_descent_tuning is before
    for bad, says in (("no_such_setting=1", "KEY a torch._inductor.config setting"),
                      ("coordinate_descent_tuning", "KEY=VALUE"), ("coordinate_descent_tuning=yes please", "literal")):
        with pytest.raises(SystemExit, match=says):
            set_inductor([bad])

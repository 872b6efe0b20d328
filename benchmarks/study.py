"""The 4-arm study's wall time on one GPU with K arms at a time (issue 13, target 2), from empty caches.

For each K this runs `rankprobe sweep seed-22l --gpus 1 --per-gpu K` as a user would (the CLI in a
subprocess, every default) with empty Inductor, Triton and token caches of its own, and records:
  - the sweep's wall time from start to report, and the sweep's own time around its workers: before the
    first worker starts (reading the corpus, training the tokenizer, tokenising) and after the last one
    ends (the report);
  - the GPU's utilisation and memory in use, sampled by nvidia-smi twice a second (mean, share of
    samples under 50%, peak memory, and one value a second);
  - per arm: when its worker started and ended (seconds after the sweep started, from the sweep's log
    lines as they arrive), the worker's time outside its run's clock (Python, imports, the CUDA
    context), its `end` row's phases (set-up, first step, evals, probes, checkpoints, the
    wait for the weights worker), its training tokens/s (shared with the other arms when K > 1), and
    what it computed (final validation loss, mean key PR at each tap), to compare across K.
On the CPU (--smoke) it runs the tiny `demo` grid with `--workers K` instead.

    PYTHONPATH=src python benchmarks/study.py --per-gpu 1 --json study.json -- --data.corpus /tmp/c/text
    PYTHONPATH=src python benchmarks/study.py --per-gpu 2,3 --json study.json -- --data.corpus /tmp/c/text
    PYTHONPATH=src python benchmarks/study.py --smoke --per-gpu 2 --json smoke.json   # CPU check, ~1 min
    PYTHONPATH=src python benchmarks/study.py --render study.json

Each K of seed-22l takes 5-8 minutes on an H200: run them as separate commands if a command's time is
limited; --json merges each K into the file. Arguments after `--` go to `rankprobe sweep` (overrides).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from rankprobe.runfolder import METRICS, PHASE_FIELDS, end_of, header, read_rows  # noqa: E402

SMOKE = {  # the demo grid (4 arms), a few seconds an arm on the CPU
    "model.n_layer": "2", "model.d_model": "64", "model.n_head": "2", "model.head_dim": "16", "model.seq_len": "32",
    "data.vocab_size": "300", "train.tokens": "3000", "train.batch_size": "4",
    "train.eval_tokens": "256", "probe.tokens": "256", "probe.n_checkpoints": "3",
}
STARTED = re.compile(r"\[\d+/\d+\] training (\S+) on ")
ENDED = re.compile(r"^(\S+) (finished|diverged|failed)")


def sweep_command(config: str, k: int, out: Path, cache: Path, smoke: bool, extra: list[str]) -> list[str]:
    parallel = ["--workers", str(k)] if smoke else ["--gpus", "1", "--per-gpu", str(k)]
    overrides = [x for key, v in SMOKE.items() for x in (f"--{key}", v)] if smoke else []
    return [sys.executable, "-m", "rankprobe.cli", "sweep", config, "--out", str(out), *parallel,
            "--data.cache_dir", str(cache), "--train.progress", "false", *overrides, *extra]


class GpuSampler:
    """`nvidia-smi` in the background, twice a second: the GPU's utilisation (the share of time a kernel
    ran) and memory in use, to see the idle gaps K arms fill and how much memory they take together.
    Does nothing where there is no nvidia-smi (the CPU smoke run)."""

    def __init__(self, gpu: str):
        exe = shutil.which("nvidia-smi")
        self.proc = None if exe is None else subprocess.Popen(
            [exe, "-i", gpu, "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits",
             "-lms", "500"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)

    def stop(self) -> dict:
        if self.proc is None:
            return {}
        self.proc.terminate()
        out, _ = self.proc.communicate()
        samples = [tuple(float(x) for x in line.split(",")) for line in out.splitlines()
                   if re.fullmatch(r"\s*[\d.]+\s*,\s*[\d.]+\s*", line)]
        if not samples:
            return {}
        util = [u for u, _ in samples]
        return {"samples": len(samples), "util_mean_pct": round(sum(util) / len(util), 1),
                "idle_share": round(sum(u < 50 for u in util) / len(util), 3),
                "memory_peak_gib": round(max(m for _, m in samples) / 1024, 1),
                "util_pct_each_s": [round(sum(util[i:i + 2]) / len(util[i:i + 2])) for i in range(0, len(util), 2)]}


def run_one(config: str, k: int, work: Path, smoke: bool, extra: list[str]) -> dict:
    """One sweep from empty caches; its wall time, its log's events and every arm's end row."""
    for name in ("inductor", "triton", "tokens", "sweep"):
        shutil.rmtree(work / name, ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
           "TORCHINDUCTOR_CACHE_DIR": str(work / "inductor"), "TRITON_CACHE_DIR": str(work / "triton")}
    cmd = sweep_command(config, k, work / "sweep", work / "tokens", smoke, extra)
    events: dict[str, dict] = {}
    tail: list[str] = []
    gpu = GpuSampler((os.environ.get("CUDA_VISIBLE_DEVICES") or "0").split(",")[0]) if not smoke else None
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:  # the sweep logs each worker's start and end as it happens
        now = time.perf_counter() - t0
        tail = (tail + [line.rstrip()])[-20:]
        if m := STARTED.search(line):
            events.setdefault(m.group(1), {})["start_s"] = round(now, 1)
        elif m := ENDED.search(line):
            events.setdefault(m.group(1), {})["end_s"] = round(now, 1)
    rc = proc.wait()
    wall = time.perf_counter() - t0
    device = gpu.stop() if gpu else {}
    if rc != 0:
        print("\n".join(tail), file=sys.stderr)
    arms = {}
    for folder in sorted(p for p in (work / "sweep").iterdir() if (p / METRICS).is_file()):
        arm = {**events.get(folder.name, {}), **arm_summary(read_rows(folder / METRICS))}
        if arm.get("end_s") is not None and arm.get("start_s") is not None and arm["wall_s"] is not None:
            # the worker's time outside its run's clock: starting Python, importing, the CUDA context
            arm["outside_run_s"] = round(arm["end_s"] - arm["start_s"] - arm["wall_s"], 1)
        arms[folder.name] = arm
    starts = [a["start_s"] for a in arms.values() if "start_s" in a]
    ends = [a["end_s"] for a in arms.values() if "end_s" in a]
    run_row = header(read_rows(work / "sweep" / next(iter(arms)) / METRICS)) if arms else None
    return {"k": k, "exit": rc, "wall_s": round(wall, 1), "command": " ".join(cmd[1:]),
            "before_first_arm_s": min(starts, default=None),
            "after_last_arm_s": round(wall - max(ends), 1) if ends else None,
            "env": (run_row or {}).get("env", {}), "gpu": device,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "arms": arms}


def arm_summary(rows: list[dict]) -> dict:
    """An arm's end row (its phases), training tokens/s and what it computed."""
    end, head = end_of(rows) or {}, header(rows) or {}
    out = {k: end.get(k) for k in ("status", "wall_s", *PHASE_FIELDS, "probe_wait_s")}
    if end.get("status") == "finished":
        busy = sum(end.get(k) or 0.0 for k in PHASE_FIELDS)
        step = head["config"]["train"]["batch_size"] * head["config"]["model"]["seq_len"]
        out["train_tokens_per_s"] = round((end["tokens"] - step) / max(end["wall_s"] - busy, 1e-9))
    evals = [r for r in rows if r["kind"] == "eval"]
    out["final_val_loss"] = evals[-1]["val_loss"] if evals else None
    last = max((r["step"] for r in rows if r["kind"] == "probe"), default=None)
    prs: dict[str, list[float]] = {}
    for r in rows:
        if r["kind"] == "probe" and r["step"] == last and r["tensor"] == "k" and r["pr"] is not None:
            prs.setdefault(r["tap"], []).append(r["pr"])
    out["final_key_pr"] = {tap: sum(v) / len(v) for tap, v in prs.items()}
    return out


def render(results: dict) -> str:
    """Markdown: one line per K, then each K's arms."""
    fmt = lambda v, d=1, unit="": "–" if v is None else f"{v:,.{d}f}{unit}"  # noqa: E731
    runs = [results[k] for k in sorted(results, key=int)]
    lines = ["| K (arms at a time) | sweep wall | before the first arm | after the last arm | arms' walls, summed | "
             "GPU busy (mean) | samples under 50% | GPU memory peak |", "|---|---|---|---|---|---|---|---|"]
    for r in runs:
        summed = sum(a.get("wall_s") or 0.0 for a in r["arms"].values())
        failed = "" if r["exit"] == 0 else f" (exit {r['exit']})"
        g = r.get("gpu") or {}
        lines.append(f"| {r['k']} | **{fmt(r['wall_s'])} s**{failed} | "
                     f"{fmt(r['before_first_arm_s'])} s | {fmt(r['after_last_arm_s'])} s | {fmt(summed)} s | "
                     f"{fmt(g.get('util_mean_pct'), 0, '%')} | {fmt(100 * g['idle_share'] if g else None, 0, '%')} | "
                     f"{fmt(g.get('memory_peak_gib'), 1, ' GiB')} |")
    for r in runs:
        lines += ["", f"K = {r['k']}: `{r['command']}` ({r['env'].get('device', '?')}, torch "
                      f"{r['env'].get('torch', '?')}, git {str(r['env'].get('git_sha'))[:7]}, {r['date']})", "",
                  "| arm | start | end | wall | outside it | set-up | first step | evals | probes (waiting) | "
                  "training tok/s | val loss | key PR |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for name, a in r["arms"].items():
            pr = " / ".join(f"{v:.2f}" for v in a["final_key_pr"].values()) or "–"
            lines.append(f"| {name} | {fmt(a.get('start_s'))} | {fmt(a.get('end_s'))} | {fmt(a['wall_s'])} | "
                         f"{fmt(a.get('outside_run_s'))} | {fmt(a['setup_s'])} | {fmt(a['first_step_s'])} | "
                         f"{fmt(a['eval_s'])} | "
                         f"{fmt(a['probe_s'])} ({fmt(a['probe_wait_s'])}) | {fmt(a.get('train_tokens_per_s'), 0)} | "
                         f"{fmt(a['final_val_loss'], 4)} | {pr} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--per-gpu", default="1,2,3", help="comma list of K, arms at a time on the GPU (default: 1,2,3)")
    ap.add_argument("--config", default="", help="preset or TOML (default: seed-22l; demo with --smoke)")
    ap.add_argument("--smoke", action="store_true", help="the tiny demo grid on the CPU, --workers K")
    ap.add_argument("--json", default="", help="merge each K's results into this file")
    ap.add_argument("--work", default="", help="folder for the sweeps and their caches (default: a temporary one, "
                                               "removed afterwards)")
    ap.add_argument("--render", default="", help="only print the Markdown of a --json file")
    args = ap.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    if args.render:
        print(render(json.loads(Path(args.render).read_text())), end="")
        return 0
    config = args.config or ("demo" if args.smoke else "seed-22l")
    results = json.loads(Path(args.json).read_text()) if args.json and Path(args.json).exists() else {}
    if not isinstance(results, dict) or not all(k.isdigit() for k in results):
        ap.error(f"{args.json} is not a results file of this script; give another --json")
    work = Path(args.work or tempfile.mkdtemp(prefix="rankprobe-study-"))
    try:
        for k in [int(v) for v in args.per_gpu.split(",") if v.strip()]:
            results[str(k)] = run_one(config, k, work, args.smoke, extra)
            print(f"K = {k}: {results[str(k)]['wall_s']} s (exit {results[str(k)]['exit']})", file=sys.stderr)
            if args.json:
                Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    print(render(results), end="")
    return max(r["exit"] for r in results.values())


if __name__ == "__main__":
    sys.exit(main())

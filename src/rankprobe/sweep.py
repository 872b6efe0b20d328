"""The grid of arms: optimizers × QK-Norm × seeds, one run directory each, ended arms skipped.

Re-running a sweep on its folder is safe: arms that ended (finished or diverged) are not touched, an
arm that was cut off resumes from its checkpoint (or starts over if it has none), and the folder is
locked so that a second sweep on it stops at once instead of interleaving writes.

With `workers` > 0 the arms (or a scan's runs) run in parallel, one subprocess each (`rankprobe _arm`, the same
`train` with `--resume`), at most `workers` at a time; with `gpus` = N the workers are spread round-robin
over N GPUs through CUDA_VISIBLE_DEVICES, `workers / N` of them on each (`--gpus N --per-gpu K`). Several
arms on one GPU hide each other's set-up, compiling and host work behind training, and the sweep first
checks that they fit in its memory together. The parent tokenises the corpus once before launching (the
workers find the token cache); an arm whose compiled graph another worker is still compiling starts
only when that worker has taken its first step, so it finds the graph in Inductor's on-disk cache
(shared by every process of the user) instead of compiling it a second time. The parent holds the
sweep folder's lock throughout, writes each worker's output to `OUT/logs/<arm>.log`, lets a failing arm
fail alone and builds the report when all have ended. Workers share nothing else: each arm computes
exactly what it computes alone (tests/test_sweep_parallel.py).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from .checkpoint import config_differences
from .config import Config, arm_label, parse_arm, to_dict
from .errors import ConfigError, FolderError, MetricsError, UserError
from .data.tokens import prepare
from .runfolder import (CHECKPOINT, ENDED, EXIT_DIVERGED, METRICS, ensure_writable, first_missing, folder_lock,
                        header, metrics_file, parse_rows, remove_unused, run_rows, safe_name, status_of)
from .train import device_memory, preflight, train

log = logging.getLogger(__name__)


def arms(cfg: Config) -> list[Config]:
    """One resolved Config per (arm, seed), named '<arm>-s<seed>'. The arms are `sweep.arms` when
    given (e.g. a fifth arm 'muon+qkclip'), else the optimizers × qk_norm grid. `sweep.settings` then
    sets each arm's own keys: those of its optimizer, then of its label without the @variant, then of
    its whole label (each overriding the one before), validated like any override."""
    labels = cfg.sweep.arms or [arm_label(o, q) for o in cfg.sweep.optimizers for q in cfg.sweep.qk_norm]
    out = []
    for label in labels:
        opt, qk_norm, qk_clip = parse_arm(label)
        base = replace(cfg, optim=replace(cfg.optim, name=opt, qk_clip=qk_clip),
                       model=replace(cfg.model, qk_norm=qk_norm))
        arm = with_settings(base, label)
        for seed in cfg.sweep.seeds:
            out.append(replace(arm, name=f"{label}-s{seed}", arm=label, train=replace(arm.train, seed=seed)))
    return out


def with_settings(cfg: Config, label: str, keep: dict[str, str] | None = None) -> Config:
    """`cfg` with `sweep.settings` of arm `label` applied: those of its optimizer, then of its label
    without the @variant, then of its whole label (each overriding the one before), validated like any
    override; then `keep` (a command line's overrides, which win over the settings)."""
    from .config import apply_overrides, from_dict

    if not cfg.sweep.settings:
        return cfg
    data = to_dict(cfg)
    for key in dict.fromkeys((cfg.optim.name, label.partition("@")[0], label)):
        apply_overrides(data, cfg.sweep.settings.get(key, {}))
    apply_overrides(data, keep or {})
    return from_dict(data)


def is_finished(run_dir: Path) -> bool:
    """A run has ended (finished or diverged): runfolder.status_of its metrics, archived or not."""
    return status_of(run_rows(run_dir)) in ENDED


def check_arm_folders(grid: list[Config], out_dir: Path) -> None:
    """Refuse to mix runs of different settings in one sweep folder: an arm folder whose run was made
    with other settings would otherwise be skipped as done, or resumed under the wrong config."""
    for a in grid:
        head = header(run_rows(out_dir / a.name))
        if head is None or not isinstance(head.get("config"), dict):
            continue
        diffs = config_differences(head["config"], to_dict(a))
        if diffs:
            key, old, new = diffs[0]
            raise UserError(f"{out_dir / a.name} holds a run made with other settings ({key}: {old!r} there, "
                            f"{new!r} now); use another --out, or --force to replace its runs")


def _still_to_run(grid: list[Config], out_dir: Path, force: bool) -> list[Config]:
    """The runs of `grid` that have not ended under `out_dir` (all of them with `force`)."""
    if not force:
        check_arm_folders(grid, out_dir)
    todo = [a for a in grid if force or not is_finished(out_dir / a.name)]
    for a in grid:
        if a not in todo:
            log.info("skip %s: already ended", a.name)
    return todo


def _data_key(a: Config) -> str:
    """What a run's token data depends on: runs with one key share it (every arm of a sweep); a scan over
    a data.* key, the sequence length or the batch size has one per value."""
    return repr((a.data, a.model.seq_len, a.train.batch_size))


def _train_in_turn(todo: list[Config], out_dir: Path, force: bool) -> None:
    """Train `todo` one after another in this process, preparing each run's data once for the runs in a
    row that share it (and holding one corpus at a time)."""
    key, data = None, None
    for i, a in enumerate(todo):
        if _data_key(a) != key:
            key, data = _data_key(a), None  # drop the previous corpus before reading the next
            data = prepare(a.data, a.model.seq_len, a.train.batch_size)
        log.info("[%d/%d] training %s", i + 1, len(todo), a.name)
        train(a, out_dir / a.name, data=data, force=force, resume=not force)


def _train_grid(cfg: Config, grid: list[Config], out_dir: Path, force: bool, workers: int,
                gpus: int) -> list[tuple[str, int, Path]]:
    """Train the runs of `grid` not yet ended under `out_dir` (the caller holds its lock): in turn in
    this process, or `workers` at a time in subprocesses (spread over `gpus` GPUs if any). Returns the
    subprocess runs that failed."""
    from .optim.hidden import check

    for c in grid:  # a class that does not import or a misspelt optim.kwargs fails before any run starts
        check(c.optim)
    todo = _still_to_run(grid, out_dir, force)
    if not workers:
        _train_in_turn(todo, out_dir, force)
        return []
    for a in {_data_key(a): a for a in todo}.values():  # the workers find the caches
        prepare(a.data, a.model.seq_len, a.train.batch_size)
    return _run_parallel(todo, out_dir, workers, gpus, force)


@contextmanager
def _sweep_folder(grid: list[Config], out_dir: Path, workers: int = 0, gpus: int = 0) -> Iterator[None]:
    """Check every run of `grid` could start (device, memory; `workers / gpus` of them at once on one
    GPU), then create and lock `out_dir` for the block; if the block fails before anything was written
    there, a folder this created is removed."""
    names = [c.name for c in grid]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise UserError(f"two runs of this grid would share the folder {twice[0]}; list each arm and value once")
    single = metrics_file(out_dir)
    if single is not None:  # its arms would train inside another run's folder, and the report then refuse the mix
        raise FolderError(f"{out_dir} holds a single run ({single.name}); a sweep or scan puts one folder per "
                          "run under its --out: use another folder")
    for c in grid:
        preflight(c)
    per_gpu = -(-workers // gpus) if gpus else 1
    if per_gpu > 1:
        import torch

        check_fit(grid, per_gpu, min(device_memory(torch.device("cuda", i)) for i in range(gpus)))
    created = first_missing(out_dir)
    try:
        ensure_writable(out_dir)
        with folder_lock(out_dir):
            yield
    except BaseException:
        if created is not None:
            remove_unused(out_dir, created)
        raise


class ArmsFailed(Exception):
    """Some arms of a parallel sweep exited with an error (the others ran and the report was built):
    `failures` holds (arm name, exit code, log path)."""

    def __init__(self, failures: list[tuple[str, int, Path]]):
        super().__init__(f"{len(failures)} arm(s) failed")
        self.failures = failures


def run_sweep(cfg: Config, out_dir: Path, report: bool = True, force: bool = False, workers: int = 0,
              gpus: int = 0) -> list[Path]:
    """Train every arm not already ended under `out_dir`, then build the report there. `force`
    retrains every arm from scratch. `workers` > 0: that many arms at a time in subprocesses, spread
    round-robin over `gpus` GPUs if `gpus` > 0 (several on one GPU when `workers` > `gpus`); ArmsFailed
    after the report if any of them failed."""
    out_dir = Path(out_dir)
    grid = arms(cfg)
    with _sweep_folder(grid, out_dir, workers, gpus):
        failures = _train_grid(cfg, grid, out_dir, force, workers, gpus)
        paths = [out_dir / a.name / METRICS for a in grid]
        if report and (not failures or any(p.exists() for p in paths)):
            from .report import build_report

            build_report(out_dir)
    if failures:
        raise ArmsFailed(failures)
    return paths


# ---------------------------------------------------------------------------------------------
# arms in parallel subprocesses

_LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR",
                  "MASTER_PORT", "TORCHELASTIC_RUN_ID")

CONTEXT_BYTES = 1 << 30  # a process's CUDA context, cuBLAS workspace and compiled kernels, roughly
ALLOCATOR_SLACK = 1.2  # what PyTorch's caching allocator holds beyond the peak it hands out


def arm_bytes(cfg: Config) -> int:
    """Rough GPU memory of one training process of `cfg`: weights, gradients and optimizer state
    (model.state_bytes), the activations a step keeps for its backward, the logits, the allocator's
    slack and the CUDA context. Per token and layer the backward keeps both norms' inputs and outputs,
    q, k, v and the attention output, and SwiGLU's gate, up and product: 4·d + 2·d_q + 2·d_kv + 3·hidden
    values in the autocast dtype. At seed-22l (batch 32 × 1,024) the training part comes to 20.5 GiB
    against 21.5 GiB measured at the benchmark's peak (BENCHMARKS.md); the slack covers the rest and
    the eager probe passes."""
    import math

    from .model import state_bytes

    m, B, T = cfg.model, cfg.train.batch_size, cfg.model.seq_len
    hidden = m.mlp_hidden or 64 * math.ceil(8 * m.d_model / 3 / 64)
    d_q, d_kv = m.n_head * m.head_dim, (m.n_kv_head or m.n_head) * m.head_dim
    width = 2 if cfg.train.dtype in ("auto", "bf16") else 4  # "auto" is bf16 autocast on a GPU
    per_token = m.n_layer * (4 * m.d_model + 2 * d_q + 2 * d_kv + 3 * hidden) * width
    logits = (m.vocab_size or cfg.data.vocab_size) * (width + 4)  # the logits and their fp32 gradient
    return int(ALLOCATOR_SLACK * (state_bytes(cfg) + B * T * (per_token + logits))) + CONTEXT_BYTES


def check_fit(grid: list[Config], per_gpu: int, have: int) -> None:
    """Refuse `per_gpu` runs of `grid` at once on a GPU of `have` bytes when the largest `per_gpu` of them
    would not fit together (unless every run sets train.allow_large)."""
    sizes = sorted((arm_bytes(c) for c in grid), reverse=True)
    need = sum(sizes[:per_gpu])
    if need <= have or all(c.train.allow_large for c in grid):
        return
    fit = max(1, sum(1 for i in range(1, per_gpu + 1) if sum(sizes[:i]) <= have))
    raise ConfigError(f"--per-gpu {per_gpu}: {min(per_gpu, len(sizes))} runs at once need about {need / 2**30:,.0f} "
                      f"GiB of GPU memory, more than the {have / 2**30:,.0f} GiB of one GPU here; use --per-gpu "
                      f"{fit}, or pass --train.allow_large true to try anyway")


def graph_key(a: Config, gpus: int) -> str | None:
    """What a run's compiled training graph depends on: runs with one key share Inductor's cache entries
    (the optimizer is not compiled, so AdamW and Muon arms share theirs). None when the run does not
    compile ("auto" compiles only on a GPU: rankprobe.loop.compile_mode)."""
    if a.train.compile == "false" or (a.train.compile == "auto" and not gpus):
        return None
    return repr((a.model, a.optim.qk_clip, a.train.batch_size, a.train.dtype, a.train.compile))


def _worker_env(slot: int, workers: int, gpus: int) -> dict[str, str]:
    """The parent's environment for worker `slot`: pinned to GPU `slot % gpus` of the parent's visible
    ones when `gpus` (so each GPU holds `workers / gpus` slots), and the host's cores shared out so
    that the workers' CPU threads do not oversubscribe them."""
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_VARS}
    if gpus:
        visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
        gpu = slot % gpus
        env["CUDA_VISIBLE_DEVICES"] = visible[gpu] if gpu < len(visible) else str(gpu)
    if not gpus or workers > gpus:
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))
    return env


class FirstStep:
    """Whether a worker's run has taken its first training step, read from its metrics file: a `train` row
    past `after` in a file the worker has written to. A resumed run cuts the file back to its checkpoint
    and then logs the steps after it, so `after` is the last step the file held when the worker started
    (a few rows are redone before the wait ends); a fresh run starts the file over, so `after` is 0."""

    def __init__(self, run_dir: Path, key: str, fresh: bool):
        self.key, self.path, self.after = key, run_dir / METRICS, 0
        self.old = self._stamp()  # the file as the worker found it
        if not fresh and (run_dir / CHECKPOINT).exists():  # a run without a checkpoint starts over
            try:
                self.after = max((r["step"] for r in run_rows(run_dir) if r["kind"] == "train"), default=0)
            except MetricsError:
                pass  # the worker will refuse the folder and exit, which also ends the wait

    def _stamp(self) -> tuple[int, int, int] | None:
        try:
            st = self.path.stat()
        except OSError:
            return None
        return st.st_ino, st.st_size, st.st_mtime_ns

    def done(self) -> bool:
        stamp = self._stamp()
        if stamp is None or stamp == self.old:
            return False  # not written to yet
        try:
            data = self.path.read_bytes()
            rows = parse_rows(data[:data.rfind(b"\n") + 1], self.path)  # whole lines only
        except OSError:
            return False
        except (MetricsError, UnicodeDecodeError):
            return True  # nothing to wait for: the run will fail on its own
        return any(r["kind"] == "train" and r["step"] > self.after for r in rows)


def next_arm(pending: list[Config], warming: set[str], gpus: int) -> int | None:
    """Index in `pending` of the next run to start: the first whose compiled graph no running worker is
    still compiling (`warming`); None while every pending run waits for one."""
    return next((i for i, a in enumerate(pending) if graph_key(a, gpus) not in warming), None)


def _run_parallel(todo: list[Config], out_dir: Path, workers: int, gpus: int,
                  force: bool) -> list[tuple[str, int, Path]]:
    """Run `todo` as subprocesses, at most `workers` at once, in `todo`'s order except that a run waits
    while another worker compiles its graph; returns the runs that failed (exit code other than 0 or
    diverged), after every run has ended."""
    logs = out_dir / "logs"
    if logs.is_symlink():
        raise FolderError(f"{logs} is a link; RankProbe writes its workers' logs only into a folder of its own")
    logs.mkdir(exist_ok=True)
    pending, running, failures, warming = list(todo), {}, [], {}
    free = list(range(workers))
    try:
        while pending or running:
            while free and (i := next_arm(pending, {w.key for w in warming.values()}, gpus)) is not None:
                slot, a = free.pop(0), pending.pop(i)
                env = _worker_env(slot, workers, gpus)
                key = graph_key(a, gpus)
                if key is not None:  # read before the worker starts the file over
                    warming[slot] = FirstStep(out_dir / a.name, key, fresh=force)
                running[slot] = _launch(a, out_dir, logs / f"{a.name}.log", env, force)
                where = f"GPU {env['CUDA_VISIBLE_DEVICES']}" if gpus else f"worker {slot}"
                log.info("[%d/%d] training %s on %s (log: %s)", len(todo) - len(pending), len(todo), a.name,
                         where, running[slot][2])
            time.sleep(0.2)
            for slot, first in list(warming.items()):
                if first.done():
                    del warming[slot]
            for slot, (proc, a, log_path) in list(running.items()):
                rc = proc.poll()
                if rc is None:
                    continue
                del running[slot]
                warming.pop(slot, None)
                free.append(slot)
                if rc in (0, EXIT_DIVERGED):
                    log.info("%s %s", a.name, "finished" if rc == 0 else "diverged (recorded)")
                else:
                    failures.append((a.name, rc, log_path))
                    log.warning("%s failed with exit code %d: %s", a.name, rc, _last_line(log_path))
    finally:  # interrupted: stop the workers this sweep started, each by its own handle
        for proc, _, _ in running.values():
            proc.terminate()
        for proc, _, _ in running.values():
            proc.wait()
    return failures


def _launch(a: Config, out_dir: Path, log_path: Path, env: dict[str, str],
            force: bool) -> tuple[subprocess.Popen, Config, Path]:
    """Start one arm's worker (`rankprobe _arm`), its resolved config handed over on stdin (no temporary
    file to leave behind), its output into `log_path` (opened without following a planted link). The
    worker asks the kernel to stop it when this process dies (die_with_parent), so a killed sweep
    leaves no orphans holding run folders' locks."""
    cmd = [sys.executable, "-m", "rankprobe.cli", "_arm", "-", "--out", str(out_dir / a.name),
           "--force" if force else "--resume"]
    try:
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
    except OSError as e:
        raise FolderError(f"cannot write log {log_path}: {e.strerror or e}") from None
    with os.fdopen(fd, "wb") as f:  # the child holds its own descriptor
        proc = subprocess.Popen(cmd, env={**env, _PARENT: str(os.getpid())}, stdin=subprocess.PIPE, stdout=f,
                                stderr=subprocess.STDOUT)
    with proc.stdin:
        proc.stdin.write(json.dumps(to_dict(a)).encode())
    return proc, a, log_path


_PARENT = "RANKPROBE_SWEEP_PID"


def die_with_parent() -> None:
    """In an arm worker: have Linux send SIGTERM when the sweep that started it dies (even by SIGKILL),
    and stop at once if it is already gone. Elsewhere (no prctl) the sweep's own cleanup is all there is."""
    parent = os.environ.get(_PARENT, "")
    if not parent.isdigit() or not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != int(parent):  # the sweep died before the request took effect
        raise SystemExit(143)


def _last_line(path: Path) -> str:
    try:
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return lines[-1] if lines else ""


# ---------------------------------------------------------------------------------------------
# a one-key scan (learning rates before a study)


def scan_configs(cfg: Config, param: str, values: list[str]) -> list[Config]:
    """One Config per value of the dotted key `param`, named '<param>=<value>', validated like any
    override (so a typo in the key or a bad value fails before anything runs)."""
    from .config import apply_overrides, from_dict

    if not values:
        raise UserError("scan needs at least one value (--values 1e-3,3e-3,1e-2)")
    if param in ("name", "arm", "out") or param.startswith("sweep."):  # identical runs, read as an effect of none
        raise ConfigError(f"--param {param}: a single run does not read it, so every run of the scan would be the "
                          "same (scan train.seed for seeds)")
    out = []
    for value in values:
        data = apply_overrides(to_dict(cfg), {param: value})
        data["name"] = safe_name(f"{param}={value}")  # a value such as ../x must not reach outside out_dir
        out.append(from_dict(data))
    return out


def run_scan(cfg: Config, out_dir: Path, param: str, values: list[str], force: bool = False, workers: int = 0,
             gpus: int = 0) -> Path:
    """Train one run per value of `param` into `out_dir/<param>=<value>/` (ended runs are skipped, cut
    off ones resumed, `workers` at a time, as in a sweep), then write `out_dir/scan.md`; returns its
    path. ArmsFailed after scan.md if some subprocess runs failed."""
    from .report.scan import write_scan

    out_dir = Path(out_dir)
    grid = scan_configs(cfg, param, values)
    with _sweep_folder(grid, out_dir, workers, gpus):
        failures = _train_grid(cfg, grid, out_dir, force, workers, gpus)
        path = write_scan(out_dir, param, [out_dir / c.name / METRICS for c in grid])
    if failures:
        raise ArmsFailed(failures)
    return path

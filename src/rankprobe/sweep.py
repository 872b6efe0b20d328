"""The grid of arms: optimizers × QK-Norm × seeds, one run directory each, ended arms skipped.

Re-running a sweep on its folder is safe: arms that ended (finished or diverged) are not touched, an
arm that was cut off resumes from its checkpoint (or starts over if it has none), and the folder is
locked so that a second sweep on it stops at once instead of interleaving writes.

With `workers` > 0 the arms (or a scan's runs) run in parallel, one subprocess each (`rankprobe _arm`, the same
`train` with `--resume`), at most `workers` at a time; with `gpus` each worker sees one GPU of its own
through CUDA_VISIBLE_DEVICES. The parent tokenises the corpus once before launching (the workers find
the token cache), holds the sweep folder's lock throughout, writes each worker's output to
`OUT/logs/<arm>.log`, lets a failing arm fail alone and builds the report when all have ended.
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
from .errors import FolderError, UserError
from .data.tokens import prepare
from .runfolder import (ENDED, EXIT_DIVERGED, METRICS, ensure_writable, first_missing, folder_lock, header,
                        remove_unused, run_rows, safe_name, status_of)
from .train import preflight, train

log = logging.getLogger(__name__)


def arms(cfg: Config) -> list[Config]:
    """One resolved Config per (arm, seed), named '<arm>-s<seed>'. The arms are `sweep.arms` when
    given (e.g. a fifth arm 'muon+qkclip'), else the optimizers × qk_norm grid. `sweep.settings` then
    sets each arm's own keys: those of its optimizer, then of its label without the @variant, then of
    its whole label (each overriding the one before), validated like any override."""
    from .config import apply_overrides, from_dict

    labels = cfg.sweep.arms or [arm_label(o, q) for o in cfg.sweep.optimizers for q in cfg.sweep.qk_norm]
    out = []
    for label in labels:
        opt, qk_norm, qk_clip = parse_arm(label)
        base = replace(cfg, optim=replace(cfg.optim, name=opt, qk_clip=qk_clip),
                       model=replace(cfg.model, qk_norm=qk_norm))
        data = to_dict(base)
        for key in dict.fromkeys((opt, label.partition("@")[0], label)):
            apply_overrides(data, cfg.sweep.settings.get(key, {}))
        arm = from_dict(data)
        for seed in cfg.sweep.seeds:
            out.append(replace(arm, name=f"{label}-s{seed}", arm=label, train=replace(arm.train, seed=seed)))
    return out


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
                gpus: bool) -> list[tuple[str, int, Path]]:
    """Train the runs of `grid` not yet ended under `out_dir` (the caller holds its lock): in turn in
    this process, or `workers` at a time in subprocesses. Returns the subprocess runs that failed."""
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
def _sweep_folder(grid: list[Config], out_dir: Path) -> Iterator[None]:
    """Check every run of `grid` could start (device, memory), then create and lock `out_dir` for the
    block; if the block fails before anything was written there, a folder this created is removed."""
    names = [c.name for c in grid]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise UserError(f"two runs of this grid would share the folder {twice[0]}; list each arm and value once")
    for c in grid:
        preflight(c)
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
              gpus: bool = False) -> list[Path]:
    """Train every arm not already ended under `out_dir`, then build the report there. `force`
    retrains every arm from scratch. `workers` > 0: that many arms at a time in subprocesses, one GPU
    each if `gpus`; ArmsFailed after the report if any of them failed."""
    out_dir = Path(out_dir)
    grid = arms(cfg)
    with _sweep_folder(grid, out_dir):
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


def _worker_env(slot: int, workers: int, gpus: bool) -> dict[str, str]:
    """The parent's environment for one worker: pinned to GPU `slot` (of the parent's visible ones)
    when `gpus`; on the CPU, the cores shared out so that workers do not oversubscribe them."""
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_VARS}
    if gpus:
        visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
        env["CUDA_VISIBLE_DEVICES"] = visible[slot] if slot < len(visible) else str(slot)
    else:
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))
    return env


def _run_parallel(todo: list[Config], out_dir: Path, workers: int, gpus: bool,
                  force: bool) -> list[tuple[str, int, Path]]:
    """Run `todo` as subprocesses, at most `workers` at once; returns the arms that failed (exit
    code other than 0 or diverged), after every arm has ended."""
    logs = out_dir / "logs"
    if logs.is_symlink():
        raise FolderError(f"{logs} is a link; RankProbe writes its workers' logs only into a folder of its own")
    logs.mkdir(exist_ok=True)
    pending, running, failures = list(todo), {}, []
    free = list(range(workers))
    try:
        while pending or running:
            while pending and free:
                slot, a = free.pop(0), pending.pop(0)
                running[slot] = _launch(a, out_dir, logs / f"{a.name}.log", _worker_env(slot, workers, gpus), force)
                where = f"GPU {slot}" if gpus else f"worker {slot}"
                log.info("[%d/%d] training %s on %s (log: %s)", len(todo) - len(pending), len(todo), a.name,
                         where, running[slot][2])
            time.sleep(0.2)
            for slot, (proc, a, log_path) in list(running.items()):
                rc = proc.poll()
                if rc is None:
                    continue
                del running[slot]
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
    out = []
    for value in values:
        data = apply_overrides(to_dict(cfg), {param: value})
        data["name"] = safe_name(f"{param}={value}")  # a value such as ../x must not reach outside out_dir
        out.append(from_dict(data))
    return out


def run_scan(cfg: Config, out_dir: Path, param: str, values: list[str], force: bool = False, workers: int = 0,
             gpus: bool = False) -> Path:
    """Train one run per value of `param` into `out_dir/<param>=<value>/` (ended runs are skipped, cut
    off ones resumed, `workers` at a time, as in a sweep), then write `out_dir/scan.md`; returns its
    path. ArmsFailed after scan.md if some subprocess runs failed."""
    from .report.scan import write_scan

    out_dir = Path(out_dir)
    grid = scan_configs(cfg, param, values)
    with _sweep_folder(grid, out_dir):
        failures = _train_grid(cfg, grid, out_dir, force, workers, gpus)
        path = write_scan(out_dir, param, [out_dir / c.name / METRICS for c in grid])
    if failures:
        raise ArmsFailed(failures)
    return path

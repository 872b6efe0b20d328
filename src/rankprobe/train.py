"""The training loop: token-budgeted steps, with eval and probes at token milestones.

One run = one (optimizer, QK-Norm, seed) arm trained into one directory holding `config.json`,
`env.json`, `metrics.jsonl` (docs/metrics.md) and the final weights `model.safetensors`.

Under `torchrun` (rankprobe.dist) the same loop runs on every rank: each takes its slice of the
global batch, DistributedDataParallel averages the gradients, losses and probe statistics are
reduced across ranks, and rank 0 alone touches the run folder. Muon needs nothing of its own: DDP
has all-reduced the gradients before `opt.step()`, so every rank runs the same Newton–Schulz on the
same averaged gradient and the replicas stay identical. That repeats the orthogonalisation on every
rank; sharding it across ranks and all-gathering the updates is a later speed optimisation, not a
correctness one.
"""

from __future__ import annotations

import json
import logging
import os
import time
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path

import torch

from .checkpoint import (check_config, check_metrics, check_state, config_differences, load_checkpoint,
                         rewind_metrics)
from .config import Config, arm_label, to_dict
from .errors import ConfigError, DataError, FolderError, UserError
from .data.tokens import TokenData, prepare
from .dist import Dist, device_for, on_main
from .model import state_bytes
from .loop import Checkpointer, DivergenceGuard, Prober, Schedule, StepClock, TrainStep, finite_weights, new_timing
from .optim.build import ns_dtype
from .probes.lenses import update_rms, weight_snapshot
from .runfolder import (CHECKPOINT, CONFIG, ENDED, ENV, LOCK, METRICS, OUTPUTS, WEIGHTS, MetricsWriter, NullWriter,
                        RunHeader, atomic_file, ensure_writable, first_missing, folder_lock, header, is_run,
                        remove_unused, run_rows, stale_temp_files, status_of, write_json)
from .runlog import env_info
from .sinks import TensorBoardSink

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    """train.device as a torch.device that exists on this machine; ConfigError (one line) otherwise."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"train.device must be auto, cpu, cuda or cuda:N; got {name!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"train.device must be auto, cpu, cuda or cuda:N; got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"train.device={name} but CUDA is not available on this machine")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"train.device={name} but this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def device_memory(device: torch.device) -> int:
    """Bytes of memory on `device`: the GPU's own, or the machine's RAM for the CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device.index or 0).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def preflight(cfg: Config) -> torch.device:
    """What must hold before a run touches any folder: the device exists, and the model with its
    gradients and optimizer state fits in its memory (unless train.allow_large insists)."""
    device = resolve_device(cfg.train.device)
    need, have = state_bytes(cfg), device_memory(device)
    if need > have and not cfg.train.allow_large:
        raise ConfigError(f"the model needs about {need / 2**30:,.1f} GiB for weights, gradients and optimizer "
                          f"state, more than the {have / 2**30:,.1f} GiB of {device.type} memory here; make it "
                          "smaller, or pass --train.allow_large true to try anyway")
    return device


def check_run_dir(run_dir: Path, force: bool, resume: bool = False) -> None:
    """Refuse a non-empty folder unless resuming or forced, and a folder to resume that holds files but
    no RankProbe run (they are someone else's: never overwritten); fail early on one we cannot write."""
    if run_dir.is_dir() and not force:
        held = sorted(p.name for p in run_dir.iterdir() if p.name != LOCK)
        listed = ", ".join(held[:3]) + (", ..." if len(held) > 3 else "")
        if held and not resume:
            raise FolderError(f"{run_dir} is not empty ({listed}); pass --resume to continue the run in it or "
                              "--force to replace it")
        # what a run killed before its first row leaves: nothing to resume, nothing of anyone else's
        started = all(n == "tensorboard" or (n.startswith(".") and n.endswith(".tmp")) for n in held)
        if held and not started and not is_run(run_dir):
            raise FolderError(f"{run_dir} holds files ({listed}) but no RankProbe run (no {METRICS} starting with "
                              "a run row), so there is nothing to resume; use another --out")
        if (run_dir / METRICS).is_symlink():  # a resume cuts the file back: never a file elsewhere
            raise FolderError(f"{run_dir / METRICS} is a link; RankProbe resumes only a metrics file of its own")
    ensure_writable(run_dir)


def train(cfg: Config, run_dir: Path, data: TokenData | None = None, force: bool = False,
          resume: bool = False, dist: Dist = Dist()) -> Path:
    """Train one arm into `run_dir`; returns the metrics path. Probes and evals at token milestones.

    `resume`: continue from the folder's checkpoint; a run that already ended is left as it is (if it
    was made with these settings), and one without a checkpoint starts over. `force`: replace whatever
    run the folder holds. `dist`: this process's rank under torchrun; rank 0 checks, locks and writes
    the folder, and its verdict (or its UserError) reaches every rank. The other ranks read the
    checkpoint to resume, so a run spread over several hosts needs the run folder on a file system
    they share. A folder this call created is removed again if it fails before writing a row.
    """
    run_dir = Path(run_dir)
    preflight(cfg)
    created = first_missing(run_dir)
    try:
        return _train(cfg, run_dir, data, force, resume, dist)
    except BaseException:
        if created is not None and dist.is_main:
            remove_unused(run_dir, created)
        raise


def _train(cfg: Config, run_dir: Path, data: TokenData | None, force: bool, resume: bool, dist: Dist) -> Path:
    metrics_path = run_dir / METRICS
    with ExitStack() as held:
        state = None

        def open_folder() -> str:
            nonlocal state
            if cfg.train.batch_size % dist.world_size:
                raise UserError(f"train.batch_size {cfg.train.batch_size} does not divide over {dist.world_size} "
                                "processes; make it a multiple of the process count")
            check_run_dir(run_dir, force, resume)
            held.enter_context(folder_lock(run_dir))
            if not resume:
                return "fresh"
            rows = run_rows(run_dir)  # a finished run compressed for publishing stays as it is
            if status_of(rows) in ENDED:
                _check_ended(cfg, run_dir, rows)
                log.info("%s already ended (%s); nothing to resume", run_dir, status_of(rows))
                return "ended"
            state = _open_checkpoint(cfg, run_dir)
            return "fresh" if state is None else "resume"

        status = on_main(dist, open_folder)
        if status == "ended":
            return metrics_path
        if status == "resume" and not dist.is_main:
            state = load_checkpoint(run_dir / CHECKPOINT)  # checked by rank 0; replicas load it too
        _run(cfg, run_dir, data, state, dist)
        return metrics_path


def _check_ended(cfg: Config, run_dir: Path, rows: list[dict]) -> None:
    """A run that ended is kept as it is, but only when asked for with the settings it was made with."""
    saved = (header(rows) or {}).get("config")
    diffs = config_differences(saved, to_dict(cfg)) if isinstance(saved, dict) else []
    if diffs:
        shown = "; ".join(f"{k}: {old!r} there, {new!r} now" for k, old, new in diffs[:3])
        more = f" (and {len(diffs) - 3} more)" if len(diffs) > 3 else ""
        raise FolderError(f"{run_dir} holds a run that already ended with other settings ({shown}{more}); "
                          "use another --out, or --force to replace it")


def _open_checkpoint(cfg: Config, run_dir: Path) -> dict | None:
    """The folder's checkpoint, checked against `cfg`, the model it must fit and the metrics file
    before anything is written."""
    path = run_dir / CHECKPOINT
    if not path.exists():
        if (run_dir / METRICS).exists():
            log.info("%s has no checkpoint; starting the run over", run_dir)
        return None
    state = load_checkpoint(path)
    check_config(state, to_dict(cfg), path)
    check_state(state, Schedule(cfg), _model_layout(cfg, state), path)
    check_metrics(state, run_dir / METRICS, path)
    return state


def _model_layout(cfg: Config, state: dict) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name -> (shape, dtype) of every tensor in the state dict of the model `cfg` builds, at the
    vocabulary size the checkpoint's run resolved; built on the meta device, so nothing is allocated."""
    from .model import Transformer

    vocab = json.loads(state["config"]).get("model", {}).get("vocab_size")
    m = replace(cfg.model, vocab_size=vocab if isinstance(vocab, int) and vocab > 0 else cfg.data.vocab_size)
    with torch.device("meta"):
        model = Transformer(m)
    return {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}


def _prepare(cfg: Config, dist: Dist) -> TokenData:
    """The token data; under DDP rank 0 first (it may train the tokenizer and fill the cache), then
    the others, which find the cache (on another host, they build the same one themselves)."""
    B, T = cfg.train.batch_size, cfg.model.seq_len
    first: list[TokenData] = []
    on_main(dist, lambda: first.append(prepare(cfg.data, T, B)))
    return first[0] if first else prepare(cfg.data, T, B)


def _run(cfg: Config, run_dir: Path, data: TokenData | None, state: dict | None, dist: Dist = Dist()) -> None:
    """Train `cfg` into `run_dir` from `state` (a checkpoint) or from scratch; the loop hands off to the
    parts in rankprobe.loop."""
    t_segment = time.perf_counter()
    t_start = t_segment - (state["wall_s"] if state else 0.0)
    device = device_for(dist, resolve_device(cfg.train.device))
    data = data or _prepare(cfg, dist)
    cfg = replace(cfg, model=replace(cfg.model, vocab_size=cfg.model.vocab_size or data.vocab_size))
    if cfg.model.vocab_size < data.vocab_size:
        raise UserError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's {data.vocab_size}")
    sched = Schedule(cfg)
    step_fn = TrainStep(cfg, device, dist, state, run_dir / CHECKPOINT)
    model, timing = step_fn.model, new_timing((state or {}).get("timing"))
    probe_set = data.probe_tokens(cfg.probe.tokens, cfg.model.seq_len)
    header = _header(cfg, step_fn, data, sched, dist, int(probe_set.numel()))
    if state is not None:  # on rank 0, its refusal raised on every rank (no rank left in a collective)
        on_main(dist, lambda: _check_same_data(run_dir, header.data or {}))
    out = _open_metrics(cfg, run_dir, state, header) if dist.is_main else NullWriter()
    prober = Prober(cfg, model, data, probe_set, device, step_fn.amp, out, timing, dist,
                    (state or {}).get("pending_rows", "[]"))
    ckpt = Checkpointer(run_dir / CHECKPOINT, cfg, dist, timing, t_start, state)
    guard = DivergenceGuard(device)
    start = state["step"] if state else 0
    bar = _progress(sched.total_steps, start, cfg, enabled=dist.is_main)
    timing["setup_s"] += time.perf_counter() - t_segment
    try:
        if state is None and 0 in sched.probe_steps:  # a resumed run has these rows already
            prober(0, [])
            if ckpt.at_probes:
                ckpt.save(0, model, step_fn.optimizers, out, prober.settle)
        clock = StepClock(timing, start)
        for step in range(start + 1, sched.total_steps + 1):
            t0 = time.perf_counter()
            at_probe = step in sched.probe_steps
            x, y = data.train_batch(step, cfg.train.seed, cfg.train.batch_size, cfg.model.seq_len, device,
                                    shard=(dist.rank, dist.world_size))
            scale = sched.lr_scale(step)
            loss, grad_norm, before = step_fn(x, y, scale, snapshot=cfg.probe.weights and at_probe and dist.is_main)
            if step == start + 1:  # this process's first step: compiling, autotuning, allocator warm-up
                loss.item()
                timing["first_step_s"] += time.perf_counter() - t0
            guard.watch(step, loss)
            logged, due = sched.logged(step), ckpt.due(step, sched.total_steps)
            sync_due = due and not dist.active  # under DDP only rank 0 saves, after its own weight check
            broken = guard.check(step, loss, model, logged or sync_due, at_probe or sync_due)
            if broken:
                if dist.is_main:
                    prober.drain()  # rows of the last checkpoint's weights, which were finite
                    _diverged(out, cfg, *broken, sched.tokens_per_step, ckpt.saved_step, ckpt.path,
                              time.perf_counter() - t_start)
                return
            if logged:
                loss_f = loss.item()  # the one host sync per logged step
                out.write("train", step=step, tokens=sched.tokens(step), loss=loss_f, lr_scale=scale,
                          grad_norm=float(grad_norm), step_time_s=clock.lap(step), **step_fn.take_clipped())
                bar.set_postfix(loss=f"{loss_f:.3f}", refresh=False)
            if at_probe:
                prober(step, update_rms(before, weight_snapshot(model)) if before is not None else [])
            if step < sched.total_steps and ((at_probe and ckpt.at_probes) or due) and \
                    (sync_due or at_probe or finite_weights(model)):
                ckpt.save(step, model, step_fn.optimizers, out, prober.settle)
            bar.update(1)
        if dist.is_main:
            _save_weights(model, run_dir / WEIGHTS)
        prober.drain()
        out.write("end", step=sched.total_steps, tokens=sched.tokens(sched.total_steps),
                  wall_s=time.perf_counter() - t_start, status="finished", **timing)
    finally:
        prober.close()
        bar.close()
        out.close()
        step_fn.close()
    for path in [ckpt.path, *stale_temp_files(run_dir, CHECKPOINT)] if dist.is_main else ():
        path.unlink(missing_ok=True)  # model.safetensors holds the result


def _header(cfg: Config, step_fn: TrainStep, data: TokenData, sched: Schedule, dist: Dist,
            probe_tokens: int) -> RunHeader:
    """The `run` row of a training run (docs/metrics.md)."""
    muon = cfg.optim.name == "muon"
    return RunHeader(
        run=cfg.name, arm=cfg.arm or arm_label(cfg.optim.name, cfg.model.qk_norm, cfg.optim.qk_clip),
        optimizer=cfg.optim.name, qk_norm=cfg.model.qk_norm, seed=cfg.train.seed, config=to_dict(cfg),
        env=env_info(step_fn.device) | ({"world_size": dist.world_size} if dist.active else {}),
        n_params=step_fn.model.num_params(), param_groups=step_fn.group_sizes, head_dim=cfg.model.head_dim,
        ns_dtype=str(ns_dtype(cfg.optim, step_fn.device)).removeprefix("torch.") if muon else None,
        n_layer=cfg.model.n_layer, probe_checkpoints=sched.probe_tokens,
        data={"corpus_sha256": data.corpus_sha256, "tokenizer": data.tokenizer_name,
              "train_tokens": data.n_train_tokens, "val_tokens": data.n_val_tokens,
              "probe_tokens": probe_tokens},
    )


def _open_metrics(cfg: Config, run_dir: Path, state: dict | None, run_row: RunHeader) -> MetricsWriter:
    """A fresh run: clear the folder's old outputs, write config, env and the `run` row. A resumed run:
    cut metrics.jsonl back to the checkpoint and note this process in env.json."""
    metrics_path = run_dir / METRICS
    purge = state["tokens_seen"] + 1 if state else None
    if cfg.train.tensorboard and (run_dir / "tensorboard").is_symlink():
        raise FolderError(f"{run_dir / 'tensorboard'} is a link; RankProbe writes TensorBoard events only into a "
                          "folder of its own")
    mirrors = (TensorBoardSink(run_dir / "tensorboard", purge),) if cfg.train.tensorboard else ()
    if state is None:
        for path in [*(run_dir / n for n in OUTPUTS), *stale_temp_files(run_dir, CHECKPOINT)]:
            path.unlink(missing_ok=True)  # a forced or restarted run: nothing of the old one may linger
        out = MetricsWriter(metrics_path, mirrors)  # the run row first: it is what marks the folder a run
        out.write("run", **run_row.row())
        write_json(run_dir / CONFIG, run_row.config)
        write_json(run_dir / ENV, run_row.env)
        return out
    dropped = rewind_metrics(state, metrics_path)
    _note_resume(run_dir / ENV, run_row.env, state["step"])
    log.info("%s: resuming at step %d (%d tokens); %d rows logged after that checkpoint are redone",
             cfg.name, state["step"], state["tokens_seen"], dropped)
    return MetricsWriter(metrics_path, mirrors)


def _check_same_data(run_dir: Path, now: dict) -> None:
    """Refuse to resume on other tokens than the run began on: a corpus edited since (or a tokenizer
    file replaced) passes every config check, since the settings name the same paths, and the run
    would go on on other text under its old `run` row."""
    then = (header(run_rows(run_dir)) or {}).get("data") or {}
    for key in ("corpus_sha256", "tokenizer", "train_tokens", "val_tokens", "probe_tokens"):
        if key in then and then[key] != now.get(key):
            raise DataError(f"{run_dir} began on other data than data.* gives now ({key}: {str(then[key])[:16]} "
                            f"there, {str(now.get(key))[:16]} now): the corpus or tokenizer changed since; restore "
                            "it, or start over with --force")


def _diverged(out: MetricsWriter, cfg: Config, step: int, loss: float, reason: str, tokens_per_step: int,
              ckpt_step: int | None, ckpt_path: Path, wall_s: float) -> None:
    """Stop a run whose loss or weights went NaN/inf: an `end` row with status "diverged"; the last good
    checkpoint stays."""
    tokens = step * tokens_per_step
    kept = f"last good checkpoint: step {ckpt_step} in {ckpt_path}" if ckpt_step is not None else "no checkpoint"
    log.warning("%s diverged: %s at step %d (%d tokens; training loss %s); run stopped, %s",
                cfg.name, reason, step, tokens, loss, kept)
    out.write("end", step=step, tokens=tokens, wall_s=wall_s, status="diverged", reason=reason, loss=loss,
              checkpoint_step=ckpt_step)


def _note_resume(env_path: Path, env: dict, step: int) -> None:
    """Append this process's environment to env.json's `resumes`: a resumed run may finish on another host."""
    try:
        first = json.loads(env_path.read_text())
    except (OSError, ValueError):
        first = {}
    first.setdefault("resumes", []).append({**env, "step": step})
    write_json(env_path, first)


def _save_weights(model, path: Path) -> None:
    from safetensors.torch import save_model

    try:
        with atomic_file(path) as tmp:
            save_model(model, str(tmp))
    except Exception as e:  # a full disk; safetensors raises its own error type for it
        raise FolderError(f"cannot write {path}: {' '.join(str(e).split())[:160]}; the checkpoint is kept "
                          "(free some space, then --resume)") from None


def _progress(total: int, start: int, cfg: Config, enabled: bool = True):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc=cfg.name, unit="step", disable=not (cfg.train.progress and enabled),
                leave=False, dynamic_ncols=True)

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
import math
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path

import torch

from .checkpoint import (capture, check_config, check_metrics, load_checkpoint, restore, rewind_metrics,
                         save_checkpoint)
from .config import Config, UserError, arm_label, to_dict
from .data.tokens import TokenData, prepare
from .dist import Dist, all_reduce_, device_for, mean_, on_main, reduce_probe_stats, shard_rows
from .model import Transformer
from .optim.build import apply_lr, build_optimizers, lr_scale, ns_dtype
from .optim.qkclip import QKClip
from .probes.lenses import probe_lenses, update_rms, weight_lenses_start, weight_snapshot
from .runfolder import (CHECKPOINT, CONFIG, ENDED, ENV, LOCK, METRICS, OUTPUTS, PHASE_FIELDS, WEIGHTS, MetricsWriter,
                        NullWriter, RunHeader, atomic_file, ensure_writable, folder_lock, run_status,
                        stale_temp_files, write_json)
from .runlog import TensorBoardMirror, env_info

log = logging.getLogger(__name__)


def compile_regions(fwd, model: Transformer):
    """`fwd(x, y)` (the model, or its DDP wrapper) running each block and the loss head through its
    own `torch.compile` wrapper (PyTorch's regional compilation). The blocks share code and shapes,
    so one compiled block serves every layer and compiling costs about one layer's worth; the model
    itself stays eager, for evals and probes."""
    regions = ([torch.compile(block) for block in model.blocks], torch.compile(model.head))
    return lambda x, y: fwd(x, y, regions=regions)


def probe_schedule(total_tokens: int, tokens_per_step: int, n: int, explicit: list[int]) -> list[int]:
    """Token counts to probe at, each snapped up to a step boundary: 0, then log-spaced, then the budget.

    Log spacing puts most checkpoints early, where key rank moves fastest.
    """
    total_steps = math.ceil(total_tokens / tokens_per_step)
    if explicit:
        targets = list(explicit)
    else:
        lo = min(tokens_per_step, total_tokens)
        targets = [0] + [lo * (total_tokens / lo) ** (i / max(n - 1, 1)) for i in range(n)]
    steps = {min(math.ceil(t / tokens_per_step), total_steps) for t in targets}
    steps.add(total_steps)
    return sorted(s * tokens_per_step for s in steps)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"train.device={name} but CUDA is not available on this machine")
    return device


def autocast_dtype(cfg: Config, device: torch.device):
    if cfg.train.dtype == "bf16" or (cfg.train.dtype == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


@torch.no_grad()
def evaluate(model, data: TokenData, cfg: Config, device, amp, dist: Dist = Dist()) -> tuple[float, int]:
    """Mean validation loss per token and the token count; under DDP each rank takes every
    world_size-th val batch and the sums are all-reduced (the unwrapped model: no DDP hooks)."""
    model.eval()
    total, count = 0.0, 0
    for i, (x, y) in enumerate(data.val_batches(cfg.train.eval_tokens, cfg.train.batch_size, cfg.model.seq_len)):
        if i % dist.world_size != dist.rank:
            continue
        x, y = x.to(device), y.to(device)
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            loss = model(x, y)
        total += loss.float() * y.numel()
        count += y.numel()
    model.train()
    if dist.active:
        acc = torch.tensor([float(total), float(count)], dtype=torch.float64, device=device)
        all_reduce_(dist, [acc])
        total, count = acc[0].item(), int(acc[1].item())
    return float(total) / count, count


def check_run_dir(run_dir: Path, force: bool, resume: bool = False) -> None:
    """Refuse a non-empty folder unless resuming or forced, and fail early on one we cannot write."""
    if run_dir.is_dir() and not (force or resume):
        held = sorted(p.name for p in run_dir.iterdir() if p.name != LOCK)
        if held:
            listed = ", ".join(held[:3]) + (", ..." if len(held) > 3 else "")
            raise UserError(f"{run_dir} is not empty ({listed}); pass --resume to continue the run in it or "
                            "--force to replace it")
    ensure_writable(run_dir)


def train(cfg: Config, run_dir: Path, data: TokenData | None = None, force: bool = False,
          resume: bool = False, dist: Dist = Dist()) -> Path:
    """Train one arm into `run_dir`; returns the metrics path. Probes and evals at token milestones.

    `resume`: continue from the folder's checkpoint; a run that already ended is left as it is, and
    one without a checkpoint starts over. `force`: replace whatever run the folder holds. `dist`:
    this process's rank under torchrun; rank 0 checks, locks and writes the folder, and its verdict
    (or its UserError) reaches every rank. The other ranks read the checkpoint to resume, so a run
    spread over several hosts needs the run folder on a file system they share.
    """
    run_dir = Path(run_dir)
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
            status = run_status(run_dir)  # a finished run compressed for publishing stays as it is
            if status in ENDED:
                log.info("%s already ended (%s); nothing to resume", run_dir, status)
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


def _open_checkpoint(cfg: Config, run_dir: Path) -> dict | None:
    """The folder's checkpoint, checked against `cfg` and the metrics file before anything is written."""
    path = run_dir / CHECKPOINT
    if not path.exists():
        if (run_dir / METRICS).exists():
            log.info("%s has no checkpoint; starting the run over", run_dir)
        return None
    state = load_checkpoint(path)
    check_config(state, to_dict(cfg), path)
    check_metrics(state, run_dir / METRICS, path)
    return state


def _prepare(cfg: Config, dist: Dist) -> TokenData:
    """The token data; under DDP rank 0 first (it may train the tokenizer and fill the cache), then
    the others, which find the cache (on another host, they build the same one themselves)."""
    B, T = cfg.train.batch_size, cfg.model.seq_len
    first: list[TokenData] = []
    on_main(dist, lambda: first.append(prepare(cfg.data, T, B)))
    return first[0] if first else prepare(cfg.data, T, B)


def _run(cfg: Config, run_dir: Path, data: TokenData | None, state: dict | None, dist: Dist = Dist()) -> None:
    t_segment = time.perf_counter()
    t_start = t_segment - (state["wall_s"] if state else 0.0)
    device = device_for(dist, resolve_device(cfg.train.device))
    B, T = cfg.train.batch_size, cfg.model.seq_len
    if data is None:
        data = _prepare(cfg, dist)
    cfg = replace(cfg, model=replace(cfg.model, vocab_size=cfg.model.vocab_size or data.vocab_size))
    if cfg.model.vocab_size < data.vocab_size:
        raise UserError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's {data.vocab_size}")

    torch.manual_seed(cfg.train.seed)
    model = Transformer(cfg.model).to(device)
    optimizers, group_sizes = build_optimizers(model, cfg.optim, device)
    if state is not None:
        restore(state, model, optimizers, run_dir / CHECKPOINT)
    # Compiled on CUDA by default; the CPU (and so the test suite) runs eager. "auto" compiles by
    # region on one GPU (a cold compile of 14 s against 50 s at seed-22l on an H200, BENCHMARKS.md) and
    # the whole DDP model under torchrun (the combination measured on GPUs).
    mode = cfg.train.compile
    if mode == "auto":
        mode = "false" if device.type != "cuda" else "true" if dist.active else "regional"
    compiled = mode != "false"
    clip = None
    if cfg.optim.qk_clip:
        if compiled:
            # Dynamo otherwise reuses a graph compiled for a hook-less instance (the sweep's previous
            # arm) and the tracker's hooks silently never run (optim/qkclip.py).
            torch._dynamo.config.skip_nnmodule_hook_guards = False
        # Each rank saw its slice of the batch: clip by the global batch's S_max on every rank.
        merge_max = (lambda s_max: all_reduce_(dist, [s_max], "max")) if dist.active else None
        clip = QKClip(model, cfg.optim.qk_clip_tau, sequences=cfg.optim.qk_clip_sequences, merge_max=merge_max)
    step_fwd = model
    if dist.active:
        from torch.nn.parallel import DistributedDataParallel as DDP

        # broadcast_buffers off: the only buffers (RoPE tables) are computed, identical on every rank,
        # and a per-forward broadcast would make eval batches, which differ per rank, collective.
        step_fwd = DDP(model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)
    if mode == "true":
        step_fwd = torch.compile(step_fwd)
    elif mode == "regional":
        step_fwd = compile_regions(step_fwd, model)
    amp = autocast_dtype(cfg, device)

    tokens_per_step = B * T
    total_steps = math.ceil(cfg.train.tokens / tokens_per_step)
    schedule = probe_schedule(cfg.train.tokens, tokens_per_step, cfg.probe.n_checkpoints, cfg.probe.checkpoints)
    probe_steps = {t // tokens_per_step for t in schedule}
    probe_set = data.probe_tokens(cfg.probe.tokens, T)
    probe_shard = shard_rows(dist, probe_set, "probe.tokens")  # statistics merged by reduce_probe_stats
    merge = (lambda cov, attn: reduce_probe_stats(dist, cov, attn)) if dist.active else None
    ckpt_path = run_dir / CHECKPOINT
    run_row = RunHeader(
        run=cfg.name, arm=arm_label(cfg.optim.name, cfg.model.qk_norm, cfg.optim.qk_clip),
        optimizer=cfg.optim.name, qk_norm=cfg.model.qk_norm, seed=cfg.train.seed, config=to_dict(cfg),
        env=env_info(device) | ({"world_size": dist.world_size} if dist.active else {}),
        n_params=model.num_params(), param_groups=group_sizes, head_dim=cfg.model.head_dim,
        ns_dtype=str(ns_dtype(cfg.optim, device)).removeprefix("torch.") if cfg.optim.name == "muon" else None,
        n_layer=cfg.model.n_layer, probe_checkpoints=schedule,
        data={"corpus_sha256": data.corpus_sha256, "tokenizer": data.tokenizer_name,
              "train_tokens": data.n_train_tokens, "val_tokens": data.n_val_tokens,
              "probe_tokens": int(probe_set.numel())},
    )
    out = _open_metrics(cfg, run_dir, state, run_row) if dist.is_main else NullWriter()
    start = state["step"] if state else 0

    # Where this run's wall time went (seconds, summed over resumes): the `end` row reports it.
    # probe_wait_s: the part of probe_s spent waiting for the weight spectra's worker thread.
    timing = dict.fromkeys((*PHASE_FIELDS, "probe_wait_s"), 0.0) | (state or {}).get("timing", {})

    # The weight spectra's eigendecompositions (0.64 s a checkpoint at seed-22l on an H200 when the loop
    # waited for them, BENCHMARKS.md) run on a worker thread while training goes on. Their rows are
    # written before the next checkpoint's rows or the `end` row, never at a time-driven point, so
    # metrics.jsonl comes out the same every time; a checkpoint saved meanwhile carries them, finished,
    # so that a resumed run writes them in the same place.
    worker = ThreadPoolExecutor(1, thread_name_prefix="rankprobe-weights")
    pending: list[tuple[int, Future]] = [(step, _finished(rows))
                                         for step, rows in json.loads((state or {}).get("pending_rows", "[]"))]

    def settle() -> list[tuple[int, list[dict]]]:
        """Wait for the pending jobs: [(step, rows)]."""
        t0 = time.perf_counter()
        done = [(step, job.result()) for step, job in pending]
        waited = time.perf_counter() - t0
        timing["probe_wait_s"] += waited
        timing["probe_s"] += waited
        return done

    def drain() -> None:
        for step, rows in settle():
            for row in rows:
                out.write("weights", step=step, tokens=step * tokens_per_step, **row)
        pending.clear()

    def probe(step: int, updates: list[dict]) -> None:
        drain()
        tokens = step * tokens_per_step
        t0 = time.perf_counter()
        # Eager: a compiled eval would be a second graph (no grad, eval mode) costing ~25 s of compile
        # per arm on an H100 (BENCHMARKS.md) for a few forward passes per checkpoint.
        val_loss, n_val = evaluate(model, data, cfg, device, amp, dist)  # ends in a host sync
        t1 = time.perf_counter()
        timing["eval_s"] += t1 - t0
        out.write("eval", step=step, tokens=tokens, val_loss=val_loss, val_tokens=n_val)
        # Uncompiled, so the hooks never touch the compiled hot path; under the run's autocast, so the
        # keys are the ones training computes (bf16 on CUDA; the statistics are float64 either way).
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            rows, attn = probe_lenses(model, probe_shard, B, attention=cfg.probe.attention, merge=merge)
        lenses = [("probe", rows), ("attn", attn), ("update", updates)]
        if cfg.probe.weights and dist.is_main:  # replicated weights: rank 0's are everyone's
            pending.append((step, worker.submit(weight_lenses_start(model))))
        for kind, kind_rows in lenses:
            for row in kind_rows:
                out.write(kind, step=step, tokens=tokens, **row)
        timing["probe_s"] += time.perf_counter() - t1  # the rows are host numbers: the probe has synced

    saved = {"step": start if state else None, "at": time.monotonic()}
    every_s = cfg.train.checkpoint_minutes * 60

    def save(step: int) -> None:
        if not dist.is_main:
            return
        held = settle()
        t0 = time.perf_counter()
        save_checkpoint(ckpt_path, capture(
            model, optimizers, config=to_dict(cfg), step=step, tokens=step * tokens_per_step,
            wall_s=t0 - t_start, metrics_bytes=out.bytes, metrics_sha256=out.hash.hexdigest(), timing=timing,
            pending_rows=held))
        timing["checkpoint_s"] += time.perf_counter() - t0
        saved.update(step=step, at=time.monotonic())

    # The first step whose loss was NaN/inf, and that loss, tracked on the device so that the check
    # costs no host sync; it is read where the loop syncs anyway (logged steps, checkpoints).
    bad_step = torch.zeros((), dtype=torch.long, device=device)
    bad_loss = torch.zeros((), device=device)
    clipped = torch.zeros((), dtype=torch.long, device=device)  # QK-Clip rescalings since the last row
    bar = _progress(total_steps, start, cfg, enabled=dist.is_main)
    timing["setup_s"] += time.perf_counter() - t_segment
    try:
        if state is None and 0 in probe_steps:  # a resumed run has these rows already
            probe(0, [])
            if every_s == 0:
                save(0)
        for step in range(start + 1, total_steps + 1):
            t0 = time.perf_counter()
            scale = lr_scale(step * tokens_per_step, cfg.train.tokens, cfg.optim.warmup_frac,
                             cfg.optim.decay, cfg.optim.min_lr_frac)
            apply_lr(optimizers, scale)
            x, y = data.train_batch(step, cfg.train.seed, B, T, device, shard=(dist.rank, dist.world_size))
            with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                loss = step_fwd(x, y)
            loss.backward()
            if step == start + 1:  # this process's first step: compiling, autotuning, allocator warm-up
                loss.item()
                timing["first_step_s"] += time.perf_counter() - t0
            max_norm = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
            before = weight_snapshot(model) if cfg.probe.weights and step in probe_steps and dist.is_main else None
            for opt in optimizers:
                opt.step()
                opt.zero_grad(set_to_none=True)
            if clip is not None:
                clipped += (clip.step() < 1).sum()  # stays on the device until a logged step
            # Under DDP, the mean over ranks (no host sync: NCCL queues it), so every rank logs and
            # judges divergence by the same number and all stop at the same step.
            loss = mean_(dist, loss)
            new_bad = (bad_step == 0) & ~torch.isfinite(loss.detach())
            bad_step = torch.where(new_bad, step, bad_step)
            bad_loss = torch.where(new_bad, loss.detach().float(), bad_loss)
            logged = step % cfg.train.log_every == 0 or step == total_steps or step in probe_steps
            due = dist.is_main and every_s > 0 and step < total_steps and time.monotonic() - saved["at"] >= every_s
            # The clock-driven `due` is rank 0's alone, so under DDP it must not change what any rank
            # does next: it only makes rank 0 save (after its own check of the weights).
            sync_due = due and not dist.active
            broken = _divergence(step, bad_step, bad_loss, loss, model, logged or sync_due,
                                 step in probe_steps or sync_due)
            if broken:
                if dist.is_main:
                    drain()  # rows of the last checkpoint's weights, which were finite
                    _diverged(out, cfg, *broken, tokens_per_step, saved["step"], ckpt_path,
                              time.perf_counter() - t_start)
                return
            if logged:
                loss_f = loss.item()  # the one host sync per logged step
                extra = {"qk_clipped": int(clipped)} if clip is not None else {}
                clipped.zero_()
                out.write("train", step=step, tokens=step * tokens_per_step, loss=loss_f, lr_scale=scale,
                          grad_norm=float(grad_norm), step_time_s=time.perf_counter() - t0, **extra)
                bar.set_postfix(loss=f"{loss_f:.3f}", refresh=False)
            if step in probe_steps:
                probe(step, update_rms(before, weight_snapshot(model)) if before is not None else [])
            at_probe = step in probe_steps and every_s == 0
            if step < total_steps and (at_probe or due):
                if sync_due or step in probe_steps or _finite(model):
                    save(step)  # the final step needs none: the weights and the `end` row follow at once
            bar.update(1)
        if dist.is_main:
            _save_weights(model, run_dir / WEIGHTS)
        drain()
        out.write("end", step=total_steps, tokens=total_steps * tokens_per_step,
                  wall_s=time.perf_counter() - t_start, status="finished", **timing)
    finally:
        worker.shutdown(cancel_futures=True)
        bar.close()
        out.close()
        if clip is not None:
            clip.close()
    for path in [ckpt_path, *stale_temp_files(run_dir, CHECKPOINT)] if dist.is_main else ():
        path.unlink(missing_ok=True)  # model.safetensors holds the result


def _finished(result) -> Future:
    job: Future = Future()
    job.set_result(result)
    return job


def _open_metrics(cfg: Config, run_dir: Path, state: dict | None, run_row: RunHeader) -> MetricsWriter:
    """A fresh run: clear the folder's old outputs, write config, env and the `run` row. A resumed run:
    cut metrics.jsonl back to the checkpoint and note this process in env.json."""
    metrics_path = run_dir / METRICS
    purge = state["tokens_seen"] + 1 if state else None
    mirrors = (TensorBoardMirror(run_dir / "tensorboard", purge),) if cfg.train.tensorboard else ()
    if state is None:
        for path in [*(run_dir / n for n in OUTPUTS), *stale_temp_files(run_dir, CHECKPOINT)]:
            path.unlink(missing_ok=True)  # a forced or restarted run: nothing of the old one may linger
        write_json(run_dir / CONFIG, run_row.config)
        write_json(run_dir / ENV, run_row.env)
        out = MetricsWriter(metrics_path, mirrors)
        out.write("run", **run_row.row())
        return out
    dropped = rewind_metrics(state, metrics_path)
    _note_resume(run_dir / ENV, run_row.env, state["step"])
    log.info("%s: resuming at step %d (%d tokens); %d rows logged after that checkpoint are redone",
             cfg.name, state["step"], state["tokens_seen"], dropped)
    return MetricsWriter(metrics_path, mirrors)


def _divergence(step: int, bad_step, bad_loss, loss, model, check_loss: bool,
                check_weights: bool) -> tuple[int, float, str] | None:
    """(step, loss, reason) if the run has diverged by `step`, else None; each check is one host sync."""
    if check_loss and int(bad_step):
        return int(bad_step), float(bad_loss), "non-finite loss"
    # A finite loss can still come with a non-finite update: probing or saving those weights would
    # record garbage as a result or as a "good" checkpoint.
    if check_weights and not _finite(model):
        return step, loss.item(), "non-finite weights"
    return None


def _finite(model) -> bool:
    return bool(torch.stack([torch.isfinite(p).all() for p in model.parameters()]).all())


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

    with atomic_file(path) as tmp:
        save_model(model, str(tmp))


def _progress(total: int, start: int, cfg: Config, enabled: bool = True):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc=cfg.name, unit="step", disable=not (cfg.train.progress and enabled),
                leave=False, dynamic_ncols=True)

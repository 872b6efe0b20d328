"""The named parts the training loop (train.py) hands off to, each usable and testable alone.

- `Schedule`: tokens per step, the step count, the lr scale of a step and the probe checkpoints.
- `TrainStep`: builds the model, optimizers, compile mode, autocast, QK-Clip and DDP wrapper of a run,
  and runs one optimizer step.
- `Prober`: what happens at a probe checkpoint (the eval, the probe pass; the host halves of the probe
  and weight rows on a background worker) and the rows still pending from the worker.
- `Checkpointer`: when to save (the clock, or every probe checkpoint) and the atomic save itself.
- `DivergenceGuard`: the first NaN/inf loss, tracked on the device, read only where the loop syncs.

Wall time is summed per phase into one `timing` dict the parts share (runfolder.PHASE_FIELDS plus
probe_wait_s), which the `end` row reports.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch

from .checkpoint import capture, restore, save_checkpoint
from .config import Config, to_dict
from .data.tokens import TokenData
from .deferred import Deferred
from .dist import Dist, all_reduce_, mean_, shard_rows
from .model import Transformer
from .optim.build import apply_lr, build_optimizers, lr_scale
from .optim.qkclip import QKClip
from .monitor import Monitor
from .probes.lenses import weight_lenses_start, weight_snapshot
from .runfolder import PHASE_FIELDS

TIMING_FIELDS = (*PHASE_FIELDS, "probe_wait_s")


def new_timing(saved: dict | None = None) -> dict[str, float]:
    """Seconds per phase, starting from a checkpoint's (a resumed run keeps summing)."""
    return dict.fromkeys(TIMING_FIELDS, 0.0) | (saved or {})


class StepClock:
    """`step_time_s` of a `train` row: the mean wall time of a training step since the previous row,
    the evals, probes and checkpoints of that stretch and the process's first step (its compile;
    `first_step_s`) left out, as `timing` booked them. Each logged step ends in a host sync on the
    loss, so the stretch between two of them holds exactly its steps' work; a step's own start-to-sync
    time would not, on a GPU, where the loop queues steps without waiting between logged ones."""

    BOOKED = ("first_step_s", "eval_s", "probe_s", "checkpoint_s")

    def __init__(self, timing: dict[str, float], step: int):
        self.timing, self.first = timing, step + 1  # the first step this process runs
        self._mark(step)

    def _mark(self, step: int) -> None:
        self.step, self.t, self.booked = step, time.perf_counter(), {k: self.timing[k] for k in self.BOOKED}

    def lap(self, step: int) -> float:
        """Seconds per step over steps (previous lap, `step`]; the first step's own time when it is the
        only step there."""
        booked = {k: self.timing[k] - self.booked[k] for k in self.BOOKED}
        spent = time.perf_counter() - self.t - sum(booked.values())
        n = step - self.step - (self.step < self.first <= step)
        self._mark(step)
        return booked["first_step_s"] if n == 0 else spent / n


# ---------------------------------------------------------------------------------------------
# schedule


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


class Schedule:
    """A run's steps: the token budget cut into global batches, the lr curve, the probe checkpoints."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.tokens_per_step = cfg.train.batch_size * cfg.model.seq_len
        self.total_steps = math.ceil(cfg.train.tokens / self.tokens_per_step)
        self.probe_tokens = probe_schedule(cfg.train.tokens, self.tokens_per_step, cfg.probe.n_checkpoints,
                                           cfg.probe.checkpoints)
        self.probe_steps = {t // self.tokens_per_step for t in self.probe_tokens}

    def tokens(self, step: int) -> int:
        return step * self.tokens_per_step

    def lr_scale(self, step: int) -> float:
        """The multiplier on the peak lr for `step` (counting the batch about to be stepped on)."""
        o = self.cfg.optim
        return lr_scale(self.tokens(step), self.cfg.train.tokens, o.warmup_frac, o.decay, o.min_lr_frac)

    def logged(self, step: int) -> bool:
        return step % self.cfg.train.log_every == 0 or step == self.total_steps or step in self.probe_steps


# ---------------------------------------------------------------------------------------------
# the training step


def compile_regions(fwd, model: Transformer):
    """`fwd(x, y)` (the model, or its DDP wrapper) running each block and the loss head through its
    own `torch.compile` wrapper (PyTorch's regional compilation). The blocks share code and shapes,
    so one compiled block serves every layer and compiling costs about one layer's worth; the model
    itself stays eager, for evals and probes."""
    regions = ([torch.compile(block) for block in model.blocks], torch.compile(model.head))
    return lambda x, y: fwd(x, y, regions=regions)


def autocast_dtype(cfg: Config, device: torch.device):
    if cfg.train.dtype == "bf16" or (cfg.train.dtype == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def autocast(device: torch.device, amp):
    """The run's autocast context (a no-op without `amp`)."""
    return torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None)


def compile_mode(cfg: Config, device: torch.device, dist: Dist) -> str:
    """train.compile resolved: "auto" compiles by region on one GPU (a cold compile of 14 s against 50 s
    at seed-22l on an H200, BENCHMARKS.md), the whole DDP model under torchrun (the combination
    measured on GPUs), and nothing on the CPU (so the test suite runs eager)."""
    mode = cfg.train.compile
    if mode == "auto":
        mode = "false" if device.type != "cuda" else "true" if dist.active else "regional"
    return mode


class TrainStep:
    """A run's model and optimizers, built in a fixed order from the seed (and restored from `state`),
    and the forward the steps call: compiled, DDP-wrapped and autocast as the config says."""

    def __init__(self, cfg: Config, device: torch.device, dist: Dist, state: dict | None = None,
                 ckpt_path: Path | None = None):
        self.cfg, self.device, self.dist = cfg, device, dist
        torch.manual_seed(cfg.train.seed)
        self.model = Transformer(cfg.model).to(device)
        self.optimizers, self.group_sizes = build_optimizers(self.model, cfg.optim, device)
        if state is not None:
            restore(state, self.model, self.optimizers, ckpt_path)
        mode = compile_mode(cfg, device, dist)
        self.clip = self._qk_clip(compiled=mode != "false") if cfg.optim.qk_clip else None
        fwd = self.model
        if dist.active:
            from torch.nn.parallel import DistributedDataParallel as DDP

            # broadcast_buffers off: the only buffers (RoPE tables) are computed, identical on every rank,
            # and a per-forward broadcast would make eval batches, which differ per rank, collective.
            fwd = DDP(self.model, device_ids=[device.index] if device.type == "cuda" else None,
                      broadcast_buffers=False)
        self.fwd = torch.compile(fwd) if mode == "true" else compile_regions(fwd, self.model) \
            if mode == "regional" else fwd
        self.amp = autocast_dtype(cfg, device)
        self.clipped = torch.zeros((), dtype=torch.long, device=device)  # QK-Clip rescalings since last read

    def _qk_clip(self, compiled: bool) -> QKClip:
        if compiled:
            # Dynamo otherwise reuses a graph compiled for a hook-less instance (the sweep's previous
            # arm) and the tracker's hooks silently never run (optim/qkclip.py).
            torch._dynamo.config.skip_nnmodule_hook_guards = False
        # Each rank saw its slice of the batch: clip by the global batch's S_max on every rank.
        merge_max = (lambda s_max: all_reduce_(self.dist, [s_max], "max")) if self.dist.active else None
        o = self.cfg.optim
        return QKClip(self.model, o.qk_clip_tau, sequences=o.qk_clip_sequences, merge_max=merge_max)

    def __call__(self, x, y, scale: float, snapshot: bool = False):
        """One optimizer step on the batch (x, y) at lr scale `scale`: (loss averaged over ranks,
        gradient norm, the attention weights before the update when `snapshot`, else None)."""
        apply_lr(self.optimizers, scale)
        with autocast(self.device, self.amp):
            loss = self.fwd(x, y)
        loss.backward()
        max_norm = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        before = weight_snapshot(self.model) if snapshot else None
        for opt in self.optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
        if self.clip is not None:
            self.clipped += (self.clip.step() < 1).sum()  # stays on the device until a logged step
        # Under DDP, the mean over ranks (no host sync: NCCL queues it), so every rank logs and judges
        # divergence by the same number and all stop at the same step.
        return mean_(self.dist, loss), grad_norm, before

    def take_clipped(self) -> dict:
        """{"qk_clipped": rescalings since the last call} for a `train` row (host sync); {} without QK-Clip."""
        if self.clip is None:
            return {}
        n = int(self.clipped)
        self.clipped.zero_()
        return {"qk_clipped": n}

    def close(self) -> None:
        if self.clip is not None:
            self.clip.close()


# ---------------------------------------------------------------------------------------------
# evals and probes


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
        with autocast(device, amp):
            loss = model(x, y)
        total += loss.float() * y.numel()
        count += y.numel()
    model.train()
    if dist.active:
        acc = torch.tensor([float(total), float(count)], dtype=torch.float64, device=device)
        all_reduce_(dist, [acc])
        total, count = acc[0].item(), int(acc[1].item())
    return float(total) / count, count


class Prober:
    """The work of a probe checkpoint: the eval, the probe pass (key spectra, attention lenses), and
    the weight spectra. The eigendecompositions of the `probe` and `weights` rows run on a worker
    thread while training goes on (`deferred.Deferred`, on a GPU): the loop waits only for the forward
    and the device statistics (the weights' host half cost the loop 0.64 s a checkpoint at seed-22l on
    an H200, BENCHMARKS.md; the probe rows' ~1 s on 2 CPU cores).

    Those rows are written before the next checkpoint's rows or the `end` row, never at a time-driven
    point, so metrics.jsonl comes out the same every time; a checkpoint saved meanwhile carries them,
    finished (`settle`), so that a resumed run writes them in the same place.

    `close` is final on every device: a closed Prober refuses another checkpoint with one clear error
    (`Deferred.close`).
    """

    def __init__(self, cfg: Config, model, data: TokenData, probe_set: torch.Tensor, device, amp, out,
                 timing: dict[str, float], dist: Dist = Dist(), pending_rows: str = "[]"):
        self.cfg, self.model, self.data, self.device, self.amp = cfg, model, data, device, amp
        self.out, self.timing, self.dist = out, timing, dist
        self.tokens_per_step = cfg.train.batch_size * cfg.model.seq_len
        self.shard = shard_rows(dist, probe_set, "probe.tokens")  # merged by reduce_probe_stats
        # the public monitor's fixed-batch mode: one probing path for the trainer and everyone else
        self.monitor = Monitor(model, dist=dist, batch_size=cfg.train.batch_size, attention=cfg.probe.attention,
                               weights=False, train_forward=False)
        # the host halves of the probe and weight rows: on its worker on a GPU (deferred.Deferred)
        self.deferred = Deferred(device.type == "cuda", "Prober", "probe before close(), or make a new Prober",
                                 json.loads(pending_rows))

    def _waited(self, wait: Callable[[], list[tuple[int, list[dict]]]]) -> list[tuple[int, list[dict]]]:
        """`wait()` for the pending rows, its time booked as probe time the loop waited for."""
        t0 = time.perf_counter()
        done = wait()
        waited = time.perf_counter() - t0
        self.timing["probe_wait_s"] += waited
        self.timing["probe_s"] += waited
        return done

    def settle(self) -> list[tuple[int, list[dict]]]:
        """Wait for the pending rows: [(step, rows)], each row with its `kind` (what a checkpoint saves)."""
        return self._waited(self.deferred.settle)

    def drain(self) -> None:
        """Write the pending rows, in the order their checkpoints made them."""
        for step, rows in self._waited(self.deferred.take):
            for row in rows:
                row = dict(row)
                kind = row.pop("kind", "weights")  # a checkpoint from before the probe rows were pending
                self.out.write(kind, step=step, tokens=step * self.tokens_per_step, **row)

    def __call__(self, step: int, updates: list[dict]) -> None:
        """Evaluate and probe after `step`; `updates` are the update-RMS rows of the step that led here."""
        self.deferred.check_open()  # before the eval, and before `drain` meets rows that close() cancelled
        self.drain()
        tokens = step * self.tokens_per_step
        t0 = time.perf_counter()
        # Eager: a compiled eval would be a second graph (no grad, eval mode) costing ~25 s of compile
        # per arm on an H100 (BENCHMARKS.md) for a few forward passes per checkpoint.
        val_loss, n_val = evaluate(self.model, self.data, self.cfg, self.device, self.amp, self.dist)  # syncs
        t1 = time.perf_counter()
        self.timing["eval_s"] += t1 - t0
        self.out.write("eval", step=step, tokens=tokens, val_loss=val_loss, val_tokens=n_val)
        for kind, rows in self.lenses(step, updates):
            for row in rows:
                self.out.write(kind, step=step, tokens=tokens, **row)
        self.timing["probe_s"] += time.perf_counter() - t1  # the rows are host numbers: the probe has synced

    def lenses(self, step: int, updates: list[dict]) -> list[tuple[str, list[dict]]]:
        """The probe pass after `step`: (kind, rows) for `attn` and `update`; the host halves of the
        `probe` and `weights` rows go to the worker. Uncompiled, so the hooks never touch the compiled
        hot path; under the run's autocast, so the keys are the ones training computes (bf16 on CUDA;
        the statistics are float64 either way)."""
        self.deferred.check_open()  # before the probe pass, not after it at the first host half
        with autocast(self.device, self.amp):
            probe_rows, attn = self.monitor.lenses_start(self.shard, sharded=True)
        if self.dist.is_main:  # the statistics are merged and the weights replicated: rank 0 writes for all
            self.deferred.add(step, "probe", probe_rows)
            if self.cfg.probe.weights:
                self.deferred.add(step, "weights", weight_lenses_start(self.model))
        return [("attn", attn), ("update", updates)]

    def close(self) -> None:
        """Stop the worker (waiting for a host half it is running, cancelling queued ones); final."""
        self.deferred.close()


# ---------------------------------------------------------------------------------------------
# checkpoints and divergence


class Checkpointer:
    """When to save a resumable checkpoint, and saving it: every train.checkpoint_minutes by rank 0's
    clock, or at every probe checkpoint when that is 0. Rank 0 alone writes."""

    def __init__(self, path: Path, cfg: Config, dist: Dist, timing: dict[str, float], t_start: float,
                 state: dict | None):
        self.path, self.cfg, self.dist, self.timing, self.t_start = path, cfg, dist, timing, t_start
        self.every_s = cfg.train.checkpoint_minutes * 60
        self.at_probes = self.every_s == 0
        self.saved_step = state["step"] if state else None
        self.saved_at = time.monotonic()

    def due(self, step: int, total_steps: int) -> bool:
        """rank 0's clock says save after `step` (never after the last: the weights follow at once).
        The clock is rank 0's alone, so under DDP this must not change what any rank does but save."""
        return (self.dist.is_main and self.every_s > 0 and step < total_steps
                and time.monotonic() - self.saved_at >= self.every_s)

    def save(self, step: int, model, optimizers, out, settle) -> None:
        """Save after `step`; `settle()` gives the rows still pending (Prober.settle), kept in the file."""
        if not self.dist.is_main:
            return
        pending_rows = settle()
        t0 = time.perf_counter()
        save_checkpoint(self.path, capture(
            model, optimizers, config=to_dict(self.cfg), step=step, tokens=step * self.cfg.train.batch_size *
            self.cfg.model.seq_len, wall_s=t0 - self.t_start, metrics_bytes=out.bytes,
            metrics_sha256=out.hash.hexdigest(), timing=self.timing, pending_rows=pending_rows))
        self.timing["checkpoint_s"] += time.perf_counter() - t0
        self.saved_step, self.saved_at = step, time.monotonic()


class DivergenceGuard:
    """The first step whose loss was NaN/inf, and that loss, tracked on the device so that watching
    costs no host sync; `check` reads them where the loop syncs anyway (logged steps, checkpoints)."""

    def __init__(self, device: torch.device):
        self.bad_step = torch.zeros((), dtype=torch.long, device=device)
        self.bad_loss = torch.zeros((), device=device)

    def watch(self, step: int, loss: torch.Tensor) -> None:
        new_bad = (self.bad_step == 0) & ~torch.isfinite(loss.detach())
        self.bad_step = torch.where(new_bad, step, self.bad_step)
        self.bad_loss = torch.where(new_bad, loss.detach().float(), self.bad_loss)

    def check(self, step: int, loss: torch.Tensor, model, check_loss: bool,
              check_weights: bool) -> tuple[int, float, str] | None:
        """(step, loss, reason) if the run has diverged by `step`, else None; each check is one host sync."""
        if check_loss and int(self.bad_step):
            return int(self.bad_step), float(self.bad_loss), "non-finite loss"
        # A finite loss can still come with a non-finite update: probing or saving those weights would
        # record garbage as a result or as a "good" checkpoint.
        if check_weights and not finite_weights(model):
            return step, loss.item(), "non-finite weights"
        return None


def finite_weights(model) -> bool:
    return bool(torch.stack([torch.isfinite(p).all() for p in model.parameters()]).all())


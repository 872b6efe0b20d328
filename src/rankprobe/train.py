"""The training loop: token-budgeted steps, with eval and probes at token milestones.

One run = one (optimizer, QK-Norm, seed) arm trained into one directory holding `config.json`,
`env.json`, `metrics.jsonl` (docs/metrics.md) and the final weights `model.safetensors`.
"""

from __future__ import annotations

import json
import math
import os
import platform
import socket
import subprocess
import sys
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import torch

from . import __version__
from .config import Config, UserError, to_dict
from .data.tokens import TokenData, prepare
from .model import Transformer
from .optim.build import apply_lr, build_optimizers, lr_scale
from .probes.capture import probe_model

SCHEMA_VERSION = 1


def arm_label(optimizer: str, qk_norm: bool) -> str:
    return optimizer + ("+qknorm" if qk_norm else "")


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


def env_info(device: torch.device) -> dict:
    src = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=src, capture_output=True, text=True,
                             timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        sha = None
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{platform.machine()}, {torch.get_num_threads()} threads"
    return {
        "git_sha": sha, "python": sys.version.split()[0], "torch": torch.__version__,
        "platform": platform.platform(), "device": f"{device.type}: {name}",
        "hostname": socket.gethostname(), "rankprobe": __version__,
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


class MetricsWriter:
    """Append-only JSONL, one flushed line per row, NaN/inf written as null; optional TensorBoard mirror."""

    def __init__(self, path: Path, tensorboard: bool = False):
        self.file = open(path, "a", encoding="utf-8")
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(path.parent / "tensorboard"))

    def write(self, kind: str, **row) -> None:
        row = {"kind": kind, **{k: _finite(v) for k, v in row.items()}}
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.tb is not None and kind in ("train", "eval"):
            for key in ("loss", "val_loss", "lr_scale", "grad_norm", "step_time_s"):
                if row.get(key) is not None:
                    self.tb.add_scalar(f"{kind}/{key}", row[key], row["tokens"])
        elif self.tb is not None and kind == "probe" and row["tensor"] == "k":
            self.tb.add_scalar(f"probe_pr_{row['tap']}/k_layer{row['layer']:02d}", row["pr"], row["tokens"])

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def _finite(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, list):
        return [_finite(x) for x in v]
    return v


def autocast_dtype(cfg: Config, device: torch.device):
    if cfg.train.dtype == "bf16" or (cfg.train.dtype == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


@torch.no_grad()
def evaluate(model, data: TokenData, cfg: Config, device, amp) -> tuple[float, int]:
    model.eval()
    total, count = 0.0, 0
    for x, y in data.val_batches(cfg.train.eval_tokens, cfg.train.batch_size, cfg.model.seq_len):
        x, y = x.to(device), y.to(device)
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            loss = model(x, y)
        total += loss.float() * y.numel()
        count += y.numel()
    model.train()
    return float(total) / count, count


def ensure_writable(folder: Path) -> None:
    """Create `folder` if needed and prove we can write there, before any expensive work starts."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".rankprobe-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write to output folder {folder}: {e.strerror or e}") from None


def check_run_dir(run_dir: Path, force: bool) -> None:
    """Refuse to write over an earlier run unless forced, and fail early on a folder we cannot write."""
    if (run_dir / "metrics.jsonl").exists() and not force:
        raise UserError(f"{run_dir} already holds a run (metrics.jsonl); pass --force to replace it")
    ensure_writable(run_dir)


def train(cfg: Config, run_dir: Path, data: TokenData | None = None, force: bool = False) -> Path:
    """Train one arm into `run_dir`; returns the metrics path. Probes and evals at token milestones."""
    run_dir = Path(run_dir)
    check_run_dir(run_dir, force)
    t_start = time.perf_counter()
    device = resolve_device(cfg.train.device)
    B, T = cfg.train.batch_size, cfg.model.seq_len
    if data is None:
        data = prepare(cfg.data, T, B)
    cfg = replace(cfg, model=replace(cfg.model, vocab_size=cfg.model.vocab_size or data.vocab_size))
    if cfg.model.vocab_size < data.vocab_size:
        raise UserError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's {data.vocab_size}")

    torch.manual_seed(cfg.train.seed)
    model = Transformer(cfg.model).to(device)
    optimizers, group_sizes = build_optimizers(model, cfg.optim, device)
    fwd = torch.compile(model) if cfg.train.compile else model
    amp = autocast_dtype(cfg, device)

    tokens_per_step = B * T
    total_steps = math.ceil(cfg.train.tokens / tokens_per_step)
    schedule = probe_schedule(cfg.train.tokens, tokens_per_step, cfg.probe.n_checkpoints, cfg.probe.checkpoints)
    probe_steps = {t // tokens_per_step for t in schedule}
    probe_set = data.probe_tokens(cfg.probe.tokens, T)

    (run_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=2) + "\n")
    env = env_info(device)
    (run_dir / "env.json").write_text(json.dumps(env, indent=2) + "\n")
    metrics_path = run_dir / "metrics.jsonl"
    metrics_path.unlink(missing_ok=True)
    out = MetricsWriter(metrics_path, cfg.train.tensorboard)
    out.write(
        "run", schema=SCHEMA_VERSION, run=cfg.name, arm=arm_label(cfg.optim.name, cfg.model.qk_norm),
        optimizer=cfg.optim.name, qk_norm=cfg.model.qk_norm, seed=cfg.train.seed, config=to_dict(cfg),
        env=env, n_params=model.num_params(), param_groups=group_sizes, head_dim=cfg.model.head_dim,
        n_layer=cfg.model.n_layer, probe_checkpoints=schedule,
        data={"corpus_sha256": data.corpus_sha256, "tokenizer": data.tokenizer_name,
              "train_tokens": data.n_train_tokens, "val_tokens": data.n_val_tokens,
              "probe_tokens": int(probe_set.numel())},
    )

    def checkpoint(step: int) -> None:
        tokens = step * tokens_per_step
        val_loss, n_val = evaluate(fwd, data, cfg, device, amp)
        out.write("eval", step=step, tokens=tokens, val_loss=val_loss, val_tokens=n_val)
        rows = probe_model(model, probe_set, B)  # fp32, uncompiled: hooks never touch the hot path
        for row in rows:
            out.write("probe", step=step, tokens=tokens, **row)

    bar = _progress(total_steps, cfg)
    try:
        if 0 in probe_steps:
            checkpoint(0)
        for step in range(1, total_steps + 1):
            t0 = time.perf_counter()
            scale = lr_scale(step * tokens_per_step, cfg.train.tokens, cfg.optim.warmup_frac,
                             cfg.optim.decay, cfg.optim.min_lr_frac)
            apply_lr(optimizers, scale)
            x, y = data.train_batch(step, cfg.train.seed, B, T, device)
            with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                loss = fwd(x, y)
            loss.backward()
            clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            for opt in optimizers:
                opt.step()
                opt.zero_grad(set_to_none=True)
            if step % cfg.train.log_every == 0 or step == total_steps or step in probe_steps:
                loss_f = loss.item()  # the one host sync per logged step
                out.write("train", step=step, tokens=step * tokens_per_step, loss=loss_f, lr_scale=scale,
                          grad_norm=float(grad_norm), step_time_s=time.perf_counter() - t0)
                bar.set_postfix(loss=f"{loss_f:.3f}", refresh=False)
            if step in probe_steps:
                checkpoint(step)
            bar.update(1)
    finally:
        bar.close()
    _save_weights(model, run_dir / "model.safetensors")
    out.write("end", step=total_steps, tokens=total_steps * tokens_per_step,
              wall_s=time.perf_counter() - t_start, status="finished")
    out.close()
    return metrics_path


def _save_weights(model, path: Path) -> None:
    from safetensors.torch import save_model

    tmp = path.with_suffix(".tmp")
    save_model(model, str(tmp))
    os.replace(tmp, path)


def _progress(total: int, cfg: Config):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=cfg.name, unit="step", disable=not cfg.train.progress, leave=False,
                dynamic_ncols=True)

"""What every run folder records about itself: the environment, and the append-only metrics writer.

Shared by the training loop and by `rankprobe probe` (probes/hf.py), so every metrics.jsonl follows
one schema (docs/metrics.md).
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
import socket
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

from . import __version__
from .config import UserError

SCHEMA_VERSION = 1
# Fields that hold wall-clock seconds: they differ between otherwise identical runs. The `end` row
# splits a run's wall time into set-up, the first step (compiling), evals, probes and checkpoint
# writes; the rest is training steps.
PHASE_FIELDS = ("setup_s", "first_step_s", "eval_s", "probe_s", "checkpoint_s")
WALL_CLOCK_FIELDS = ("wall_s", "step_time_s", *PHASE_FIELDS, "probe_wait_s")


def env_info(device: torch.device) -> dict:
    """git SHA of the source, versions, device and host: enough to say where a number came from."""
    src = Path(__file__).resolve().parent
    sha, dirty = _git(src, "rev-parse", "HEAD"), _git(src, "status", "--porcelain", "--", ".")
    dirty = None if sha is None or dirty is None else dirty != ""  # the package's files differ from HEAD
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{platform.machine()}, {torch.get_num_threads()} threads"
    return {
        "git_sha": sha, "git_dirty": dirty, "python": sys.version.split()[0], "torch": torch.__version__,
        "platform": platform.platform(), "device": f"{device.type}: {name}",
        "hostname": socket.gethostname(), "rankprobe": __version__, "transformers": _version("transformers"),
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _git(cwd: Path, *args: str) -> str | None:
    """The stripped output of `git ARGS` in `cwd`; None outside a repository or without git."""
    try:
        r = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


class MetricsWriter:
    """Append-only JSONL, one flushed line per row, NaN/inf written as null; optional TensorBoard mirror.

    Tracks the file's byte length and SHA-256 as it grows: a checkpoint records both, so a resume can
    prove the file is the one it saw and cut it back to that point. `purge_step` (tokens) makes
    TensorBoard drop the events a killed run logged after its checkpoint.
    """

    def __init__(self, path: Path, tensorboard: bool = False, purge_step: int | None = None):
        self.file = open(path, "ab")
        self.hash = hashlib.sha256(path.read_bytes())
        self.bytes = self.file.tell()
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(path.parent / "tensorboard"), purge_step=purge_step)

    def write(self, kind: str, **row) -> None:
        row = {"kind": kind, **{k: finite(v) for k, v in row.items()}}
        line = (json.dumps(row) + "\n").encode()
        self.file.write(line)
        self.file.flush()
        self.hash.update(line)
        self.bytes += len(line)
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


class NullWriter:
    """What the ranks other than 0 of a DDP run write to: nothing (only rank 0 touches the run folder)."""

    def write(self, kind: str, **row) -> None:
        pass

    def close(self) -> None:
        pass


def finite(v):
    """JSON has no NaN or infinity: write them as null."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, list):
        return [finite(x) for x in v]
    return v


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def ensure_writable(folder: Path) -> None:
    """Create `folder` if needed and prove we can write there, before any expensive work starts."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".rankprobe-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write to output folder {folder}: {e.strerror or e}") from None

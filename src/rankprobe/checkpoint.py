"""What lets a run survive a crash: its checkpoint, the tail of its metrics file, and a folder lock.

`checkpoint.pt` holds everything the training loop needs to continue a killed run exactly where it
stood: model and optimizer state, the step and tokens seen (the lr schedule and the batch order are
pure functions of them), the torch RNG states, the resolved config, and the byte length and SHA-256
of `metrics.jsonl` at that moment, so that resuming cuts the file back to the checkpoint and no row
is logged twice. It is written atomically (temp file, fsync, os.replace), so a kill mid-write leaves
the previous checkpoint intact. It is read with torch.load(weights_only=True), which accepts tensors
and plain containers only: a checkpoint that asks to build any other object is refused, never run.

A run folder or sweep folder is held by one process at a time through `.rankprobe.lock` (flock,
non-blocking): a second process stops at once with one line instead of interleaving writes.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from .config import Config, DataError, UserError, flatten, to_dict

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
LOCK = ".rankprobe.lock"
FORMAT = 1

log = logging.getLogger(__name__)

# Settings that may differ between a killed run and its resume (or between sweeps sharing a folder)
# without changing a single metric: names and places, display, the checkpoint cadence, the device
# and compilation (a GPU run may be finished on another card), and the sweep grid around an arm.
_FREE_KEYS = {"name", "out", "data.cache_dir", "train.progress", "train.tensorboard",
              "train.checkpoint_minutes", "train.device", "train.compile"}


# ---------------------------------------------------------------------------------------------
# the checkpoint file


def capture(model, optimizers, *, config: dict, step: int, tokens: int, wall_s: float,
            metrics_bytes: int, metrics_sha256: str, timing: dict[str, float] | None = None,
            pending_rows: list | None = None) -> dict:
    """The state of a run after `step` optimizer steps, as tensors and plain data only. `pending_rows`:
    metric rows computed but not yet written (the `weights` rows of the last probe checkpoint, which
    the loop writes later), kept as JSON so that a resumed run writes them where this one would have."""
    cuda = list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else []
    return {
        "format": FORMAT, "step": step, "tokens_seen": tokens, "wall_s": wall_s, "timing": dict(timing or {}),
        "config": json.dumps(config, sort_keys=True), "pending_rows": json.dumps(pending_rows or []),
        "metrics_bytes": metrics_bytes, "metrics_sha256": metrics_sha256,
        "model": model.state_dict(), "optimizers": [opt.state_dict() for opt in optimizers],
        "rng": {"torch": torch.get_rng_state(), "cuda": cuda},
    }


def save_checkpoint(path: Path, state: dict) -> None:
    """Write `state` to `path` atomically: a reader (or a resume after a kill) sees the old file or the new."""
    path = Path(path)
    tmp = temp_path(path)  # one fixed name: the folder lock makes this process its only writer
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def temp_path(path: Path) -> Path:
    """Where save_checkpoint writes before the rename; a kill mid-write leaves it, the next save replaces it."""
    return path.with_name(path.name + ".tmp")


def _fsync_dir(folder: Path) -> None:
    # the rename itself must reach the disk, or a power cut can bring back the old directory entry
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_TYPES = {"format": int, "step": int, "tokens_seen": int, "wall_s": float, "config": str, "metrics_bytes": int,
          "metrics_sha256": str, "model": dict, "optimizers": list, "rng": dict}


def load_checkpoint(path: Path) -> dict:
    """Read a checkpoint without ever unpickling arbitrary objects; DataError (one line) if it is unsafe,
    corrupt, truncated or not a RankProbe checkpoint."""
    try:
        with warnings.catch_warnings():  # torch warns about odd files; the one-line error below says it all
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any failure to parse means the same thing here: the file cannot be used
        text = " ".join(str(e).split())
        unsafe = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        if unsafe:
            raise DataError(f"refusing to load checkpoint {path}: it asks to build a {unsafe.group(1)} object, "
                            "not just tensors (a tampered or foreign file); delete it or start over with "
                            "--force") from None
        reason = re.search(r"WeightsUnpickler error: (.*?)(?: Check the documentation|$)", text)
        detail = reason.group(1) if reason else (text.split(". ")[0] or type(e).__name__)
        raise DataError(f"checkpoint {path} is corrupt or truncated ({detail[:120]}); delete it or start over "
                        "with --force") from None
    missing = [k for k, tp in _TYPES.items() if not isinstance(state, dict) or not isinstance(state.get(k), tp)]
    if not missing and not isinstance(state["rng"].get("torch"), torch.Tensor):
        missing = ["rng.torch"]
    if missing:
        raise DataError(f"{path} is not a RankProbe checkpoint (missing or wrong: {', '.join(missing)})")
    if state["format"] != FORMAT:
        raise DataError(f"checkpoint {path} has format {state['format']}; this rankprobe reads format {FORMAT}")
    return state


def config_differences(saved: dict, current: dict) -> list[tuple[str, object, object]]:
    """(dotted key, saved value, current value) for every setting that would change the run's metrics."""
    a, b = flatten(json.loads(json.dumps(saved))), flatten(json.loads(json.dumps(current)))
    defaults = flatten(json.loads(json.dumps(to_dict(Config()))))
    out = []
    for key in sorted(set(a) | set(b)):
        if key in _FREE_KEYS or key.startswith("sweep."):
            continue
        if key not in a and key in defaults and b[key] == defaults[key]:
            continue  # a setting added after the run was made, at the default that reproduces it
        if key == "model.vocab_size" and not b.get(key):
            continue  # 0 = taken from the tokenizer, which the data.* settings already pin
        if a.get(key) != b.get(key):
            out.append((key, a.get(key), b.get(key)))
    return out


def check_config(state: dict, current: dict, path: Path) -> None:
    """Refuse to continue a checkpoint under settings that would change its results."""
    diffs = config_differences(json.loads(state["config"]), current)
    if not diffs:
        return
    shown = "; ".join(f"{k}: {old!r} in the checkpoint, {new!r} now" for k, old, new in diffs[:3])
    more = f" (and {len(diffs) - 3} more)" if len(diffs) > 3 else ""
    what = "holds a model of a different shape" if any(k.startswith("model.") for k, _, _ in diffs) else \
        "was written with other settings"
    raise DataError(f"checkpoint {path} {what} ({shown}{more}); resume with the original settings or start "
                    "over with --force")


def restore(state: dict, model, optimizers, path: Path) -> None:
    """Load model, optimizer and RNG state into a freshly built run; DataError if they do not fit it."""
    have = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    saved = {k: tuple(v.shape) for k, v in state["model"].items() if isinstance(v, torch.Tensor)}
    if have != saved:
        key = next(k for k in sorted(set(have) | set(saved)) if have.get(k) != saved.get(k))
        raise DataError(f"checkpoint {path} holds a model of a different shape ({key}: {saved.get(key)} in the "
                        f"checkpoint, {have.get(key)} here); start over with --force")
    if len(state["optimizers"]) != len(optimizers):
        raise DataError(f"checkpoint {path} has {len(state['optimizers'])} optimizer states; this run has "
                        f"{len(optimizers)}")
    model.load_state_dict(state["model"])
    try:
        for opt, opt_state in zip(optimizers, state["optimizers"]):
            opt.load_state_dict(opt_state)
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        detail = " ".join(str(e).split())
        raise DataError(f"checkpoint {path}: optimizer state does not fit this run ({detail})") from None
    torch.set_rng_state(state["rng"]["torch"])
    cuda = state["rng"].get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


# ---------------------------------------------------------------------------------------------
# the metrics file


def split_torn(data: bytes, path: Path, quiet: bool = False) -> bytes:
    """The complete rows of a metrics file's bytes, without a torn last line.

    Every row the writer flushes ends in a newline, so a last line without one, or one that is not a
    JSON object, is a write cut off by a crash: dropped with a warning, as report/metrics.py does.
    """
    head, newline, tail = data.rpartition(b"\n")
    if not tail.strip():
        return data
    try:
        if isinstance(json.loads(tail), dict):
            return data  # a complete row that merely lacks its newline
    except ValueError:
        pass
    if not quiet:
        log.warning("%s: dropped a torn last line of %d bytes (a crash mid-write?)", path, len(tail))
    return head + newline


def last_row(metrics_path: Path, quiet: bool = False) -> dict | None:
    """The last complete row of a metrics file (a torn last line skipped, with a warning unless quiet)."""
    try:
        data = Path(metrics_path).read_bytes()
    except FileNotFoundError:
        return None
    body = split_torn(data, metrics_path, quiet)
    for line in reversed(body.splitlines()):
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            return row
    return None


def first_row(metrics_path: Path) -> dict | None:
    """The `run` row a metrics file starts with, or None if it has none (yet)."""
    try:
        with open(metrics_path, "rb") as f:
            row = json.loads(f.readline())
    except (OSError, ValueError):
        return None
    return row if isinstance(row, dict) and row.get("kind") == "run" else None


def archived_rows(run_dir: Path) -> list[dict] | None:
    """The rows of a compressed `metrics.jsonl.xz` / `.gz` that stands for a run folder without a plain
    metrics.jsonl (a run archived for publishing, as in results/); None if there is none."""
    from .report.metrics import METRICS_NAMES, read_metrics

    if (run_dir / METRICS).exists():
        return None
    path = next((run_dir / n for n in METRICS_NAMES if n != METRICS and (run_dir / n).exists()), None)
    return None if path is None else read_metrics(path)


def end_row(metrics_path: Path, quiet: bool = False) -> dict | None:
    """The `end` row if the run ended (finished or diverged), else None."""
    row = last_row(metrics_path, quiet)
    return row if row is not None and row.get("kind") == "end" else None


def check_metrics(state: dict, metrics_path: Path, ckpt_path: Path) -> None:
    """The metrics file must still start with exactly the bytes the checkpoint saw."""
    n, want = state["metrics_bytes"], state["metrics_sha256"]
    try:
        with open(metrics_path, "rb") as f:
            prefix = f.read(n)
    except FileNotFoundError:
        raise DataError(f"{ckpt_path} has no {metrics_path.name} beside it; start over with --force") from None
    if len(prefix) < n or hashlib.sha256(prefix).hexdigest() != want:
        raise DataError(f"{metrics_path} no longer matches {ckpt_path} (shortened or replaced since the checkpoint); "
                        "start over with --force")


def rewind_metrics(state: dict, metrics_path: Path) -> int:
    """Cut the metrics file back to its length at the checkpoint; returns the number of rows dropped
    (they are logged again as the run continues). Call check_metrics first."""
    n = state["metrics_bytes"]
    dropped = split_torn(metrics_path.read_bytes()[n:], metrics_path).count(b"\n")
    os.truncate(metrics_path, n)
    return dropped


# ---------------------------------------------------------------------------------------------
# one process per folder


@contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """Hold `folder/.rankprobe.lock` for the duration; UserError at once if another process holds it.

    flock is released by the kernel when the holder dies, so a killed run never leaves a stale lock;
    the file itself stays (removing it would let a third process lock a different inode).
    """
    path = Path(folder) / LOCK
    f = open(path, "a+", encoding="utf-8")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "?"
        f.close()
        raise UserError(f"{folder} is in use by another rankprobe process (pid {holder}); wait for it to end or "
                        "use another --out") from None
    except OSError as e:  # e.g. a network file system without flock
        f.close()
        raise UserError(f"cannot lock {path}: {e.strerror or e}") from None
    try:
        f.truncate(0)
        f.write(f"{os.getpid()}\n")
        f.flush()
        yield
    finally:
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()

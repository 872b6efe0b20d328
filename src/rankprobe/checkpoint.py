"""What lets a run survive a crash: its checkpoint, checked against the metrics file it was saved beside.

`checkpoint.pt` holds everything the training loop needs to continue a killed run exactly where it
stood: model and optimizer state, the step and tokens seen (the lr schedule and the batch order are
pure functions of them), the torch RNG states, the resolved config, and the byte length and SHA-256
of `metrics.jsonl` at that moment, so that resuming cuts the file back to the checkpoint and no row
is logged twice. It is written atomically (runfolder.atomic_file, fsynced), so a kill mid-write leaves
the previous checkpoint intact, and carries a SHA-256 of its own contents, checked on load, so a
flipped byte is refused rather than resumed from. It is read with torch.load(weights_only=True), which
accepts tensors and plain containers only: a checkpoint that asks to build any other object is refused,
never run. Every field is checked against the run (`check_state`) before metrics.jsonl is cut back.
The run folder's other files, its rows and its lock belong to rankprobe.runfolder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import warnings
from pathlib import Path

import torch

from .config import Config, flatten, to_dict
from .errors import DataError, FolderError
from .runfolder import atomic_file

FORMAT = 1

log = logging.getLogger(__name__)


# Settings that may differ between a killed run and its resume (or between sweeps sharing a folder)
# without changing a single metric: names and places, display, the checkpoint cadence, the device
# and compilation (a GPU run may be finished on another card), and the sweep grid around an arm.
_FREE_KEYS = {"name", "arm", "out", "data.cache_dir", "train.progress", "train.tensorboard",
              "train.checkpoint_minutes", "train.device", "train.compile", "train.allow_large"}


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
    """Write `state` to `path` atomically and durably: a reader (or a resume after a kill) sees the old
    file or the new one, and a power cut keeps one of them. The file carries the SHA-256 of its own
    contents (`digest`), so a changed byte is found on load rather than resumed from."""
    with atomic_file(path, fsync=True) as tmp:
        try:
            torch.save({**state, "digest": state_digest(state)}, tmp)
        except OSError as e:  # a full disk: atomic_file removes the temporary file, the old checkpoint stays
            raise FolderError(f"cannot write checkpoint {path}: {e.strerror or e}; the previous checkpoint is "
                              "kept (free some space, then --resume)") from None
        except RuntimeError as e:  # torch wraps the zip writer's failures, ENOSPC among them
            raise FolderError(f"cannot write checkpoint {path}: {' '.join(str(e).split())[:160]}; the previous "
                              "checkpoint is kept (free some space, then --resume)") from None


def state_digest(state: dict) -> str:
    """SHA-256 of a checkpoint's contents as loaded: every tensor's dtype, shape and bytes and every
    plain value, in order, without the `digest` field itself. Computed over what torch.load gives back
    rather than over the file's bytes, so the digest can live inside the file it checks."""
    h = hashlib.sha256()

    def walk(obj) -> None:
        if isinstance(obj, torch.Tensor):
            t = obj.detach().cpu().contiguous().reshape(-1)
            h.update(f"T{t.dtype}{tuple(obj.shape)}".encode())
            h.update(t.view(torch.uint8).numpy())
        elif isinstance(obj, dict):
            h.update(b"{")
            for k, v in obj.items():
                if k != "digest" or obj is not state:
                    h.update(repr(k).encode() + b":")
                    walk(v)
            h.update(b"}")
        elif isinstance(obj, (list, tuple)):
            h.update(b"[")
            for v in obj:
                walk(v)
            h.update(b"]")
        else:
            h.update(f"{type(obj).__name__}:{obj!r},".encode())

    walk(state)
    return h.hexdigest()


_TYPES = {"format": int, "step": int, "tokens_seen": int, "wall_s": float, "config": str, "metrics_bytes": int,
          "metrics_sha256": str, "model": dict, "optimizers": list, "rng": dict}

# What torch's weights-only unpickler says when a file asks for more than tensors and plain data.
_UNSAFE = re.compile(r"GLOBAL (\S+)|Can only (?:create new object|build)|unrecognized function|persistent_load")


def load_checkpoint(path: Path) -> dict:
    """Read a checkpoint without ever unpickling arbitrary objects; DataError (one line) if it is unsafe,
    corrupt, truncated, fails its digest or is not a RankProbe checkpoint."""
    try:
        with warnings.catch_warnings():  # torch warns about odd files; the one-line error below says it all
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any failure to parse means the same thing here: the file cannot be used
        raise _load_error(path, e) from None
    missing = [k for k, tp in _TYPES.items() if not isinstance(state, dict) or not isinstance(state.get(k), tp)]
    if not missing and not isinstance(state["rng"].get("torch"), torch.Tensor):
        missing = ["rng.torch"]
    if missing:
        raise DataError(f"{path} is not a RankProbe checkpoint (missing or wrong: {', '.join(missing)})")
    if state["format"] != FORMAT:
        raise DataError(f"checkpoint {path} has format {state['format']}; this rankprobe reads format {FORMAT}")
    if "digest" not in state:
        log.warning("%s has no digest (written by an older rankprobe): its contents cannot be verified", path)
    elif state["digest"] != state_digest(state):
        raise DataError(f"checkpoint {path} fails its SHA-256 check (changed since it was written: a flipped bit "
                        "or an edit); delete it or start over with --force")
    try:
        config = json.loads(state["config"])
    except (ValueError, RecursionError):
        config = None
    if not isinstance(config, dict):
        raise DataError(f"checkpoint {path} is not a RankProbe checkpoint (its config is not a JSON table)")
    return state


def _load_error(path: Path, e: Exception) -> DataError:
    """The one line for a checkpoint torch.load refused: unsafe (it asked for code), or unreadable."""
    text = " ".join(str(e).split())
    unsafe = _UNSAFE.search(text)
    if unsafe:
        what = f"a {unsafe.group(1)} object" if unsafe.group(1) else "objects"
        return DataError(f"refusing to load checkpoint {path}: its pickle asks to build {what}, not just tensors "
                         "(a tampered or foreign file; nothing in it was run); delete it or start over with --force")
    reason = re.search(r"WeightsUnpickler error: (.*?)(?: Check the documentation|$)", text)
    detail = reason.group(1) if reason else (text.split(". ")[0] or type(e).__name__)
    return DataError(f"checkpoint {path} is corrupt or truncated ({detail[:120]}); delete it or start over "
                     "with --force")


def check_state(state: dict, sched, layout: dict[str, tuple[tuple[int, ...], torch.dtype]], path: Path) -> None:
    """Every field of a loaded checkpoint fits the run `sched` (a loop.Schedule) describes and the model
    whose tensors `layout` gives (name -> shape, dtype), before anything in the folder is changed."""
    def bad(what: str) -> DataError:
        return DataError(f"checkpoint {path} is not usable: {what}; delete it or start over with --force")

    step, tokens = state["step"], state["tokens_seen"]
    if not 0 <= step <= sched.total_steps:
        raise bad(f"step {step} lies outside this run's 0..{sched.total_steps}")
    if tokens != step * sched.tokens_per_step:
        raise bad(f"tokens_seen {tokens} is not step {step} x {sched.tokens_per_step} tokens a step")
    if not (math.isfinite(state["wall_s"]) and state["wall_s"] >= 0) or state["metrics_bytes"] < 0 \
            or not re.fullmatch(r"[0-9a-f]{64}", state["metrics_sha256"]):
        raise bad("wall_s, metrics_bytes or metrics_sha256 is out of range")
    timing = state.get("timing", {})
    if not isinstance(timing, dict) or not all(
            isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            for k, v in timing.items()):
        raise bad("timing is not a table of seconds")
    if not _pending_ok(state.get("pending_rows", "[]")):
        raise bad("pending_rows is not a JSON list of [step, rows]")
    saved = {k: (tuple(v.shape), v.dtype) if isinstance(v, torch.Tensor) else None for k, v in state["model"].items()}
    if saved != layout:
        key = next(k for k in sorted(set(saved) | set(layout)) if saved.get(k) != layout.get(k))
        raise bad(f"model tensor {key} is {_layout(saved.get(key))} there, {_layout(layout.get(key))} in this model")
    rng, cuda = state["rng"]["torch"], state["rng"].get("cuda", [])
    if rng.dtype != torch.uint8 or rng.shape != torch.get_rng_state().shape or not isinstance(cuda, list) or \
            not all(isinstance(t, torch.Tensor) and t.dtype == torch.uint8 and t.ndim == 1 for t in cuda):
        raise bad("its random-number-generator state has the wrong shape or type")
    if not all(isinstance(o, dict) and isinstance(o.get("state"), dict) and isinstance(o.get("param_groups"), list)
               for o in state["optimizers"]):
        raise bad("an optimizer state is not a torch optimizer state dict")


def _pending_ok(text) -> bool:
    try:
        rows = json.loads(text) if isinstance(text, str) else None
    except (ValueError, RecursionError):
        return False
    return isinstance(rows, list) and all(
        isinstance(r, list) and len(r) == 2 and isinstance(r[0], int) and isinstance(r[1], list)
        and all(isinstance(x, dict) for x in r[1]) for r in rows)


def _layout(entry) -> str:
    return "absent" if entry is None else f"{entry[1]} {list(entry[0])}".replace("torch.", "")


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
# the metrics file at the checkpoint


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
    tail = metrics_path.read_bytes()[n:]
    torn = tail.rsplit(b"\n", 1)[-1]  # a write cut off by the crash: no newline at its end
    if torn:
        log.warning("%s: dropped a torn last line of %d bytes (a crash mid-write?)", metrics_path, len(torn))
    os.truncate(metrics_path, n)
    return tail.count(b"\n")

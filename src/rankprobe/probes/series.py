"""Checkpoint series for `rankprobe probe`: which folders, at which step, after how many tokens.

A series is given as folders, globs, or a parent folder whose children are checkpoints: Hugging Face
Trainer `checkpoint-N` folders (their `trainer_state.json` holds `global_step` and, when the run
counted them, `num_input_tokens_seen`), Pythia-style `step1000` names, OLMo's `stage1-step1000-tokens5B`,
and a Hugging Face cache folder of revisions (snapshots/<commit>, named by refs/step1000). The step
comes from the trainer state, else from the folder's name (a link's own, then its target's, then the
cache's refs); the token count from the trainer state, or `--tokens-per-step` × step when given. A
single checkpoint without either sits at step 0, tokens 0, as before.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..config import DataError
from ..files import read_regular

log = logging.getLogger(__name__)
STEP_NAME = re.compile(r"(?:checkpoint|global_step|step|iter)[-_]?(\d+)")
# OLMo's revisions (stage1-step1000-tokens5B). A later stage restarts its steps: ordered by step, its
# checkpoints would sit among stage 1's, so those names are recognised only to be refused.
OLMO_NAME = re.compile(r"(?:stage1-)?step(\d+)-tokens\d+[KMBT]?")
LATER_STAGE = re.compile(r"stage(?!1-)\d+-.*step\d+.*")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    step: int
    tokens: int


def _trainer_state(path: Path) -> dict:
    """The folder's trainer_state.json, {} when there is none or it is torn; DataError for a state of
    another shape (a count that is not a whole number, a log entry that is not a table)."""
    file = path / "trainer_state.json"
    if not file.exists():
        return {}
    try:  # read_regular: a FIFO under the name would block for ever
        state = json.loads(read_regular(file, "trainer state", DataError, limit=1 << 28))
    except (ValueError, RecursionError):
        return {}
    history = state.get("log_history", []) if isinstance(state, dict) else None
    if not isinstance(history, list) or not all(isinstance(e, dict) for e in history):
        raise DataError(f"{file} is not a Trainer state (a table with a list of log entries)")
    for key in ("global_step", "num_input_tokens_seen"):
        if state.get(key) is not None and not _count(state[key]):
            raise DataError(f"{file}: {key} {state[key]!r} is not a whole number of 0 or more")
    return state


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def name_step(name: str) -> int | None:
    """The step a checkpoint's name gives (checkpoint-N, stepN, iter_N, OLMo's stage1-stepN-tokensNB)."""
    m = STEP_NAME.fullmatch(name) or OLMO_NAME.fullmatch(name)
    return int(m.group(1)) if m else None


def _cache_refs(path: Path) -> list[str]:
    """The revisions naming `path` when it is a snapshot of the Hugging Face cache: snapshot_download(repo,
    revision="step1000") keeps the files in snapshots/<commit> and the name in refs/step1000."""
    if path.parent.name != "snapshots":
        return []
    try:
        return sorted(r.name for r in (path.parent.parent / "refs").iterdir()
                      if r.is_file() and r.stat().st_size < 256 and r.read_text().strip() == path.name)
    except (OSError, UnicodeDecodeError):
        return []


def _step_and_tokens(path: Path, names: list[str]) -> tuple[int | None, int | None]:
    """(step, tokens seen) from the trainer state, else the step from the first of `names` that gives one
    (the folder as the user named it: a link keeps its own name). A count logged at another step is not
    this checkpoint's."""
    state = _trainer_state(path)
    step = state.get("global_step")
    if step is None:
        step = next((s for s in map(name_step, names) if s is not None), None)
    tokens = state.get("num_input_tokens_seen") or next(  # 0 is the Trainer's default when it does not count
        (e["num_input_tokens_seen"] for e in reversed(state.get("log_history", []))
         if e.get("step") == step and _count(e.get("num_input_tokens_seen")) and e["num_input_tokens_seen"]), None)
    return step, tokens


def _expand(spec: str) -> list[Path]:
    """One command-line checkpoint: a folder, a glob, or a folder of checkpoint folders (absolute,
    links not followed, so a step folder linked into a download cache keeps its name)."""
    matches = sorted(glob.glob(spec)) if glob.has_magic(spec) else [spec]
    if not matches:
        raise DataError(f"no checkpoint folder matches {spec}")
    out = []
    for m in (Path(os.path.abspath(m)) for m in matches):
        if not m.is_dir():
            raise DataError(f"checkpoint {m} is not a folder (a Hugging Face model folder or a RankProbe run)")
        if glob.has_magic(spec) and (m / "metrics.jsonl").is_file():  # `probe DIR/step1000` wrote step1000-probe
            log.warning("%s holds RankProbe metrics, not a checkpoint: passed over", m)
            continue
        named = [c for c in m.iterdir() if name_step(c.name) is not None or LATER_STAGE.fullmatch(c.name)]
        dangling = [c for c in named if c.is_symlink() and not c.exists()]
        if dangling:  # its target removed (a cleaned download cache): the trajectory would lose it unsaid
            raise DataError(f"{dangling[0]} is a link to {os.readlink(dangling[0])}, which does not exist")
        children = sorted(c for c in named if c.is_dir())
        if (m / "config.json").is_file():  # a model; DeepSpeed keeps its optimizer shards in global_stepN/ inside
            children = [c for c in children if (c / "config.json").is_file()]
            if children:  # trainer.save_model() puts the final model beside its checkpoints
                log.warning("%s holds a model of its own beside %d checkpoint folders (%s, ...): probing the "
                            "checkpoints (that model has no step; copy it to a folder of its own to probe it "
                            "alone)", m, len(children), children[0].name)
        elif not children and (m / "snapshots").is_dir():  # a repo in the Hugging Face cache
            later = [r for c in (m / "snapshots").iterdir() for r in _cache_refs(c) if LATER_STAGE.fullmatch(r)]
            if later:  # its steps start again: it would sit among stage 1's steps as if one run
                raise DataError(f"{m} holds revision {later[0]}, a later training stage whose steps start "
                                "again: probe each stage as a series of its own")
            children = sorted(c for c in (m / "snapshots").iterdir()
                              if c.is_dir() and any(name_step(r) is not None for r in _cache_refs(c)))
        if not children:
            out.append(m)
            continue
        for c in children:  # a checkpoint-N still being written (or a broken copy) would drop out unsaid
            if (c / "adapter_config.json").is_file() and not (c / "config.json").is_file():
                raise DataError(f"{c} holds a PEFT adapter, not a model: merge it into its base model "
                                "(merge_and_unload) and save that to probe it")
            if not (c / "config.json").is_file():
                raise DataError(f"{c} has no config.json (a checkpoint not fully written?); remove it or name "
                                "the checkpoints to probe")
        out += children
    if not out:  # every match was an earlier probe's folder
        raise DataError(f"no checkpoint folder matches {spec}, only RankProbe probe folders")
    return out


def find_checkpoints(specs: list[str], tokens_per_step: int | None = None) -> list[Checkpoint]:
    """The checkpoints named by `specs`, ordered by step; DataError when a series member's step or
    token count cannot be told, two of them share a step, or the token count goes backwards.
    `tokens_per_step`, when given, sets every token count (a recorded count that differs is said)."""
    if tokens_per_step is not None and tokens_per_step <= 0:
        raise DataError("--tokens-per-step must be positive")
    paths: dict[Path, Path] = {}  # the folder itself -> the name it was first given under
    for p in (p for spec in specs for p in _expand(str(spec))):
        paths.setdefault(p.resolve(), p)
    found, differ = [], []
    for real, path in paths.items():
        step, recorded = _step_and_tokens(path, [path.name, real.name, *_cache_refs(real)])
        if LATER_STAGE.fullmatch(path.name) and len(paths) > 1:
            raise DataError(f"{path} is a later training stage, whose steps start again: probe each stage as a "
                            "series of its own")
        if step is None and len(paths) > 1:
            raise DataError(f"cannot tell the training step of {path}: name it checkpoint-N or stepN, "
                            "or keep its trainer_state.json")
        step = step or 0
        tokens = recorded if tokens_per_step is None else step * tokens_per_step
        if recorded is not None and tokens != recorded:
            differ.append(f"{path.name} {recorded:,}")
        if tokens is None and len(paths) > 1:
            raise DataError(f"{path} does not record the tokens it was trained on; give --tokens-per-step")
        found.append(Checkpoint(path, step, int(tokens or 0)))
    if differ:
        log.warning("--tokens-per-step %d sets every token count; the trainer states recorded others (%s)",
                    tokens_per_step, ", ".join(differ[:3]) + (", ..." if len(differ) > 3 else ""))
    found.sort(key=lambda c: c.step)
    for a, b in zip(found, found[1:]):
        if a.step == b.step:
            raise DataError(f"{a.path} and {b.path} are both at step {a.step}")
        if b.tokens < a.tokens:
            raise DataError(f"{b.path} (step {b.step}) records fewer tokens ({b.tokens:,}) than {a.path} (step "
                            f"{a.step}, {a.tokens:,}): a counter that restarted? give --tokens-per-step")
    return found


def default_out(series: list[Checkpoint]) -> Path:
    """Where a probe goes without --out: beside one checkpoint, beside the folder holding a series, and for
    revisions in the Hugging Face cache in the current folder (never inside the cache)."""
    first = series[0].path
    if first.parent.name == "snapshots" and first.parent.parent.name.startswith("models--"):
        return Path.cwd() / f"{first.parent.parent.name.removeprefix('models--')}-probe"
    if len(series) == 1:
        return first.parent / f"{first.name}-probe"
    return first.parent.parent / f"{first.parent.name}-probe"


def sha256_files(files: list[Path]) -> str:
    """One SHA-256 over the names and contents of `files`, in name order (read in 1 MiB blocks)."""
    h = hashlib.sha256()
    for f in sorted(files, key=lambda f: f.name):
        h.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            while block := fh.read(1 << 20):
                h.update(block)
    return h.hexdigest()


def weight_files(path: Path) -> list[Path]:
    return [f for f in path.iterdir() if f.is_file() and f.suffix in WEIGHT_SUFFIXES and not f.name.startswith(
        ("optimizer", "scheduler", "scaler", "rng_state", "training_args", "checkpoint"))]


_DTYPE_NAMES = {"BF16": "bf16", "F16": "fp16", "F32": "fp32", "F64": "fp64"}


def stored_dtype(files: list[Path]) -> str | None:
    """The floating dtype the weights were saved in ("bf16", "fp32", "bf16+fp32" when mixed), from the
    safetensors headers alone (nothing loaded); None for pickle weights, which say it only when loaded."""
    found = set()
    for f in files:
        if f.suffix != ".safetensors":
            return None
        try:
            with open(f, "rb") as fh:
                size = int.from_bytes(fh.read(8), "little")
                header = json.loads(fh.read(size)) if 0 < size <= 1 << 27 else {}
        except (OSError, ValueError, RecursionError):
            return None  # loading the weights says what is wrong with them
        if not isinstance(header, dict):
            return None
        found |= {_DTYPE_NAMES[v["dtype"]] for k, v in header.items()
                  if k != "__metadata__" and isinstance(v, dict) and v.get("dtype") in _DTYPE_NAMES}
    return "+".join(sorted(found)) or None

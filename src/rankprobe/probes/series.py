"""Checkpoint series for `rankprobe probe`: which folders, at which step, after how many tokens.

A series is given as folders, globs, or a parent folder whose children are checkpoints: Hugging Face
Trainer `checkpoint-N` folders (their `trainer_state.json` holds `global_step` and, when the run
counted them, `num_input_tokens_seen`) and Pythia-style `step1000` names. The step comes from the
trainer state, else from the folder name; the token count from the trainer state, else from
`--tokens-per-step` × step. A single checkpoint without either sits at step 0, tokens 0, as before.
"""

from __future__ import annotations

import glob
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from ..config import DataError

STEP_NAME = re.compile(r"(?:checkpoint|global_step|step|iter)[-_]?(\d+)")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    step: int
    tokens: int


def _trainer_state(path: Path) -> dict:
    try:
        return json.loads((path / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return {}


def _step_and_tokens(path: Path) -> tuple[int | None, int | None]:
    state = _trainer_state(path)
    step = state.get("global_step")
    tokens = state.get("num_input_tokens_seen") or next(
        (e["num_input_tokens_seen"] for e in reversed(state.get("log_history", [])) if e.get("num_input_tokens_seen")),
        None)
    if step is None:
        m = STEP_NAME.fullmatch(path.name)
        step = int(m.group(1)) if m else None
    return step, tokens


def _expand(spec: str) -> list[Path]:
    """One command-line checkpoint: a folder, a glob, or a folder of checkpoint folders."""
    matches = sorted(glob.glob(spec)) if glob.has_magic(spec) else [spec]
    if not matches:
        raise DataError(f"no checkpoint folder matches {spec}")
    out = []
    for m in map(Path, matches):
        if not m.is_dir():
            raise DataError(f"checkpoint {m} is not a folder (a Hugging Face model folder or a RankProbe run)")
        children = [] if (m / "config.json").is_file() else sorted(
            c for c in m.iterdir() if c.is_dir() and STEP_NAME.fullmatch(c.name) and (c / "config.json").is_file())
        out += children or [m]
    return out


def find_checkpoints(specs: list[str], tokens_per_step: int | None = None) -> list[Checkpoint]:
    """The checkpoints named by `specs`, ordered by step; DataError when a series member's step or
    token count cannot be told, or two of them share a step."""
    paths = list(dict.fromkeys(p.resolve() for spec in specs for p in _expand(str(spec))))
    if tokens_per_step is not None and tokens_per_step <= 0:
        raise DataError("--tokens-per-step must be positive")
    found = []
    for path in paths:
        step, tokens = _step_and_tokens(path)
        if step is None and len(paths) > 1:
            raise DataError(f"cannot tell the training step of {path}: name it checkpoint-N or stepN, "
                            "or keep its trainer_state.json")
        step = step or 0
        if tokens is None and tokens_per_step is not None:
            tokens = step * tokens_per_step
        if tokens is None and len(paths) > 1:
            raise DataError(f"{path} does not record the tokens it was trained on; give --tokens-per-step")
        found.append(Checkpoint(path, step, int(tokens or 0)))
    found.sort(key=lambda c: c.step)
    for a, b in zip(found, found[1:]):
        if a.step == b.step:
            raise DataError(f"{a.path} and {b.path} are both at step {a.step}")
    return found


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
        ("optimizer", "scheduler", "rng_state", "training_args", "checkpoint"))]

"""The run folder's format, owned in one place: file names, the rows of metrics.jsonl, a run's status,
atomic writes and the folder lock. No torch import, so reports and sweeps read folders without it.

A run folder holds `metrics.jsonl` (docs/metrics.md; a published one may be `metrics.jsonl.xz` or
`.gz` instead), `config.json`, `env.json`, `model.safetensors` when finished, `checkpoint.pt` while it
can be resumed, and `.rankprobe.lock`. Training, sweeps, scans, probes, reports and the CLI all ask
this module what a folder holds and whether its run has ended, so they can never disagree about it:

- **Rows.** One JSON object a line, appended and flushed by `MetricsWriter`. A crash mid-write can
  leave the last line torn: the one rule, in `parse_rows`, drops a last line that is not a JSON object
  (with a warning); any other bad line is an error naming file and line.
- **Status** (`status_of`): `empty` (no rows), `cut off` (rows but no `end` row: resumable),
  `finished`, or `diverged` (an `end` row with that status). `finished` and `diverged` have *ended*.
- **Writes.** Whole files go through `atomic_file`: a uniquely named temporary file created
  exclusively in the same folder (never through a link someone planted), fsynced on request and
  renamed into place, and removed if anything fails.
"""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import json
import lzma
import math
import os
import tempfile
import typing
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import BinaryIO

from .errors import ConfigError, FolderError, MetricsError
from .files import read_regular

METRICS = "metrics.jsonl"
METRICS_NAMES = (METRICS, f"{METRICS}.gz", f"{METRICS}.xz")
"""a run's metrics, plain or compressed for publishing; a folder holding both reads the plain one"""
_DECOMPRESS = {".gz": gzip.decompress, ".xz": lzma.decompress}
CHECKPOINT = "checkpoint.pt"
LOCK = ".rankprobe.lock"
CONFIG = "config.json"
ENV = "env.json"
WEIGHTS = "model.safetensors"
OUTPUTS = (*METRICS_NAMES, CHECKPOINT, WEIGHTS, CONFIG, ENV)
"""what a fresh run clears from its folder, so nothing of an old run lingers beside the new"""

SCHEMA_VERSION = 1
# Fields that hold wall-clock seconds: they differ between otherwise identical runs. The `end` row
# splits a run's wall time into set-up, the first step (compiling), evals, probes and checkpoint
# writes; the rest is training steps. probe_wait_s is the part of probe_s spent waiting for the
# weight spectra's worker thread.
PHASE_FIELDS = ("setup_s", "first_step_s", "eval_s", "probe_s", "checkpoint_s")
WALL_CLOCK_FIELDS = ("wall_s", "step_time_s", *PHASE_FIELDS, "probe_wait_s")

EXIT_DIVERGED = 1
"""exit code of `rankprobe train` for a run that diverged: recorded (an `end` row), but without a result"""

ENDED = ("finished", "diverged")


# ---------------------------------------------------------------------------------------------
# the run row


@dataclass
class RunHeader:
    """The `run` row every metrics.jsonl starts with (docs/metrics.md): who made the run and how."""

    run: str
    arm: str
    optimizer: str
    qk_norm: bool
    seed: int
    config: dict
    env: dict
    n_params: int
    head_dim: int
    n_layer: int
    probe_checkpoints: list[int]
    data: dict
    param_groups: dict = field(default_factory=dict)
    ns_dtype: str | None = None
    source: dict | None = None
    """probed checkpoints only (`rankprobe probe`): where the model came from"""
    extra: dict = field(default_factory=dict)
    """fields only some runs have (a probed checkpoint's seq_len, dtype, checkpoints, series)"""
    schema: int = SCHEMA_VERSION

    def row(self) -> dict:
        """The row's fields; `source` only where there is one (its presence marks a probed checkpoint)."""
        fields = asdict(self)
        extra = fields.pop("extra")
        if fields["source"] is None:
            del fields["source"]
        return {"schema": fields.pop("schema"), **fields, **extra}


# ---------------------------------------------------------------------------------------------
# folder names


def check_name(name: str, key: str = "name") -> None:
    """`name` becomes a folder under `out`: it must be one plain path component, so that no run ever
    writes outside the folder it was given."""
    if not name or name in (".", "..") or any(c in "/\\" or ord(c) < 32 for c in name):  # NUL is below 32
        raise ConfigError(f"{key} must be a plain folder name (no '/', '\\', '..', or control characters); "
                          f"got {name!r}")


def safe_name(text: str) -> str:
    """`text` as one plain path component: separators, '%' and control characters percent-escaped,
    and a leading '.' too (so '..' cannot come out). For run names built from values, e.g. a scan's
    'data.corpus=../x' -> 'data.corpus=..%2Fx'."""
    out = "".join(f"%{ord(c):02X}" if c in "/\\%" or ord(c) < 32 else c for c in text)
    return "%2E" + out[1:] if out.startswith(".") else out


# ---------------------------------------------------------------------------------------------
# reading rows, and a run's status


def parse_rows(data: bytes | str, path: Path | str) -> list[dict]:
    """The rows of a metrics file's contents. A last line that is not a JSON object is a write cut off
    by a crash: dropped with a warning. Any other such line raises MetricsError naming file and line."""
    text = data.decode("utf-8", errors="strict") if isinstance(data, bytes) else data
    numbered = [(i + 1, line) for i, line in enumerate(text.splitlines()) if line.strip()]
    rows, monitor = [], False
    for k, (lineno, line) in enumerate(numbered):
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError(f"expected a JSON object, got {type(row).__name__}")
        except (ValueError, RecursionError) as e:
            if k == len(numbered) - 1:
                warnings.warn(f"{path}: dropped torn last line {lineno} (a crash mid-write?)", stacklevel=3)
                break
            raise MetricsError(f"{path}, line {lineno}: corrupt metrics row ({str(e)[:80]})") from None
        problem = row_problem(row, untimed=monitor)
        if problem:
            raise MetricsError(f"{path}, line {lineno}: bad metrics row ({problem}); see docs/metrics.md")
        if not rows and row.get("kind") == "run":
            monitor = (row.get("source") or {}).get("kind") == "monitor"
        rows.append(row)
    return rows


# The types of the fields docs/metrics.md gives, per kind: a row whose field has another type is refused
# with its file and line (a reader further on would fail on it with a traceback, or silently misdraw).
# Unknown kinds and keys pass (later versions add them). "num": a number, or null for NaN/inf.
_AT = {"step": "int", "tokens": "int"}
_LAYER_AND_HEADS = (("", "num"), ("_heads", "nums"))  # a layer's value, and one per head
_KINDS = {
    "run": {"schema": "int", "run": "str", "arm": "str", "optimizer": "str", "qk_norm": "bool", "seed": "int",
            "config": "dict", "env": "dict", "n_params": "int", "param_groups": "dict", "ns_dtype": "str?",
            "head_dim": "int", "n_layer": "int", "probe_checkpoints": "ints", "data": "dict", "source": "dict",
            "series": "dict", "checkpoints": "list", "seq_len": "int", "max_positions": "int", "dtype": "str"},
    "train": {**_AT, "loss": "num", "lr_scale": "num", "grad_norm": "num", "step_time_s": "num",
              "qk_clipped": "int"},
    "eval": {**_AT, "val_loss": "num", "val_tokens": "int"},
    "probe": {**_AT, "tap": "str", "tensor": "str", "layer": "int", "n": "int", "dim": "int",
              **{f"{m}{x}": t for m in ("pr", "erank", "stable_rank", "rankme")
                 for x, t in (("", "num"), ("_heads", "nums"), ("_null", "num"))}, "mean_norm": "nums"},
    "attn": {**_AT, "layer": "int", "n_rows": "int", "seq_len": "int", "entropy_max": "num",
             **{f"{m}{x}": t for m in ("entropy", "entropy_norm", "max_logit") for x, t in _LAYER_AND_HEADS}},
    "weights": {**_AT, "layer": "int", "matrix": "str", "shape": "ints",
                **{f"{m}{x}": t for m in ("spectral_norm", "stable_rank", "erank") for x, t in _LAYER_AND_HEADS}},
    "update": {**_AT, "layer": "int", "matrix": "str", "update_rms": "num", "update_rel": "num"},
    "end": {**_AT, "wall_s": "num", "status": "str", "reason": "str", "loss": "num", "checkpoint_step": "int?",
            **dict.fromkeys(PHASE_FIELDS + ("probe_wait_s",), "num")},
}
# The fields a reader indexes directly in rows of these kinds (the run, train and end rows are read
# field by field with defaults, and rows of older versions lack some fields).
_REQUIRED = {"eval": ("step", "tokens", "val_loss"), "probe": ("step", "tokens", "tap", "tensor", "layer", "pr"),
             "attn": ("step", "tokens", "layer"), "weights": ("step", "tokens", "layer", "matrix"),
             "update": ("step", "tokens", "layer", "matrix")}


def _is(value, kind: str) -> bool:
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
    integer = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731
    return {"int": integer, "str": lambda v: isinstance(v, str), "bool": lambda v: isinstance(v, bool),
            "dict": lambda v: isinstance(v, dict), "list": lambda v: isinstance(v, list),
            "num": lambda v: v is None or number(v), "str?": lambda v: v is None or isinstance(v, str),
            "int?": lambda v: v is None or integer(v),
            "ints": lambda v: isinstance(v, list) and all(integer(x) for x in v),
            "nums": lambda v: isinstance(v, list) and all(x is None or number(x) for x in v)}[kind](value)


def row_problem(row: dict, untimed: bool = False) -> str | None:
    """What is wrong with a parsed row's fields (docs/metrics.md), or None. `untimed`: the row is from a
    Monitor folder, where `tokens` is null when the caller's loop gave no token count."""
    kind = row.get("kind")
    if not isinstance(kind, str):
        return "no string `kind`"
    types = _KINDS.get(kind, {})
    for key in _REQUIRED.get(kind, ()):
        if key not in row:
            return f"a {kind} row without `{key}`"
    for key, value in row.items():
        if key in types and not _is(value, types[key]) and not (untimed and key == "tokens" and value is None):
            return f"`{key}` of a {kind} row is {json.dumps(value)[:40]}, not {types[key].rstrip('?')}"
    return _config_problem(row["config"]) if kind == "run" and "config" in row else None


def _config_problem(config: dict) -> str | None:
    """A run row's `config` must have the config tree's shape where it has its keys (older runs lack some)."""
    from .config import Config, all_keys  # here: config imports this module

    sections = {name: tp for name, tp in typing.get_type_hints(Config).items() if is_dataclass(tp)}
    for name, value in config.items():
        if name in sections and not isinstance(value, dict):
            return f"`config.{name}` is {json.dumps(value)[:40]}, not a table"
    for key in all_keys():
        section, _, leaf = key.partition(".")
        if section not in sections or leaf not in config.get(section, {}):
            continue
        tp = typing.get_type_hints(sections[section])[leaf]
        origin = typing.get_origin(tp) or tp
        want = {int: "int", float: "num", str: "str", bool: "bool", list: "list", tuple: "list", dict: "dict"}[origin]
        if not _is(config[section][leaf], want):
            return f"`config.{key}` is {json.dumps(config[section][leaf])[:40]}, not {want}"
    return None


def read_rows(path: str | Path) -> list[dict]:
    """The rows of one metrics.jsonl (or .jsonl.gz / .jsonl.xz), a regular file (`read_regular`); see `parse_rows`."""
    path = Path(path)
    data = read_regular(path, "metrics file", MetricsError)  # a FIFO under the name would block for ever
    try:
        if path.suffix in _DECOMPRESS:
            data = _DECOMPRESS[path.suffix](data)
        return parse_rows(data, path)
    except (OSError, UnicodeDecodeError, EOFError, lzma.LZMAError) as e:  # a bad gzip is OSError or EOFError
        raise MetricsError(f"cannot read metrics file {path}: {e}") from None


def metrics_file(run_dir: str | Path) -> Path | None:
    """The file holding a run folder's metrics: the plain one, else a compressed archive; None if none."""
    return next((p for p in (Path(run_dir) / n for n in METRICS_NAMES) if p.is_file()), None)


def run_rows(run_dir: str | Path) -> list[dict]:
    """Every row of a run folder's metrics ([] when it has none yet)."""
    path = metrics_file(run_dir)
    return read_rows(path) if path is not None else []


def header(rows: list[dict]) -> dict | None:
    """The `run` row the rows start with, or None."""
    return rows[0] if rows and rows[0].get("kind") == "run" else None


def end_of(rows: list[dict]) -> dict | None:
    """The `end` row, if the rows end with one."""
    return rows[-1] if rows and rows[-1].get("kind") == "end" else None


def status_of(rows: list[dict]) -> str:
    """'empty', 'cut off' (no `end` row yet), or the `end` row's status: 'finished' or 'diverged'."""
    if not rows:
        return "empty"
    end = end_of(rows)
    if end is None:
        return "cut off"
    return str(end.get("status") or "finished")


def run_status(run_dir: str | Path) -> str:
    """`status_of` the run in `run_dir`, archived or not."""
    return status_of(run_rows(run_dir))


# ---------------------------------------------------------------------------------------------
# writing


def finite(v):
    """JSON has no NaN or infinity: write them as null."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, list):
        return [finite(x) for x in v]
    return v


class MetricsWriter:
    """Append-only JSONL, one whole line per row, NaN/inf written as null, each row also handed to
    `mirrors` (callables of (kind, row): rankprobe.sinks).

    Tracks the file's byte length and SHA-256 as it grows: a checkpoint records both, so a resume can
    prove the file is the one it saw and cut it back to that point. A write that fails (a full disk)
    cuts the file back to its last whole row and raises FolderError: never a torn line. The file is
    opened without following a link planted under its name.
    """

    def __init__(self, path: Path, mirrors: tuple = ()):
        self.path = Path(path)
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as e:
            raise FolderError(f"cannot open {path}: {e.strerror or e} (a link or a folder in its place?)") from None
        self.bytes = os.fstat(self.fd).st_size
        self.hash = hashlib.sha256()
        for offset in range(0, self.bytes, 1 << 20):
            self.hash.update(os.pread(self.fd, 1 << 20, offset))
        self.mirrors = mirrors

    def write(self, kind: str, **row) -> None:
        row = {"kind": kind, **{k: finite(v) for k, v in row.items()}}
        line = (json.dumps(row) + "\n").encode()
        try:
            view = memoryview(line)
            while view:
                view = view[os.write(self.fd, view):]
        except OSError as e:
            os.ftruncate(self.fd, self.bytes)  # the last whole row stays the last line
            raise FolderError(f"cannot write to {self.path}: {e.strerror or e}; the run stopped after its last "
                              "whole row (free some space, then --resume)") from None
        self.hash.update(line)
        self.bytes += len(line)
        for mirror in self.mirrors:
            mirror(kind, row)

    def close(self) -> None:
        os.close(self.fd)
        for mirror in self.mirrors:
            getattr(mirror, "close", lambda: None)()


class NullWriter:
    """What the ranks other than 0 of a DDP run write to: nothing (only rank 0 touches the run folder)."""

    def write(self, kind: str, **row) -> None:
        pass

    def close(self) -> None:
        pass


@contextmanager
def atomic_file(path: str | Path, fsync: bool = False, mode: int = 0o644) -> Iterator[Path]:
    """Yield a fresh temporary path beside `path`; when the block ends, rename it over `path`.

    The temporary file is created exclusively under a unique name (so a link planted under any name
    is never written through) and removed if the block fails, so readers see the old file or the
    whole new one. `fsync`: force the data and the rename to disk (a power cut keeps one or the other).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(name)
    try:
        os.fchmod(fd, mode)  # mkstemp makes 0600; a cache folder may be shared between users
        os.close(fd)
        yield tmp
        if fsync:
            _fsync(tmp, os.O_RDONLY)
        os.replace(tmp, path)
        if fsync:
            _fsync(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: str | Path, data: bytes | str | Callable[[BinaryIO], None], fsync: bool = False) -> None:
    """Write `data` (bytes, text, or a function writing to a binary file) to `path` through `atomic_file`."""
    with atomic_file(path, fsync=fsync) as tmp, open(tmp, "wb") as f:
        if callable(data):
            data(f)
        else:
            f.write(data.encode() if isinstance(data, str) else data)


def write_json(path: str | Path, obj) -> None:
    """`obj` as indented JSON, atomically."""
    write_atomic(path, json.dumps(obj, indent=2) + "\n")


def _fsync(path: Path, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def is_run(folder: str | Path) -> bool:
    """Whether `folder` holds a RankProbe run: a metrics file that starts with a `run` row, or (a run
    killed before its first row was whole) an empty one beside nothing but RankProbe's own files."""
    folder = Path(folder)
    path = metrics_file(folder)
    if path is None:
        return False
    with warnings.catch_warnings(action="ignore"):  # a torn last line is the reader's to report, once
        rows = read_rows(path)
    if header(rows) is not None:
        return True
    own = {*OUTPUTS, LOCK, "tensorboard"}
    return not rows and all(p.name in own or _is_temp(p) for p in folder.iterdir())


def _is_temp(path: Path) -> bool:
    return path.name.startswith(".") and path.name.endswith(".tmp")


def first_missing(folder: str | Path) -> Path | None:
    """The topmost folder on the way to `folder` that does not exist yet (what creating it creates)."""
    folder, top = Path(folder).absolute(), None
    while not folder.exists() and not folder.is_symlink() and folder != folder.parent:
        folder, top = folder.parent, folder
    return top


def remove_unused(folder: str | Path, top: Path) -> None:
    """Undo the creation of `folder` (and its parents up to `top`) by a run that failed before writing
    anything of its own: only the lock, temporary files and empty folders are removed, so a folder
    holding anything else stays as it is."""
    folder = Path(folder).absolute()
    try:
        held = list(folder.iterdir())
        empty_dir = lambda p: p.is_dir() and not p.is_symlink() and not any(p.iterdir())  # noqa: E731
        if not all(p.name == LOCK or _is_temp(p) or empty_dir(p) for p in held):
            return
        for p in held:
            p.rmdir() if empty_dir(p) else p.unlink()
        while True:
            folder.rmdir()
            if folder == top or folder.parent == folder:
                break
            folder = folder.parent
    except OSError:
        pass  # something else lives there: keep it


def stale_temp_files(folder: Path, name: str) -> list[Path]:
    """Temporary files `atomic_file` left for `name` in `folder` (a kill mid-write); safe to remove."""
    return sorted(Path(folder).glob(f".{name}.*.tmp"))


def check_writable(folder: Path) -> None:
    """Create `folder` if needed and prove we can write there (OSError if not), through a uniquely named
    file created exclusively: a link planted under any name is never written through."""
    folder.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=folder, prefix=".rankprobe-write-test.")
    os.close(fd)
    os.unlink(name)


def ensure_writable(folder: Path) -> None:
    """`check_writable` for an output folder, before any expensive work starts; UserError if not."""
    try:
        check_writable(folder)
    except OSError as e:
        raise FolderError(f"cannot write to output folder {folder}: {e.strerror or e}") from None


# ---------------------------------------------------------------------------------------------
# one process per folder


@contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """Hold `folder/.rankprobe.lock` for the duration; UserError at once if another process holds it.

    flock is released by the kernel when the holder dies, so a killed run never leaves a stale lock;
    the file itself stays (removing it would let a third process lock a different inode). It is
    opened without following links: a link planted under its name is refused, never written through.
    """
    path = Path(folder) / LOCK
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as e:
        raise FolderError(f"cannot open lock file {path}: {e.strerror or e} (a link or a folder in its "
                          "place?)") from None
    f = os.fdopen(fd, "r+", encoding="utf-8")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = f.read().strip() or "?"
        f.close()
        raise FolderError(f"{folder} is in use by another rankprobe process (pid {holder}); wait for it to end or "
                        "use another --out") from None
    except OSError as e:  # e.g. a network file system without flock
        f.close()
        raise FolderError(f"cannot lock {path}: {e.strerror or e}") from None
    try:
        f.truncate(0)
        f.write(f"{os.getpid()}\n")
        f.flush()
        yield
    finally:
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()

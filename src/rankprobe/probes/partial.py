"""An interrupted series probe resumes: each checkpoint's rows are kept as soon as it is probed.

`rankprobe probe` of a series holds its rows until the last checkpoint, then writes metrics.jsonl
whole (no reader ever sees half a probe). A probe of 150 checkpoints stopped at the 100th (killed, a
broken checkpoint, a full disk) would otherwise start again from the first. `Kept` appends each
probed checkpoint's rows to `OUT/.probe-kept.jsonl`; the same command run again takes them back for
every checkpoint whose folder and weights hash are unchanged, provided the probe is the same one
(the token ids, dtype, batch size, device type, arm and name, RankProbe's version and git commit).
Anything else starts the file afresh. The file is removed once metrics.jsonl is written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch

from ..runlog import env_info

log = logging.getLogger(__name__)
KEPT = ".probe-kept.jsonl"


def probe_key(tokens: torch.Tensor, dtype: str, batch_size: int, device, name: str | None,
              arm: str | None) -> dict:
    """What must be equal for kept rows to be the rows this probe would compute."""
    env = env_info(torch.device(device))
    return {"tokens_sha256": hashlib.sha256(tokens.to('cpu', torch.int64).contiguous().numpy().tobytes()).hexdigest(),
            "shape": list(tokens.shape), "dtype": dtype, "batch_size": batch_size,
            "device": torch.device(device).type, "name": name, "arm": arm, "rankprobe": env["rankprobe"],
            "git_sha": env["git_sha"], "git_dirty": env["git_dirty"]}


class Kept:
    """The probed checkpoints of an unfinished series probe in `out_dir`, under `key`."""

    def __init__(self, out_dir: Path, key: dict):
        self.path, self.key = Path(out_dir) / KEPT, key
        self.identity: dict | None = None
        self.done: dict[tuple[str, str], dict] = {}  # (path, weights_sha256) -> {"seen", "rows"}
        lines = self._read()
        if lines and lines[0].get("key") == key:
            self.identity = lines[0].get("identity")
            self.done = {(e["seen"]["path"], e["seen"]["weights_sha256"]): e for e in lines[1:]}
        if self.done:
            log.info("%s: resuming, %d checkpoint(s) already probed", out_dir, len(self.done))
        else:
            self.identity = None
        self._rewrite(lines[1:] if self.done else [])  # whole lines only: a torn tail would glue to the next

    def _read(self) -> list[dict]:
        if not self.path.is_file() or self.path.is_symlink():
            return []
        out = []
        try:
            for line in self.path.read_text(encoding="utf-8").splitlines():
                out.append(json.loads(line))
        except (OSError, ValueError, RecursionError):  # the torn last line of a killed probe, or junk
            pass
        ok = all(isinstance(e, dict) for e in out) and all(
            isinstance(e.get("seen"), dict) and isinstance(e.get("rows"), list) for e in out[1:])
        return out if ok else []

    def _rewrite(self, entries: list[dict]) -> None:
        self.path.unlink(missing_ok=True)
        if self.identity is not None:
            self._append({"key": self.key, "identity": self.identity})
            for e in entries:
                self._append(e)

    def _append(self, entry: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def get(self, path: Path, weights_sha256: str) -> dict | None:
        """{"seen": the checkpoint's record, "rows": [[kind, row], ...]} when kept, else None."""
        return self.done.get((str(path), weights_sha256))

    def add(self, identity: dict, seen: dict, rows: list[tuple[str, dict]]) -> None:
        if self.identity is None:
            self.identity = identity
            self._append({"key": self.key, "identity": identity})
        self._append({"seen": seen, "rows": [list(r) for r in rows]})

    def close(self) -> None:
        """The probe is written: nothing left to resume."""
        self.path.unlink(missing_ok=True)

"""The run folder's owner: rows and the torn-line rule, a run's status, atomic writes, the lock."""

from __future__ import annotations

import gzip
import json
import lzma
import os

import pytest

from rankprobe.config import UserError
from rankprobe.runfolder import (
    METRICS, MetricsError, RunHeader, atomic_file, folder_lock, metrics_file, read_rows, run_rows, run_status,
    stale_temp_files, status_of, write_atomic,
)

RUN = {"kind": "run", "run": "r"}
TRAIN = {"kind": "train", "step": 1}


def _lines(*rows) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


@pytest.mark.parametrize("rows,status", [
    ([], "empty"),
    ([RUN], "cut off"),
    ([RUN, TRAIN], "cut off"),
    ([RUN, TRAIN, {"kind": "end", "status": "finished"}], "finished"),
    ([RUN, {"kind": "end", "status": "diverged"}], "diverged"),
    ([RUN, {"kind": "end"}], "finished"),  # end rows written before `status` existed
    ([RUN, {"kind": "end", "status": "finished"}, TRAIN], "cut off"),  # only a last end row ends a run
])
def test_status_of(rows, status):
    assert status_of(rows) == status


def test_archived_runs_read_like_plain_ones_and_plain_wins(tmp_path):
    text = _lines(RUN, {"kind": "end", "status": "finished"})
    (tmp_path / f"{METRICS}.xz").write_bytes(lzma.compress(text.encode()))
    assert run_status(tmp_path) == "finished" and metrics_file(tmp_path).name == f"{METRICS}.xz"
    (tmp_path / f"{METRICS}.gz").write_bytes(gzip.compress(_lines(RUN).encode()))
    assert metrics_file(tmp_path).name == f"{METRICS}.gz" and run_status(tmp_path) == "cut off"
    (tmp_path / METRICS).write_text(_lines(RUN, TRAIN))
    assert metrics_file(tmp_path).name == METRICS and run_rows(tmp_path) == [RUN, TRAIN]
    assert run_status(tmp_path / "absent") == "empty"


def test_torn_last_line_dropped_with_a_warning_any_other_bad_line_refused(tmp_path):
    path = tmp_path / METRICS
    path.write_text(_lines(RUN, TRAIN) + '{"kind": "tra')
    with pytest.warns(UserWarning, match="torn last line 3"):
        assert read_rows(path) == [RUN, TRAIN]
    path.write_text(_lines(RUN) + "[1, 2]\n" + _lines(TRAIN))
    with pytest.raises(MetricsError, match=r"line 2: corrupt metrics row"):
        read_rows(path)
    path.write_text("[" * 100_000 + "\n" + _lines(TRAIN))  # nested too deep for the JSON parser
    with pytest.raises(MetricsError, match="line 1"):
        read_rows(path)
    path.write_bytes(b"\xff\xfe" + _lines(RUN).encode())
    with pytest.raises(MetricsError, match="cannot read"):
        read_rows(path)


def test_run_header_row_marks_probed_checkpoints_by_source_only():
    head = RunHeader(run="r", arm="adamw", optimizer="adamw", qk_norm=False, seed=0, config={}, env={},
                     n_params=1, head_dim=64, n_layer=2, probe_checkpoints=[0], data={})
    row = head.row()
    assert next(iter(row)) == "schema" and row["schema"] == 1 and "source" not in row
    assert "source" in RunHeader(**{**vars(head), "source": {"kind": "hf"}}).row()


def test_atomic_write_replaces_whole_and_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "f.json"
    write_atomic(target, "old")
    with pytest.raises(RuntimeError):
        with atomic_file(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed mid-write")
    assert target.read_text() == "old" and not stale_temp_files(tmp_path, "f.json")
    write_atomic(target, lambda f: f.write(b"new"), fsync=True)
    assert target.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["f.json"]


def test_atomic_write_never_follows_a_planted_link(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (tmp_path / "run").mkdir()
    for planted in (".f.json.tmp", "f.json.tmp"):  # names an attacker could guess
        os.symlink(victim, tmp_path / "run" / planted)
    write_atomic(tmp_path / "run" / "f.json", "data")
    assert victim.read_text() == "precious" and (tmp_path / "run" / "f.json").read_text() == "data"


def test_folder_lock_is_exclusive_and_refuses_a_planted_link(tmp_path):
    with folder_lock(tmp_path):
        with pytest.raises(UserError, match=f"in use by another rankprobe process \\(pid {os.getpid()}\\)"):
            with folder_lock(tmp_path):
                pass
    with folder_lock(tmp_path):  # released: taken again
        pass
    victim = tmp_path / "victim"
    victim.write_text("precious")
    other = tmp_path / "other"
    other.mkdir()
    os.symlink(victim, other / ".rankprobe.lock")
    with pytest.raises(UserError, match="cannot open lock file"):
        with folder_lock(other):
            pass
    assert victim.read_text() == "precious"

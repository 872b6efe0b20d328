"""Sinks and tables: every lens reaches TensorBoard, W&B (offline, read back from its run file) and CSV;
`rankprobe.load` gives the long DataFrame that round-trips with metrics.jsonl; `rankprobe export`."""

import json
import math
import struct

import pytest
import torch

from rankprobe import Monitor, load
from rankprobe.cli import main
from rankprobe.frame import to_rows
from rankprobe.sinks import LONG_COLUMNS, long_records, scalars
from test_monitor import _model, _tokens


def test_scalar_names_and_long_records_of_hand_rows():
    probe = {"step": 3, "tokens": 30, "tap": "rope", "tensor": "k", "layer": 4, "pr": 2.5, "pr_heads": [2.0, 3.0],
             "mean_norm": [0.1, 0.2], "n": 64, "dim": 16, "pr_null": 13.0, "erank": None}
    assert scalars("probe", probe) == {"rankprobe/k_pr/L04": 2.5}
    assert scalars("probe", probe | {"tap": "proj"}) == {"rankprobe/proj/k_pr/L04": 2.5}
    assert scalars("weights", {"layer": 0, "matrix": "q", "stable_rank": 7.0, "shape": [4, 4]}) == \
        {"rankprobe/Wq_stable_rank/L00": 7.0}
    assert scalars("train", {"step": 1, "tokens": 8, "loss": 4.0}) == {"train/loss": 4.0}
    recs = long_records("probe", probe, {"run": "r", "arm": "a", "seed": 2})
    assert all(list(r) == list(LONG_COLUMNS) for r in recs)
    by = {(r["metric"], r["head"]): r["value"] for r in recs}
    assert by == {("pr", None): 2.5, ("pr", 0): 2.0, ("pr", 1): 3.0, ("mean_norm", 0): 0.1, ("mean_norm", 1): 0.2,
                  ("n", None): 64, ("dim", None): 16, ("pr_null", None): 13.0, ("erank", None): None}
    ids = {(r["run"], r["arm"], r["seed"], r["tap"], r["tensor"], r["layer"]) for r in recs}
    assert ids == {("r", "a", 2, "rope", "k", 4)}


def _wandb_history(folder):
    """Every history record of the offline run under `folder`, read from its .wandb file (a LevelDB-style
    log of 32 KiB blocks after a 7-byte header; each record a wandb Record protobuf)."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = folder.glob("wandb/offline-run-*/run-*.wandb")
    data, pos, buf, out = path.read_bytes(), 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:
            pos += left
            continue
        _crc, n, kind = struct.unpack("<IHB", data[pos : pos + 7])
        buf += data[pos + 7 : pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):  # a whole record, or the last fragment of one
            rec = pb.Record()
            rec.ParseFromString(buf)
            buf = b""
            if rec.WhichOneof("record_type") == "history":
                out.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
    return out


@pytest.fixture
def monitored(tmp_path, monkeypatch):
    """A run folder written by a Monitor with every sink: two probed steps of a tiny model and its losses."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    folder = tmp_path / "run"
    model, tokens = _model(qk_norm=True), _tokens(4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = Monitor(model, every=2, out=folder, sinks=("tensorboard", "wandb", "csv"), arm="sgd", seed=3)
    rows = []
    for step in range(3):
        with mon.watch(step, tokens_seen=step * tokens.numel()):
            loss = model(tokens, tokens)
        loss.backward()
        opt.step()
        opt.zero_grad()
        mon.log("train", step + 1, (step + 1) * tokens.numel(), loss=loss.item())
        rows += mon.last if mon.due(step) else []
        rows.append({"kind": "train", "step": step + 1, "tokens": (step + 1) * tokens.numel(), "loss": loss.item()})
    rows += mon.probe(tokens, step=3, tokens_seen=3 * tokens.numel())
    mon.close()
    return folder, rows


def test_every_lens_reaches_tensorboard_wandb_and_csv(monitored):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    folder, rows = monitored
    lines = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["kind"] == "run" and (lines[0]["arm"], lines[0]["seed"]) == ("sgd", 3)
    assert lines[1:] == rows
    assert {r["kind"] for r in rows} == {"probe", "attn", "weights", "train"}
    want: dict[str, dict[int, float]] = {}
    for r in rows:
        for name, v in scalars(r["kind"], r).items():
            want.setdefault(name, {})[r["tokens"]] = v
    assert {"rankprobe/k_erank/L01", "rankprobe/norm/q_stable_rank/L00", "rankprobe/k_rankme/L00",
            "rankprobe/attn_entropy/L01", "rankprobe/attn_max_logit/L00", "rankprobe/Wo_spectral_norm/L01",
            "train/loss"} <= set(want)
    acc = EventAccumulator(str(folder / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    assert set(acc.Tags()["scalars"]) == set(want)
    for name, points in want.items():
        assert {e.step: e.value for e in acc.Scalars(name)} == pytest.approx(points, rel=1e-6), name
    got: dict[str, dict[int, float]] = {}
    for h in _wandb_history(folder):
        for name, v in h.items():
            if not name.startswith("_") and name != "tokens":
                got.setdefault(name, {})[h["tokens"]] = v
    assert set(got) == set(want)
    for name, points in want.items():
        assert got[name] == pytest.approx(points, rel=1e-12), name
    csv = __import__("pandas").read_csv(folder / "metrics.csv")
    assert len(csv) == len(load(folder)) and list(csv.columns) == list(LONG_COLUMNS)
    assert csv["value"].sum() == pytest.approx(load(folder)["value"].sum(), rel=1e-12)


def test_load_is_long_and_round_trips_with_the_jsonl(monitored):
    folder, rows = monitored
    df = load(folder)
    assert list(df.columns) == list(LONG_COLUMNS) and set(df["run"]) == {"run"} and set(df["seed"]) == {3}
    k = df[(df.kind == "probe") & (df.tap == "rope") & (df.tensor == "k") & (df.layer == 1) & (df.metric == "pr")
           & (df.step == 3)]
    row = next(r for r in rows
               if r["kind"] == "probe" and (r["tap"], r["tensor"], r["layer"], r["step"]) == ("rope", "k", 1, 3))
    assert k[k["head"].isna()]["value"].item() == row["pr"]
    assert k.dropna(subset=["head"]).sort_values("head")["value"].tolist() == row["pr_heads"]
    back = to_rows(df)
    assert len(back) == len(rows)
    for a, b in zip(rows, back):
        for key, v in a.items():
            if key in ("kind", "step", "tokens", "tap", "tensor", "layer") or isinstance(v, (int, float, list)) \
                    and not isinstance(v, bool) and key != "shape":
                assert b[key] == v or (isinstance(v, float) and math.isnan(v)), (a["kind"], key)
        assert b["tensor"] == a.get("tensor", a.get("matrix"))


def test_export_writes_csv_parquet_and_tensorboard_and_refuses_a_missing_folder(monitored, tmp_path, capsys):
    import pandas as pd

    folder, _ = monitored
    df = load(folder)
    assert main(["export", str(folder), "--to", "parquet", "--out", str(tmp_path / "x")]) == 0
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "x" / "metrics.parquet"), df)
    assert main(["export", str(folder), "--to", "csv", "--out", str(tmp_path / "x")]) == 0
    assert len(pd.read_csv(tmp_path / "x" / "metrics.csv")) == len(df)
    assert main(["export", str(folder), "--to", "tensorboard", "--out", str(tmp_path / "x")]) == 0
    assert any((tmp_path / "x" / "tensorboard" / "run").iterdir())
    capsys.readouterr()
    assert main(["export", str(tmp_path / "nothing"), "--to", "csv"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not a folder" in err[0]


def test_a_sink_whose_package_is_missing_is_one_line(tmp_path, monkeypatch):
    import importlib.util

    from rankprobe.errors import UserError
    from rankprobe.sinks import TensorBoardSink, WandbSink

    find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("tensorboard", "wandb")
                        else find(name, *a))
    with pytest.raises(UserError, match=r"pip install 'rankprobe\[tensorboard\]'"):
        TensorBoardSink(tmp_path / "tb")
    with pytest.raises(UserError, match=r"pip install 'rankprobe\[wandb\]'"):
        WandbSink(folder=tmp_path, mode="offline")


def test_a_monitor_folder_without_token_counts_reads_back(tmp_path):
    """A loop that gives the Monitor no `tokens_seen` (Lightning's callback, HF without token counting)
    writes rows with `tokens` null (docs/metrics.md): they load, export and report like any other; a
    null `tokens` in a trainer's run is still refused (tests/test_bad_inputs.py)."""
    import pandas as pd

    model, tokens = _model(), _tokens(4)
    folder = tmp_path / "runs" / "mon"
    mon = Monitor(model, every=1, out=folder, weights=False)
    for step in range(2):
        with mon.watch(step):
            model(tokens, tokens)
    mon.close()
    df = load(folder)
    assert len(df) and df["tokens"].isna().all() and set(df["step"]) == {0, 1}
    assert main(["export", str(folder), "--to", "csv", "--out", str(tmp_path / "x")]) == 0
    assert len(pd.read_csv(tmp_path / "x" / "metrics.csv")) == len(df)
    assert main(["report", str(tmp_path / "runs")]) == 0  # listed as incomplete (no `end` row)
    assert "| `mon` | `monitor` | 0 | n/a | `mon/metrics.jsonl` |" in (tmp_path / "runs" / "report.md").read_text()

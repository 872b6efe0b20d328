"""Monitor(background=True): the host halves on a worker thread (forced on the CPU here) give the very
rows of background=False, in both modes, only later: a measurement's rows are emitted by the next
measurement, `flush` or `close`; a closed Monitor refuses to measure."""

import pytest
import torch

from rankprobe import Monitor
from rankprobe.config import load
from rankprobe.model import Transformer
from rankprobe.runfolder import read_rows

MODEL = {"model.n_layer": "2", "model.d_model": "64", "model.n_head": "2", "model.head_dim": "16",
         "model.seq_len": "32", "model.vocab_size": "97"}


def _model():
    torch.manual_seed(0)
    return Transformer(load("demo", MODEL | {"model.qk_norm": "true"}).model)


def _tokens(n=6, seed=1):
    return torch.randint(0, 97, (n, 32), generator=torch.Generator().manual_seed(seed))


def _train(model, monitors, steps=5):
    """A few SGD steps, every monitor watching the same training forwards; what each emitted, per step."""
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    emitted = {id(m): {} for m in monitors}
    for step in range(steps):
        x = _tokens(seed=step)
        for m in monitors:
            m.start(step)
        model(x, x).backward()
        for m in monitors:
            emitted[id(m)][step] = m.finish(tokens_seen=step * x.numel())
        opt.step()
        opt.zero_grad()
    return [emitted[id(m)] for m in monitors]


def test_cpu_default_is_foreground_and_background_gives_the_same_rows_later(tmp_path):
    model = _model()
    assert not Monitor(model).background  # parameters on the CPU: the worker would only take cores
    now = Monitor(model, every=2, out=tmp_path / "now", name="run")
    later = Monitor(model, every=2, out=tmp_path / "later", name="run", background=True)
    got_now, got_later = _train(model, [now, later])
    assert {s: {r["step"] for r in rows} for s, rows in got_now.items()} == {0: {0}, 1: set(), 2: {2}, 3: set(),
                                                                            4: {4}}
    # nothing of a measurement until the next one; the rows of step 4 wait for flush
    assert {s: {r["step"] for r in rows} for s, rows in got_later.items()} == {0: set(), 1: set(), 2: {0},
                                                                              3: set(), 4: {2}}
    assert later.last == got_later[4] and later.scalars()
    assert len(read_rows(tmp_path / "later" / "metrics.jsonl")) == 1 + len(got_now[0]) + len(got_now[2])
    flushed = later.flush()
    assert later.last == flushed and later.flush() == [] and later.last == flushed
    assert got_later[2] + got_later[4] + flushed == got_now[0] + got_now[2] + got_now[4]  # every value, exactly
    kinds = [r["kind"] for r in got_now[2]]
    assert kinds == sorted(kinds, key=["probe", "attn", "weights"].index) and set(kinds) == {"probe", "attn", "weights"}
    assert all(r["tokens"] == 2 * _tokens().numel() for r in got_now[2])

    # the fixed batch: probe(n) emits probe(n-1)'s rows; close emits the rest
    probe = _tokens(4, seed=9)
    first, second = [later.probe(probe, step=s, tokens_seen=10 * s) for s in (5, 6)]
    assert first == [] and {r["step"] for r in second} == {5} and later.cost["wait_s"] >= 0
    direct = [now.probe(probe, step=s, tokens_seen=10 * s) for s in (5, 6)]
    assert second == direct[0] and set(later.cost) == {"lenses_s", "weights_s", "wait_s"}
    now.close(), later.close()
    # metrics.jsonl complete after close, row for row the same file
    assert read_rows(tmp_path / "later" / "metrics.jsonl") == read_rows(tmp_path / "now" / "metrics.jsonl")
    assert read_rows(tmp_path / "now" / "metrics.jsonl")[-1]["step"] == 6


def test_a_closed_monitor_refuses_to_measure_with_one_clear_error():
    model = _model()
    mon = Monitor(model, background=True, weights=False)
    mon.probe(_tokens(2))
    mon.close(), mon.close()
    assert mon.finish() == [] and mon.flush() == []
    for measure in (lambda: mon.start(0), lambda: mon.probe(_tokens(2)), lambda: mon.watch(0).__enter__()):
        with pytest.raises(RuntimeError, match="this Monitor is closed .*make a new Monitor"):
            measure()
    assert all(not m._forward_hooks for m in model.modules())


def test_background_rows_of_a_hugging_face_llama_equal_the_foreground_ones():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    now, later = Monitor(model, every=1), Monitor(model, every=1, background=True)
    x = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    rows_now, rows_later = [], []
    for step in range(2):
        for m, rows in ((now, rows_now), (later, rows_later)):  # one at a time: the HF rope taps take turns
            with torch.no_grad():
                m.start(step)
                model(input_ids=x[step:], labels=x[step:])
            rows += m.finish(tokens_seen=64 * step)
    rows_now += now.probe(x[:2], step=2)
    rows_later += later.probe(x[:2], step=2)
    assert {r["step"] for r in rows_later} == {0, 1}
    rows_later += later.flush()
    assert rows_later == rows_now and {r["kind"] for r in rows_now} == {"probe", "attn", "weights"}


def test_two_monitors_measuring_one_hugging_face_step_are_refused():
    """The HF rope tap routes each layer's attention call through one interceptor: a second Monitor
    opening the same step would take it over and leave the first without rope or attention rows."""
    transformers = pytest.importorskip("transformers")
    from rankprobe.errors import DataError

    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(cfg)
    first, second = Monitor(model, every=1), Monitor(model, every=1)
    first.start(0)
    with pytest.raises(DataError, match="taps are already attached to this model"):
        second.start(0)
    with torch.no_grad():
        model(input_ids=torch.zeros(1, 8, dtype=torch.long))
    rows = first.finish()
    assert {r["tap"] for r in rows if r["kind"] == "probe"} == {"proj", "norm", "rope"}
    assert any(r["kind"] == "attn" for r in rows)
    assert not second._eager and all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert second.start(1)  # free again once the first has finished
    second.finish()

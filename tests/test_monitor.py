"""The public Monitor: fixed-batch rows equal the trainer's probe path, rows from the training forward
equal a float64 computation by hand, through DDP and torch.compile wrappers, and across 2 gloo ranks."""

import os
import socket

import numpy as np
import pytest
import torch

from rankprobe import Monitor
from rankprobe.config import UserError, load
from rankprobe.dist import Dist
from rankprobe.model import Transformer
from rankprobe.probes.lenses import probe_lenses, weight_lenses

MODEL = {"model.n_layer": "2", "model.d_model": "64", "model.n_head": "2", "model.head_dim": "16",
         "model.seq_len": "32", "model.vocab_size": "97"}


def _model(qk_norm=False):
    cfg = load("demo", MODEL | {"model.qk_norm": str(qk_norm).lower()})
    torch.manual_seed(0)
    return Transformer(cfg.model)


def _tokens(n=8, seed=1):
    return torch.randint(0, 97, (n, 32), generator=torch.Generator().manual_seed(seed))


def _of(rows, kind):
    return [{k: v for k, v in r.items() if k not in ("kind", "step", "tokens")} for r in rows if r["kind"] == kind]


def _no_hooks(model):
    return all(not m._forward_hooks for m in model.modules())


def test_fixed_batch_rows_are_the_trainers_probe_rows():
    model, tokens = _model(qk_norm=True), _tokens()
    rows = Monitor(model, batch_size=3).probe(tokens, step=7, tokens_seen=700)
    probe, attn = probe_lenses(model, tokens, 3)
    assert _of(rows, "probe") == probe and _of(rows, "attn") == attn and _of(rows, "weights") == weight_lenses(model)
    assert all(r["step"] == 7 and r["tokens"] == 700 for r in rows)
    assert _no_hooks(model)


def test_training_forward_rows_equal_float64_by_hand_at_the_cadence():
    model, tokens = _model(), _tokens()
    keys = []
    model.blocks[1].attn.hook_k_rope.register_forward_hook(lambda _m, _i, out: keys.append(out.detach()))
    mon = Monitor(model, every=3, weights=False)
    seen = {}
    for step in range(7):
        with mon.watch(step, tokens_seen=step * tokens.numel()):
            model(tokens, tokens).backward()  # the user's own training forward and backward
        if mon.due(step):
            seen[step] = mon.last
    assert sorted(seen) == [0, 3, 6] and _no_hooks(model.blocks[0])
    assert len(model.blocks[1].attn.hook_k_rope._forward_hooks) == 1  # only the test's own hook is left
    row = next(r for r in seen[6] if (r["kind"], r["tap"], r["tensor"], r["layer"]) == ("probe", "rope", "k", 1))
    x = keys[-1].double().numpy().reshape(-1, 2, 16)  # (N, H, D)
    for h in range(2):
        c = np.cov(x[:, h].T, bias=True)
        assert row["pr_heads"][h] == pytest.approx(np.trace(c) ** 2 / (c * c).sum(), rel=1e-9)
    assert row["n"] == tokens.numel() and row["tokens"] == 6 * tokens.numel()
    # the same tokens probed as a fixed batch give the same statistics (another batching, float rounding)
    fixed = Monitor(model, weights=False).probe(tokens)
    for a, b in zip(_of(fixed, "probe") + _of(fixed, "attn"), _of(seen[6], "probe") + _of(seen[6], "attn")):
        for m in ("pr", "erank", "rankme", "entropy", "max_logit"):
            if m in a:
                assert b[m] == pytest.approx(a[m], rel=1e-6)
    assert set(mon.scalars()) >= {"rankprobe/k_pr/L01", "rankprobe/proj/k_pr/L01", "rankprobe/attn_entropy/L00",
                                  "rankprobe/attn_max_logit/L01"}


def test_taps_limit_the_rows_and_bad_cadence_is_one_line():
    model = _model()
    mon = Monitor(model, taps=("rope",), weights=False)
    with mon.watch(0):
        model(_tokens(2), _tokens(2))
    assert {r["tap"] for r in mon.last if r["kind"] == "probe"} == {"rope"}
    assert {r["tap"] for r in _of(mon.probe(_tokens(2)), "probe")} == {"rope"}
    with pytest.raises(UserError, match="at least 1"):
        Monitor(model, every=0)


def test_a_fixed_batch_probe_inside_an_open_step_is_refused():
    """The open step's hooks count every forward until finish: a probe pass there would add the probe
    batch to the step's statistics (n doubled, the PR of neither), so it is refused and the step kept."""
    model, x = _model(), _tokens(4)
    mon = Monitor(model, weights=False)
    with mon.watch(0):
        model(x, x)
    alone = mon.last
    mon.start(0)
    with pytest.raises(RuntimeError, match="step 0 is still open"):
        mon.probe(_tokens(4, seed=2))
    model(x, x)
    assert mon.finish() == alone and _no_hooks(model)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.xdist_group("ranks")  # with tests/test_distributed.py
def test_ddp_and_compiled_models_are_unwrapped_and_measured_in_their_training_forward():
    import torch.distributed as td
    from torch.nn.parallel import DistributedDataParallel as DDP

    model, tokens = _model(), _tokens(4)
    want = Monitor(model, weights=False).probe(tokens)
    compiled = torch.compile(model, backend="eager")
    compiled(tokens, tokens)  # compiled once without hooks: the monitor must still see the next forward
    got = {}
    mon = Monitor(compiled, weights=False)
    with mon.watch(0):
        compiled(tokens, tokens)
    got["compile"] = mon.last
    td.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        ddp = DDP(model)
        mon = Monitor(ddp, weights=False)
        with mon.watch(0):
            ddp(tokens, tokens).backward()
        got["ddp"] = mon.last
    finally:
        td.destroy_process_group()
    for name, rows in got.items():
        assert len(rows) == len(want), name
        for a, b in zip(want, rows):
            for m in ("pr", "entropy", "max_logit"):
                if m in a:
                    assert b[m] == pytest.approx(a[m], rel=1e-6), (name, m)


def _two_rank_worker(rank: int, world: int, port: int, tokens: torch.Tensor, out: str) -> None:
    import torch.distributed as td

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    td.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = _model()
        # rank 0 in the background, rank 1 not: the collectives are in the device half either way
        mon = Monitor(model, batch_size=2, background=rank == 0)
        assert mon.dist == Dist(rank, world, 0)
        fixed = mon.probe(tokens)  # the same probe set on every rank: each feeds its half
        half = tokens[rank * 6 : (rank + 1) * 6]  # the training batch: each rank its own half
        with mon.watch(0):
            model(half, half).backward()
        train = mon.last
        if mon.background:  # each measurement's rows come with the next one, the last with flush
            assert fixed == []
            fixed, train = mon.last, mon.flush()
        torch.save({"fixed": fixed, "train": train}, f"{out}.{rank}")
    finally:
        td.destroy_process_group()


def _assert_rows_equal(one, two):
    assert [(r["kind"], r.get("tap"), r.get("tensor"), r["layer"]) for r in one] == \
           [(r["kind"], r.get("tap"), r.get("tensor"), r["layer"]) for r in two]
    for a, b in zip(one, two):
        for m in ("pr", "erank", "stable_rank", "rankme", "entropy", "max_logit", "spectral_norm"):
            if m in a:
                assert b[m] == pytest.approx(a[m], rel=1e-6, abs=1e-9), (a["kind"], m)
        for m in ("n", "n_rows"):
            assert b.get(m) == a.get(m)


@pytest.mark.xdist_group("ranks")  # with tests/test_distributed.py
def test_two_gloo_ranks_give_every_rank_the_single_process_rows(tmp_path):
    tokens = _tokens(12)
    model = _model()
    mon = Monitor(model, batch_size=2, dist=Dist())
    fixed = mon.probe(tokens)
    with mon.watch(0):
        model(tokens, tokens)
    train = mon.last
    torch.multiprocessing.spawn(_two_rank_worker, args=(2, _free_port(), tokens, str(tmp_path / "rows")), nprocs=2)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rows.{rank}", weights_only=False)
        _assert_rows_equal(fixed, got["fixed"] if rank == 0 else got["fixed"] + _of_weights(fixed))
        _assert_rows_equal(train, got["train"] if rank == 0 else got["train"] + _of_weights(train))


def _of_weights(rows):
    """The weight rows, which rank 0 alone computes (the weights are replicated)."""
    return [r for r in rows if r["kind"] == "weights"]


class _CountingBackend:
    """A torch.compile backend that runs Dynamo's graph as traced and counts compiles and calls."""

    def __init__(self):
        self.compiled = self.calls = 0

    def __call__(self, gm, example_inputs):
        self.compiled += 1

        def run(*args):
            self.calls += 1
            return gm.forward(*args)
        return run


def test_compiled_regions_never_see_the_hooks_and_unmeasured_steps_run_the_plain_graphs():
    """RankProbe's regional compile (loop.compile_regions; here with a counting backend): the measured
    steps run eagerly with the hooks, the others run the graphs traced without them, traced once."""
    import copy

    torch._dynamo.reset()
    guards = torch._dynamo.config.skip_nnmodule_hook_guards
    tokens = _tokens(4)
    seen = {}
    for arm in ("with", "with, reusing the cache"):
        if arm != "with, reusing the cache":  # each arm compiles from scratch, so their compiles compare
            torch._dynamo.reset()
            backend = _CountingBackend()
        model, compiled = _model(), backend.compiled  # the last arm: a new model, its code compiled already
        regions = ([torch.compile(b, backend=backend) for b in model.blocks], torch.compile(model.head, backend=backend))
        mon = Monitor(model, every=2, weights=False)
        per_step, rows = [], {}
        for step in range(5):
            before, calls = copy.deepcopy(model) if mon.due(step) else None, backend.calls
            with mon.watch(step):
                model(tokens, tokens, regions=regions).backward()
            assert _no_hooks(model), step  # hooks exist only inside a measured step
            if mon.due(step):
                rows[step] = (mon.last, Monitor(before, weights=False).probe(tokens))
            per_step.append(backend.calls - calls)
        seen[arm] = (backend.compiled - compiled, per_step)
        for step, (got, want) in rows.items():  # each measured step measured its own forward, exactly
            assert len(got) == len(want) > 0, (arm, step)
            for a, b in zip(want, got):
                for m in ("pr", "entropy", "max_logit"):
                    if m in a:
                        assert b[m] == pytest.approx(a[m], rel=1e-6), (arm, step, m)
    graphs = len(model.blocks) + 1  # without a monitor: 2 compiles (the blocks share code, and the head), 3 calls a step
    # measured steps 0, 2, 4 run no compiled code; the steps between run those graphs, compiled once.
    # (Hooks that met the compiler gave 9 compiles and 17 graph fragments on every step.)
    assert seen["with"] == (2, [0, graphs, 0, graphs, 0])
    assert seen["with, reusing the cache"] == (0, [0, graphs, 0, graphs, 0])
    assert torch._dynamo.config.skip_nnmodule_hook_guards == guards  # Dynamo's settings are left alone
    # a measured step that raises removes the hooks and gives the compiled regions back
    with pytest.raises(ZeroDivisionError), mon.watch(6):
        model(tokens, tokens, regions=regions)
        1 / 0
    calls = backend.calls
    model(tokens, tokens, regions=regions)
    assert _no_hooks(model) and backend.calls == calls + graphs
    # two monitors on one step (two callbacks), closed in the order they opened: eager for both, and
    # the compiled regions come back after the last one closes
    other = Monitor(model, every=1, weights=False)
    assert mon.start(8) and other.start(8)
    model(tokens, tokens, regions=regions)
    assert backend.calls == calls + graphs and mon.finish() and other.finish()
    model(tokens, tokens, regions=regions)
    assert _no_hooks(model) and backend.calls == calls + 2 * graphs


def test_trainer_prober_leaves_the_host_half_to_its_worker_and_writes_what_the_monitor_gives(tmp_path):
    """loop.Prober returns at a checkpoint once the forward and the device statistics are done: the
    `probe` and `weights` rows are pending, each with its kind (from its worker thread where it
    offloads, as on a GPU; made at once on the CPU), and `drain` writes them, in that order, equal to
    the Monitor's own rows of the same weights and tokens, either way. A checkpoint written before
    probe rows were pending holds weight rows without a kind: they are written as `weights`."""
    import json
    from collections import defaultdict

    from rankprobe.loop import Prober
    from rankprobe.runfolder import MetricsWriter, read_rows

    cfg = load("demo", MODEL | {"train.batch_size": "4"})
    model, tokens = _model(), _tokens()
    out = MetricsWriter(tmp_path / "metrics.jsonl")
    expect = Monitor(model, batch_size=4, train_forward=False).probe(tokens)
    prober = Prober(cfg, model, None, tokens, torch.device("cpu"), None, out, defaultdict(float))
    assert not prober.deferred.offload
    for offload, step in ((False, 3), (True, 4)):
        prober.deferred.offload = offload
        assert [kind for kind, _ in prober.lenses(step, [])] == ["attn", "update"]
        assert [{r["kind"] for r in job.result()} for _, job in prober.deferred.pending] == [{"probe"}, {"weights"}]
        prober.drain()
    written = read_rows(tmp_path / "metrics.jsonl")
    for step in (3, 4):
        rows = [r for r in written if r["step"] == step]
        assert [r["kind"] for r in rows] == sorted((r["kind"] for r in rows), key=["probe", "weights"].index)
        assert all(r["tokens"] == step * cfg.train.batch_size * 32 for r in rows)
        for kind in ("probe", "weights"):
            assert _of(rows, kind) == _of(expect, kind)

    old = Prober(cfg, model, None, tokens, torch.device("cpu"), None, out, defaultdict(float),
                 pending_rows=json.dumps([[5, [{"layer": 0, "matrix": "q"}]]]))
    old.drain()
    assert read_rows(tmp_path / "metrics.jsonl")[-1] == {"kind": "weights", "step": 5,
                                                         "tokens": 5 * cfg.train.batch_size * 32,
                                                         "layer": 0, "matrix": "q"}
    prober.close(), old.close(), out.close()


def test_a_closed_prober_refuses_another_checkpoint_with_one_clear_error_on_every_device():
    """Prober.close is final: probing after it raises one clear error, on the CPU too, where the host
    halves never reach the worker; on an H200 the benchmark probed after close and died inside
    concurrent.futures ("cannot schedule new futures after shutdown", issue 13). The worker thread
    starts with the first host half it runs: a Prober that never offloads starts none."""
    from collections import defaultdict

    from rankprobe.loop import Prober
    from rankprobe.runfolder import NullWriter

    cfg = load("demo", MODEL | {"train.batch_size": "4"})
    model, tokens = _model(), _tokens()
    for offload in (False, True):
        prober = Prober(cfg, model, None, tokens, torch.device("cpu"), None, NullWriter(), defaultdict(float))
        prober.deferred.offload = offload
        prober.lenses(3, [])
        assert (prober.deferred.worker is not None) == offload
        prober.drain()
        prober.close(), prober.close()
        for probe in (lambda: prober.lenses(4, []), lambda: prober(4, [])):
            with pytest.raises(RuntimeError, match="Prober is closed"):
                probe()
        assert not prober.deferred.pending

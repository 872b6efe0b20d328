"""The Monitor through FSDP2's `fully_shard` (each block, then the root) on 2 gloo ranks: the fixed-batch and
training-forward rows of every rank, the weight spectra of the whole matrices included, equal one process's
on the same model and tokens — RankProbe's Transformer and a tiny Hugging Face Llama built from a config."""

import os
import socket
from datetime import timedelta

import pytest
import torch

from rankprobe import Monitor
from rankprobe.config import UserError, load
from rankprobe.model import Transformer

# one xdist worker runs every test that starts process groups, one at a time (Makefile: --dist
# loadgroup): two sets of gloo ranks started at once on CI's 2 cores sometimes aborted a rank
pytestmark = pytest.mark.xdist_group("ranks")

MODEL = {"model.n_layer": "2", "model.d_model": "64", "model.n_head": "2", "model.head_dim": "16",
         "model.seq_len": "32", "model.vocab_size": "97", "model.qk_norm": "true"}
LLAMA = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)


def _rankprobe():
    """(model, its blocks, the training loss of a batch), seeded: the same weights in every process."""
    torch.manual_seed(0)
    model = Transformer(load("demo", MODEL).model)
    return model, list(model.blocks), lambda x: model(x, x)


def _llama():
    import transformers

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA))
    return model, list(model.model.layers), lambda x: model(input_ids=x, labels=x).loss


def _tokens(vocab: int, T: int) -> torch.Tensor:
    return torch.randint(0, vocab, (8, T), generator=torch.Generator().manual_seed(1))


CASES = {"rankprobe": (_rankprobe, lambda: _tokens(97, 32)), "llama": (_llama, lambda: _tokens(64, 16))}


def _measure(case: str, rank: int = 0, world: int = 1) -> dict:
    """Fixed-batch rows of the whole probe set, the rows of one training forward and backward over this
    rank's half of the same tokens, and fixed-batch rows after an SGD step; under a process group the
    model is fully_shard-ed first."""
    build, tokens = CASES[case]
    model, blocks, loss = build()
    tokens = tokens()
    if world > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for block in blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        assert all(hasattr(p, "full_tensor") for p in model.parameters())  # every weight is a shard now
    # rank 0 of 2 in the background, rank 1 not: the all-gathers are in the device half either way
    mon = Monitor(model, batch_size=4, background=rank == 0 and world > 1)
    emitted = [mon.probe(tokens)]
    n = tokens.size(0) // world
    with mon.watch(0):
        loss(tokens[rank * n : (rank + 1) * n]).backward()
    emitted.append(mon.last)
    # an SGD step on each rank's shards, from the whole batch's gradient on every rank: FSDP2's average of
    # equal gradients is exact, so the stepped weights are one process's and even cond (which magnifies
    # rounding) compares at 1e-6; the probe after it must gather the updated shards
    model.zero_grad()
    loss(tokens).backward()
    torch.optim.SGD(model.parameters(), lr=0.5).step()
    emitted += [mon.probe(tokens, step=1), mon.flush()]
    if mon.background:  # each measurement's rows come with the next one, the last with flush
        assert emitted[0] == []
        emitted = emitted[1:]
    return dict(zip(("fixed", "train", "stepped"), emitted))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, cases: list[str], out: str) -> None:
    import torch.distributed as td

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    td.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=90))  # no silent hang
    try:
        got = {case: _measure(case, rank, world) for case in cases}
        model, blocks, _ = _rankprobe()
        from torch.distributed.fsdp import fully_shard

        fully_shard(model)
        # 5 sequences in batches of 2: 1 forward on rank 0, 2 on rank 1, whose weight all-gathers would wait
        # forever; every rank refuses before its first forward
        with pytest.raises(UserError, match="as many probe forwards"):
            Monitor(model, batch_size=2).probe(_tokens(97, 32)[:5])
        torch.save(got, f"{out}.{rank}")
    finally:
        td.destroy_process_group()


def _same(want: list[dict], got: list[dict]) -> None:
    """Row for row, every field equal: integers and names exactly, floats to float rounding."""
    assert [(r["kind"], r["layer"], r.get("tap"), r.get("tensor"), r.get("matrix")) for r in got] == \
           [(r["kind"], r["layer"], r.get("tap"), r.get("tensor"), r.get("matrix")) for r in want]
    for a, b in zip(want, got):
        assert set(a) == set(b)
        for key, x in a.items():
            xs, ys = (x, b[key]) if isinstance(x, list) else ([x], [b[key]])
            for u, v in zip(xs, ys, strict=True):
                if isinstance(u, float):
                    assert v == pytest.approx(u, rel=1e-6, abs=1e-9, nan_ok=True), (a["kind"], a["layer"], key)
                else:
                    assert v == u, (a["kind"], a["layer"], key)


@pytest.mark.slow
def test_fully_sharded_models_give_every_rank_the_single_process_rows(tmp_path):
    cases = ["rankprobe"]
    try:
        import transformers  # noqa: F401  (an optional extra: the Llama case runs where it is installed)

        cases.append("llama")
    except ImportError:
        pass
    want = {case: _measure(case) for case in cases}
    for case in cases:  # the step moved the weights, so "stepped" checks the gathered shards after an update
        before, after = ([r["spectral_norm"] for r in want[case][m] if r["kind"] == "weights"]
                         for m in ("fixed", "stepped"))
        assert max(abs(a - b) / b for a, b in zip(after, before)) > 1e-2
    torch.multiprocessing.spawn(_worker, args=(2, _free_port(), cases, str(tmp_path / "rows")), nprocs=2)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rows.{rank}", weights_only=False)
        for case in cases:
            for mode in ("fixed", "train", "stepped"):
                rows = want[case][mode]
                assert any(r["kind"] == "weights" for r in rows) and any(r["kind"] == "attn" for r in rows)
                if rank == 1:  # the weight spectra are rank 0's; rank 1 joined its all-gathers
                    rows = [r for r in rows if r["kind"] != "weights"]
                _same(rows, got[case][mode])

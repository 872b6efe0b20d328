"""Two processes on the CPU (gloo): exact probes across ranks, DDP training through torchrun against a
single process on the same global batch, and a sweep spread over parallel workers."""

import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch

from rankprobe.config import load
from rankprobe.model import Transformer
from rankprobe.probes.lenses import probe_lenses
from rankprobe.probes.mechanism import MECHANISM_KEYS

dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

from test_end_to_end import TINY, overrides, rows, tiny_cfg  # noqa: E402

# one xdist worker runs every test that starts process groups, one at a time (Makefile: --dist
# loadgroup): two sets of gloo ranks started at once on CI's 2 cores sometimes aborted a rank
pytestmark = pytest.mark.xdist_group("ranks")

TORCHRUN = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tiny_model():
    cfg = load("demo", {k: v for k, v in TINY.items() if k.startswith("model.")} | {"model.vocab_size": "97"})
    torch.manual_seed(0)
    return Transformer(cfg.model).eval()


def _probe_worker(rank: int, world: int, port: int, tokens: torch.Tensor, out: str) -> None:
    from rankprobe.dist import Dist, reduce_probe_stats, shard_rows

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        d = Dist(rank, world, rank)
        probe, attn = probe_lenses(_tiny_model(), shard_rows(d, tokens, "probe"), 2,
                                   merge=lambda c, a: reduce_probe_stats(d, c, a))
        if rank == 0:
            torch.save({"probe": probe, "attn": attn}, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_probe_stats_merged_across_two_ranks_equal_one_process(tmp_path):
    tokens = torch.randint(0, 97, (12, 32), generator=torch.Generator().manual_seed(1))
    probe, attn = probe_lenses(_tiny_model(), tokens, 2)
    out = tmp_path / "rank0.pt"
    torch.multiprocessing.spawn(_probe_worker, args=(2, _free_port(), tokens, str(out)), nprocs=2)
    merged = torch.load(out, weights_only=False)
    assert len(merged["probe"]) == len(probe) and len(merged["attn"]) == len(attn) > 0
    for one, two in zip(probe, merged["probe"]):
        assert (one["tap"], one["tensor"], one["layer"], one["n"]) == (two["tap"], two["tensor"], two["layer"], two["n"])
        assert one["n"] == 12 * 32
        for m in ("pr", "erank", "stable_rank", "rankme", *MECHANISM_KEYS):  # every CovStats sum is all-reduced
            assert two[m] == pytest.approx(one[m], rel=1e-6, abs=1e-9), (m, one["tap"], one["layer"])
        assert two["pr_heads"] == pytest.approx(one["pr_heads"], rel=1e-6)
    for one, two in zip(attn, merged["attn"]):
        assert two["n_rows"] == one["n_rows"]
        assert two["max_logit_heads"] == pytest.approx(one["max_logit_heads"], rel=1e-6)  # MAX, not SUM
        assert two["entropy_heads"] == pytest.approx(one["entropy_heads"], rel=1e-6)


def _cli_env():
    return {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}


# torchrun's own start-up can lose a race for a local port or connection; such a run is retried once
NETWORK_ERRORS = ("EADDRINUSE", "Address already in use", "DistNetworkError", "RendezvousConnectionError",
                  "Connection reset by peer", "Connection refused")


def _torchrun(*args, nproc=2):
    cmd = [TORCHRUN, "--standalone", f"--nproc_per_node={nproc}", "-m", "rankprobe.cli", *args]
    r = subprocess.run(cmd, capture_output=True, text=True, env=_cli_env(), timeout=300)
    if r.returncode != 0 and any(e in r.stderr for e in NETWORK_ERRORS):
        print(f"torchrun failed to start its processes; retrying once:\n{r.stderr[-2000:]}")
        r = subprocess.run(cmd, capture_output=True, text=True, env=_cli_env(), timeout=300)
    return r


def _single(*args):
    return subprocess.run([sys.executable, "-m", "rankprobe.cli", *args], capture_output=True, text=True,
                          env=_cli_env(), timeout=300)


@pytest.mark.slow
@pytest.mark.skipif(TORCHRUN is None, reason="torchrun not found")
@pytest.mark.parametrize("optim", ["adamw", "muon"])
def test_torchrun_two_ranks_match_one_process(corpus_file, cache, tmp_path, optim):
    extra = {"optim.name": optim, "model.qk_norm": "true"}
    one, two = tmp_path / "one", tmp_path / "two"
    r = _single("train", "demo", "--out", str(one), *overrides(corpus_file, cache, **extra))
    assert r.returncode == 0, r.stderr
    r = _torchrun("train", "demo", "--out", str(two), *overrides(corpus_file, cache, **extra))
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = one / "metrics.jsonl", two / "metrics.jsonl"
    assert [r["kind"] for r in rows(a)] == [r["kind"] for r in rows(b)]  # rank 0 alone wrote, once
    assert rows(b, "end")[0]["status"] == "finished" and (two / "model.safetensors").exists()
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    # The init probe sees identical weights: exact to 1e-6. After that, the fp32 CPU all-reduce sums the
    # gradient halves in another order (~1e-7 relative). With AdamW that stays ~1e-7 over the 24 steps
    # (measured: loss 1.1e-7, PR 1.8e-7); with Muon an occasional bf16 rounding flip in Newton-Schulz
    # grows it (measured: loss 1.4e-5, val loss 1.6e-6, PR 9e-4 at the last checkpoint).
    loss_tol, pr_tol = {"adamw": (1e-6, 1e-6), "muon": (1e-4, 1e-2)}[optim]
    la, lb = [r["loss"] for r in rows(a, "train")], [r["loss"] for r in rows(b, "train")]
    assert lb == pytest.approx(la, rel=loss_tol)
    assert lb[0] == pytest.approx(la[0], rel=1e-6)
    va, vb = [r["val_loss"] for r in rows(a, "eval")], [r["val_loss"] for r in rows(b, "eval")]
    assert vb == pytest.approx(va, rel=loss_tol) and vb[0] == pytest.approx(va[0], rel=1e-6)
    pa, pb = rows(a, "probe"), rows(b, "probe")
    assert [(r["tokens"], r["tap"], r["tensor"], r["layer"], r["n"]) for r in pa] == \
        [(r["tokens"], r["tap"], r["tensor"], r["layer"], r["n"]) for r in pb]
    for x, y in zip(pa, pb):
        tol = 1e-6 if x["tokens"] == 0 else pr_tol
        assert y["pr"] == pytest.approx(x["pr"], rel=tol), (x["tokens"], x["tap"], x["layer"])
        assert y["erank"] == pytest.approx(x["erank"], rel=tol)


@pytest.mark.slow
@pytest.mark.skipif(TORCHRUN is None, reason="torchrun not found")
def test_torchrun_refusals_print_one_line_and_a_cut_off_run_resumes(corpus_file, cache, tmp_path, monkeypatch):
    r = _torchrun("train", "demo", "--out", str(tmp_path / "odd"),
                  *overrides(corpus_file, cache, **{"train.batch_size": "3"}))
    assert r.returncode != 0
    ours = [line for line in r.stderr.splitlines() if line.startswith("rankprobe:")]
    assert ours == ["rankprobe: error: train.batch_size 3 does not divide over 2 processes; make it a "
                    "multiple of the process count"]
    assert not (tmp_path / "odd").exists()

    # a single-process run cut off before its end (weights not saved): checkpoint and metrics stay
    import rankprobe.train as train_mod

    cfg = tiny_cfg(corpus_file, cache)
    run, ref = tmp_path / "run", tmp_path / "ref"
    monkeypatch.setattr(train_mod, "_save_weights", lambda *a: (_ for _ in ()).throw(RuntimeError("cut")))
    with pytest.raises(RuntimeError, match="cut"):
        train_mod.train(cfg, run)
    monkeypatch.undo()
    assert (run / "checkpoint.pt").exists() and not rows(run / "metrics.jsonl", "end")
    args = ["train", "demo", "--out", str(run), *overrides(corpus_file, cache)]
    again = _torchrun(*args)  # a non-empty folder without --resume: rank 0 refuses, every rank stops
    assert again.returncode != 0
    ours = [line for line in again.stderr.splitlines() if line.startswith("rankprobe:")]
    assert len(ours) == 1 and "--resume" in ours[0]
    resumed = _torchrun(*args, "--resume")  # both ranks load the checkpoint; rank 0 rewinds the metrics
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    train_mod.train(cfg, ref)
    a, b = rows(ref / "metrics.jsonl"), rows(run / "metrics.jsonl")
    assert [r["kind"] for r in a] == [r["kind"] for r in b] and b[-1]["status"] == "finished"
    la, lb = [r["loss"] for r in a if r["kind"] == "train"], [r["loss"] for r in b if r["kind"] == "train"]
    assert lb == pytest.approx(la, rel=1e-4)
    assert not (run / "checkpoint.pt").exists() and (run / "model.safetensors").exists()


@pytest.mark.slow
def test_sweep_workers_run_arms_in_parallel_and_survive_a_failing_arm(corpus_file, cache, tmp_path):
    (tmp_path / "muon-s0").mkdir()
    (tmp_path / "muon-s0" / "checkpoint.pt").write_bytes(b"not a checkpoint")  # this arm must fail alone
    # three arms on two workers: one fails, the two others finish (one of them after the failure)
    sweep = ["sweep", "demo", "--out", str(tmp_path), "--workers", "2", "--sweep.arms", "adamw,muon,muon+qknorm",
             *overrides(corpus_file, cache)]
    r = _single(*sweep)
    assert r.returncode == 1, r.stderr
    assert "rankprobe: run muon-s0 failed (exit 2)" in r.stderr
    for arm in ("adamw-s0", "muon+qknorm-s0"):
        assert rows(tmp_path / arm / "metrics.jsonl", "end")[0]["status"] == "finished"
    assert "holds files (checkpoint.pt) but no RankProbe run" in (tmp_path / "logs" / "muon-s0.log").read_text()
    assert (tmp_path / "report.md").exists()
    # fixed, the sweep picks up only the failed arm
    (tmp_path / "muon-s0" / "checkpoint.pt").unlink()
    r = _single(*sweep)
    assert r.returncode == 0, r.stderr
    assert rows(tmp_path / "muon-s0" / "metrics.jsonl", "end")[0]["status"] == "finished"
    assert "`muon`" in (tmp_path / "report.md").read_text()


def test_gpus_without_gpus_refuses_in_one_line(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    r = _single("sweep", "demo", "--out", str(tmp_path), "--gpus", "2")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and "--gpus 2 but this machine has 0" in r.stderr
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
@pytest.mark.skipif(TORCHRUN is None, reason="torchrun not found")
def test_torchrun_with_regional_compile_matches_one_eager_process(corpus_file, cache, tmp_path):
    """DDP around regionally compiled blocks (Inductor on the CPU, gloo) trains like one eager process."""
    one, two = tmp_path / "one", tmp_path / "two"
    r = _single("train", "demo", "--out", str(one), *overrides(corpus_file, cache, **{"train.compile": "false"}))
    assert r.returncode == 0, r.stderr
    r = _torchrun("train", "demo", "--out", str(two), *overrides(corpus_file, cache, **{"train.compile": "regional"}))
    assert r.returncode == 0, r.stderr[-3000:]
    la = [r["loss"] for r in rows(one / "metrics.jsonl", "train")]
    lb = [r["loss"] for r in rows(two / "metrics.jsonl", "train")]
    assert len(la) > 3 and lb == pytest.approx(la, rel=1e-5)

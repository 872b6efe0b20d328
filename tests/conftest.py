"""Fixtures shared by the end-to-end, resume and distributed tests, and how a run of the suite is laid out."""

import os
import shutil
from pathlib import Path

import pytest

from rankprobe.data.corpus import load_corpus

# Inductor on the CPU (the regional-compile tests, here and in the processes they start) emits scalar
# C++ instead of its vectorized templates, which take g++ twice as long: a cold regional compile of the
# test model took 20 s against 9.5 s on 2 cores. The graphs, fusions and numerics checked are the same
# kernels' either way; the GPU runs compile through Triton. Read when Inductor is first imported.
os.environ.setdefault("TORCHINDUCTOR_VEC_ISA_OK", "0")


def pytest_configure(config):
    """Under pytest-xdist (`make test` runs 2 workers) each worker, and every process it starts (through
    OMP_NUM_THREADS), takes its share of the cores for torch's intra-op threads: 2 workers of 2 threads
    on CI's 2 cores would only spin against each other. A worker's tests and the subprocesses they
    compare against then run on the same thread count, as they do in one process."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        import torch

        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        threads = max(1, cores // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items):
    """Tests marked `slow` first, in their files' order: the workers then end together, instead of one
    waiting out a 20-second test that was handed out last."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory):
    """The first ~150 KB of the embedded corpus: real English, fast to tokenize."""
    path = tmp_path_factory.mktemp("corpus") / "austen.txt"
    path.write_text(load_corpus("embedded").text[:150_000], encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


# ---------------------------------------------------------------------------------------------
# tiny runs for the hardening and fuzz tests (tests/test_hardening.py, tests/test_fuzz.py)

# 8 steps of 64 tokens, probed (and checkpointed) at steps 0 and 4: a run in about a second
TINY = {
    "model.n_layer": "1", "model.d_model": "32", "model.n_head": "2", "model.head_dim": "16", "model.seq_len": "16",
    "data.vocab_size": "300", "train.tokens": "512", "train.batch_size": "4", "train.eval_tokens": "64",
    "train.log_every": "2", "train.progress": "false", "probe.tokens": "64", "probe.checkpoints": "0,256",
    "train.checkpoint_minutes": "0", "sweep.optimizers": "adamw", "sweep.qk_norm": "false", "sweep.seeds": "0",
}


def with_corpus(tmp_path_factory, name: str, chars: int, overrides: dict) -> dict:
    """`overrides` plus a corpus of the embedded corpus's first `chars` characters and a token cache of its own."""
    root = tmp_path_factory.mktemp(name)
    corpus = root / "austen.txt"
    corpus.write_text(load_corpus("embedded").text[:chars], encoding="utf-8")
    return {**overrides, "data.corpus": str(corpus), "data.cache_dir": str(root / "cache")}


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """Overrides for a tiny run on 30 KB of the embedded corpus, with a cache of its own."""
    return with_corpus(tmp_path_factory, "tiny", 30_000, TINY)


class Crash(BaseException):
    """What a kill right after a checkpoint leaves, raised in-process (fast, and deterministic)."""


def train_until_first_checkpoint(cfg, run) -> None:
    """Train `cfg` into `run` and stop it as a kill would right after its first checkpoint past step 0."""
    from rankprobe.loop import Checkpointer
    from rankprobe.train import train

    save = Checkpointer.save

    def save_then_crash(self, step, *args):
        save(self, step, *args)
        if step > 0:
            raise Crash

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Checkpointer, "save", save_then_crash)
        with pytest.raises(Crash):
            train(cfg, run)


@pytest.fixture(scope="session")
def cutoff(tiny, tmp_path_factory):
    """A tiny run folder cut off after its checkpoint at step 4: rows up to there, checkpoint.pt, no `end` row."""
    from rankprobe.checkpoint import load_checkpoint
    from rankprobe.config import load
    from rankprobe.runfolder import CHECKPOINT

    run = tmp_path_factory.mktemp("cutoff") / "run"
    train_until_first_checkpoint(load("demo", tiny), run)
    assert load_checkpoint(run / CHECKPOINT)["step"] == 4
    return run


@pytest.fixture(scope="session")
def finished(tiny, tmp_path_factory):
    """A finished tiny run folder."""
    from rankprobe.config import load
    from rankprobe.train import train

    run = tmp_path_factory.mktemp("finished") / "run"
    train(load("demo", tiny), run)
    return run


@pytest.fixture
def copy_of(tmp_path):
    """A copy of a run folder to damage: copy_of(finished) -> tmp_path/run."""
    return lambda src: Path(shutil.copytree(src, tmp_path / "run"))


def flags(overrides: dict) -> list[str]:
    """{"model.n_layer": "2"} -> ["--model.n_layer", "2"]."""
    return [x for k, v in overrides.items() for x in (f"--{k}", v)]


def files(folder: Path) -> dict:
    """A folder's files and their bytes (the lock aside): what a refused command must leave as it was."""
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and p.name != ".rankprobe.lock"}


def refused(capsys, argv: list[str], needle: str) -> str:
    """`rankprobe ARGV` in this process: exit 2 and exactly one `rankprobe: error:` line holding `needle`."""
    capsys.readouterr()
    from rankprobe.cli import main

    assert main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("rankprobe: error: ") and needle in err[0], err
    return err[0]

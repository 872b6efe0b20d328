"""Bad config values, untrustworthy checkpoints, planted links and full disks (issue 17; the other families
are in test_bad_inputs.py): each ends in one `rankprobe: error:` line and exit 2, with no traceback, no write
outside the folder asked for, and nothing changed in a run it refuses."""

import json
import os
import resource
import shutil
import signal
from pathlib import Path

import pytest
import torch

from conftest import files, flags, refused
from rankprobe import checkpoint as ckpt_mod
from rankprobe.checkpoint import load_checkpoint, save_checkpoint
from rankprobe.cli import main
from rankprobe.config import ConfigError, Config, ModelConfig, load
from rankprobe.model import param_count, state_bytes
from rankprobe.runfolder import safe_name
from rankprobe.errors import FolderError
from rankprobe.runfolder import CHECKPOINT, LOCK, METRICS, MetricsWriter, stale_temp_files
from rankprobe.sweep import scan_configs

# ---------------------------------------------------------------------------------------------
# 1. config values, checked before any folder exists


@pytest.mark.parametrize("override, needle", [
    ({"optim.lr": "nan"}, "optim.lr must be a finite number"),
    ({"optim.lr": "inf"}, "optim.lr must be a finite number"),
    ({"optim.grad_clip": "nan"}, "optim.grad_clip must be a finite number"),
    ({"optim.betas": "1.5,0.9"}, "optim.betas must each lie in [0, 1)"),
    ({"optim.eps": "-1"}, "optim.eps must be positive"),
    ({"model.mlp_hidden": "-5"}, "model.mlp_hidden must be >= 0"),
    ({"model.init_std": "nan"}, "model.init_std must be a finite number"),
    ({"train.seed": str(2**70)}, "train.seed is too large for a 64-bit integer"),
    ({"train.device": "foo"}, "train.device must be auto, cpu, cuda or cuda:N"),
    ({"model.n_layer": "100000"}, "more than the"),
    ({"model.d_model": "1e9"}, "more than the"),
    ({"model.seq_len": "1e12"}, "more than the"),
    ({"name": "../../escape"}, "name must be a plain folder name"),
    ({"name": "/abs"}, "name must be a plain folder name"),
    ({"sweep.arms": "adamw,adamw"}, "sweep.arms lists adamw more than once"),
])
def test_bad_config_values_are_one_line_and_create_nothing(tiny, tmp_path, capsys, override, needle):
    out = tmp_path / "new" / "run"
    refused(capsys, ["train", "demo", "--out", str(out), *flags({**tiny, **override})], needle)
    assert not (tmp_path / "new").exists()


def test_an_empty_config_name_is_refused_not_read_as_the_defaults(tiny, tmp_path, capsys):
    """`rankprobe train "$CONFIG"` with CONFIG unset: the defaults would train silently in its place."""
    refused(capsys, ["train", "", "--out", str(tmp_path / "r"), *flags(tiny)], "the config is an empty string")
    assert not (tmp_path / "r").exists()


def test_a_toml_that_sets_a_table_to_a_number_cannot_take_an_override(tmp_path, capsys):
    toml = tmp_path / "bad.toml"
    toml.write_text("model = 5\n")
    refused(capsys, ["train", str(toml), "--model.n_layer", "2", "--out", str(tmp_path / "r")],
            "model must be a table of settings")


@pytest.mark.parametrize("model", [ModelConfig(), ModelConfig(n_kv_head=2, qk_norm=True, tie_embeddings=True),
                                   ModelConfig(mlp_hidden=100, qk_norm=True, qk_norm_gain=False)])
def test_the_memory_estimate_counts_the_parameters_the_model_has(model):
    from rankprobe.model import Transformer

    model.vocab_size = 300
    with torch.device("meta"):
        built = Transformer(model)
    matrices = sum(p.numel() for n, p in built.named_parameters() if p.ndim == 2 and n.startswith("blocks"))
    assert param_count(model, 300) == (built.num_params(), matrices)
    cfg = Config(model=model)
    rope = 4 * (built.rope_cos.numel() + built.rope_sin.numel())
    assert state_bytes(cfg) == 16 * built.num_params() + rope  # AdamW: fp32 weights, grads, two moments
    muon = Config(model=model, optim=Config().optim.__class__(name="muon"), sweep=Config().sweep.__class__(
        optimizers=["muon"]))
    assert state_bytes(muon) == 16 * built.num_params() - 4 * matrices + rope  # one momentum buffer: matrices


def test_allow_large_lets_an_oversized_model_past_the_check(tiny):
    from rankprobe.train import preflight

    big = load("demo", {**tiny, "model.n_layer": "100000"})
    with pytest.raises(ConfigError, match="--train.allow_large true"):
        preflight(big)
    assert preflight(load("demo", {**tiny, "model.n_layer": "100000", "train.allow_large": "true"})).type == "cpu"


# ---------------------------------------------------------------------------------------------
# 2. checkpoints you can trust: every defect found before metrics.jsonl is cut back


def _edit_state(run: Path, edit) -> None:
    state = load_checkpoint(run / CHECKPOINT)
    edit(state)
    save_checkpoint(run / CHECKPOINT, {k: v for k, v in state.items() if k != "digest"})  # a fresh digest


@pytest.mark.parametrize("edit, needle", [
    (lambda s: s.update(step=-5), "step -5 lies outside this run's 0..8"),
    (lambda s: s.update(step=10**12), "lies outside this run's 0..8"),
    (lambda s: s.update(tokens_seen=5), "tokens_seen 5 is not step 4 x 64"),
    (lambda s: s["model"].update({k: v.half() for k, v in s["model"].items()}),
     "is float16 [32, 32] there, float32 [32, 32] in this model"),
    (lambda s: s["model"].update(extra=torch.ones(1)), "model tensor extra is float32 [1] there, absent"),
    (lambda s: s.update(pending_rows="garbage"), "pending_rows is not a JSON list"),
    (lambda s: s.update(timing="abc"), "timing is not a table of seconds"),
    (lambda s: s["rng"].update(torch=torch.zeros(3, dtype=torch.uint8)), "random-number-generator state"),
    (lambda s: s.update(config="{not json"), "its config is not a JSON table"),
], ids=["step-negative", "step-huge", "tokens", "fp16", "extra-key", "pending", "timing", "rng", "config"])
def test_a_malformed_checkpoint_is_refused_before_anything_is_cut_back(tiny, cutoff, copy_of, capsys, edit, needle):
    run = copy_of(cutoff)
    with open(run / METRICS, "a") as f:
        f.write('{"kind": "train", "step": 5, "tokens": 320, "loss": 1.0}\n')  # a row the rewind would drop
    _edit_state(run, edit)
    before = files(run)
    refused(capsys, ["train", "demo", "--out", str(run), "--resume", *flags(tiny)], needle)
    assert files(run) == before


def test_a_flipped_byte_fails_the_digest_and_is_never_resumed_from(tiny, cutoff, copy_of, capsys):
    run = copy_of(cutoff)
    data = bytearray((run / CHECKPOINT).read_bytes())
    weights = load_checkpoint(run / CHECKPOINT)["model"]["tok_emb.weight"].numpy().tobytes()
    at = data.find(weights[:64]) + 10  # inside the embedding's bytes: the file still loads
    data[at] ^= 0x01
    (run / CHECKPOINT).write_bytes(bytes(data))
    before = files(run)
    refused(capsys, ["train", "demo", "--out", str(run), "--resume", *flags(tiny)], "fails its SHA-256 check")
    assert files(run) == before


def test_a_checkpoint_without_a_digest_from_an_older_version_resumes_with_a_note(tiny, cutoff, copy_of, caplog):
    run = copy_of(cutoff)
    state = load_checkpoint(run / CHECKPOINT)
    del state["digest"]
    torch.save(state, run / CHECKPOINT)
    assert main(["train", "demo", "--out", str(run), "--resume", *flags(tiny)]) == 0
    assert "has no digest" in caplog.text


class System:
    def __reduce__(self):
        return (os.system, ("true",))


def test_an_unsafe_pickle_is_named_as_such_not_as_corrupt(tiny, cutoff, copy_of, capsys):
    run = copy_of(cutoff)
    torch.save({"format": 1, "model": System()}, run / CHECKPOINT)
    line = refused(capsys, ["train", "demo", "--out", str(run), "--resume", *flags(tiny)], "refusing to load")
    assert "system" in line and "corrupt" not in line


def test_resuming_a_finished_run_under_other_settings_names_them(tiny, finished, copy_of, capsys):
    run = copy_of(finished)
    before = files(run)
    refused(capsys, ["train", "demo", "--out", str(run), "--resume", *flags({**tiny, "optim.lr": "0.01"})],
            "already ended with other settings (optim.lr: 0.003 there, 0.01 now)")
    assert files(run) == before
    assert main(["train", "demo", "--out", str(run), "--resume", *flags(tiny)]) == 0  # same settings: left as is
    assert files(run) == before


def test_a_corpus_edited_since_the_checkpoint_is_never_resumed_on(tiny, tmp_path, capsys):
    """The settings name the same path, so every config check passes: the run went on on other text (and a
    tokenizer trained on it) under its old `run` row, and exited 0."""
    from conftest import train_until_first_checkpoint
    from rankprobe.data.corpus import load_corpus

    corpus, text = tmp_path / "mine.txt", load_corpus("embedded").text
    corpus.write_text(text[:30_000])
    mine = {**tiny, "data.corpus": str(corpus), "data.cache_dir": str(tmp_path / "cache")}
    run = tmp_path / "run"
    train_until_first_checkpoint(load("demo", mine), run)
    corpus.write_text(text[50_000:80_000])
    before = files(run)
    refused(capsys, ["train", "demo", "--out", str(run), "--resume", *flags(mine)], "began on other data")
    assert files(run) == before


# ---------------------------------------------------------------------------------------------
# 3. files: no link followed, no folder outside the one asked for, no user file overwritten


def test_resume_refuses_a_folder_that_holds_no_rankprobe_run(tiny, tmp_path, capsys):
    run = tmp_path / "mine"
    run.mkdir()
    (run / "config.json").write_text('{"mine": true}')
    (run / "env.json").write_text('{"mine": true}')
    before = files(run)
    refused(capsys, ["train", "demo", "--out", str(run), "--resume", *flags(tiny)], "but no RankProbe run")
    assert files(run) == before


def test_links_planted_in_a_run_folder_are_never_written_through(tiny, tmp_path, capsys):
    outside = tmp_path / "outside"
    outside.mkdir()
    run = tmp_path / "run"
    run.mkdir()
    for name in ("config.json", "env.json", "model.safetensors", METRICS, "report.md"):
        (outside / name).write_text("precious")
        (run / name).symlink_to(outside / name)
    assert main(["train", "demo", "--out", str(run), "--force", *flags(tiny)]) == 0
    assert main(["report", str(run)]) == 0
    assert all((outside / n).read_text() == "precious" for n in os.listdir(outside))
    assert not any((run / n).is_symlink() for n in os.listdir(run))
    (run / LOCK).unlink()
    (run / LOCK).symlink_to(outside / "config.json")
    refused(capsys, ["train", "demo", "--out", str(run), "--force", *flags(tiny)], "cannot open lock file")
    assert (outside / "config.json").read_text() == "precious"


def test_resume_never_cuts_back_a_metrics_file_that_is_a_link(tiny, cutoff, copy_of, tmp_path, capsys):
    run = copy_of(cutoff)
    elsewhere = tmp_path / "elsewhere.jsonl"
    (run / METRICS).rename(elsewhere)
    (run / METRICS).symlink_to(elsewhere)
    before = elsewhere.read_bytes()
    refused(capsys, ["train", "demo", "--out", str(run), "--resume", *flags(tiny)], "is a link")
    assert elsewhere.read_bytes() == before


def test_export_keeps_a_run_name_from_a_metrics_file_inside_its_folder(finished, copy_of, tmp_path):
    """A metrics file is input (a published run, an edited one): its run name made a TensorBoard path."""
    pytest.importorskip("tensorboard")
    run = copy_of(finished)
    lines = (run / METRICS).read_text().splitlines()
    row = json.loads(lines[0])
    row["run"] = "../../escaped"
    lines[0] = json.dumps(row)
    (run / METRICS).write_text("\n".join(lines) + "\n")
    assert main(["export", str(run), "--to", "tensorboard", "--out", str(tmp_path / "out" / "inner")]) == 0
    assert sorted(os.listdir(tmp_path / "out")) == ["inner"]
    assert os.listdir(tmp_path / "out" / "inner" / "tensorboard") == ["%2E.%2F..%2Fescaped"]


@pytest.mark.parametrize("to", ["csv", "tensorboard"])
def test_an_export_refused_for_a_corrupt_row_creates_no_folder(finished, copy_of, tmp_path, capsys, to):
    run = copy_of(finished)
    with open(run / METRICS, "a") as f:
        f.write("garbage\n{}\n")  # a corrupt row that is not the last
    refused(capsys, ["export", str(run), "--to", to, "--out", str(tmp_path / "out")], "corrupt metrics row")
    assert not (tmp_path / "out").exists()


def test_run_names_built_from_values_stay_one_folder(tiny):
    cfg = load("demo", tiny)
    names = [c.name for c in scan_configs(cfg, "data.corpus", ["../../x", "/etc/passwd", "a\\b"])]
    assert all("/" not in n and "\\" not in n and not n.startswith(".") for n in names), names
    assert safe_name("optim.lr=3e-3") == "optim.lr=3e-3"  # ordinary names are kept as they are
    assert safe_name("..") == "%2E."


def test_a_run_that_fails_after_taking_the_lock_removes_the_folder_it_made(tiny, tmp_path, capsys):
    out = tmp_path / "a" / "b" / "run"
    refused(capsys, ["train", "demo", "--out", str(out), *flags({**tiny, "data.corpus": str(tmp_path / "none")})],
            "corpus not found")
    assert not (tmp_path / "a").exists()


@pytest.fixture
def file_size_limit():
    """Set RLIMIT_FSIZE (the kernel then fails writes past it with EFBIG, as a full disk fails them
    with ENOSPC) for the block; restored after."""
    old = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    yield lambda n: resource.setrlimit(resource.RLIMIT_FSIZE, (n, old[1]))
    resource.setrlimit(resource.RLIMIT_FSIZE, old)
    signal.signal(signal.SIGXFSZ, handler)


def test_a_full_disk_never_leaves_a_torn_metrics_line(tmp_path, file_size_limit):
    path = tmp_path / METRICS
    out = MetricsWriter(path)
    out.write("run", run="r")
    whole = path.read_bytes()
    file_size_limit(len(whole) + 10)  # room for part of the next row only
    with pytest.raises(FolderError, match="stopped after its last whole row"):
        out.write("train", step=1, tokens=64, loss=1.0, note="x" * 100)
    file_size_limit(resource.RLIM_INFINITY)
    assert path.read_bytes() == whole
    out.write("train", step=1, tokens=64, loss=1.0)  # and the file goes on from there
    out.close()
    assert [json.loads(line)["kind"] for line in path.read_text().splitlines()] == ["run", "train"]


def test_a_full_disk_mid_checkpoint_keeps_the_old_one_and_no_temp_file(cutoff, tmp_path, file_size_limit):
    path = tmp_path / CHECKPOINT
    shutil.copy(cutoff / CHECKPOINT, path)
    state = load_checkpoint(path)
    file_size_limit(4096)
    with pytest.raises(FolderError, match="the previous checkpoint is kept"):
        save_checkpoint(path, {k: v for k, v in state.items() if k != "digest"})
    file_size_limit(resource.RLIM_INFINITY)
    assert load_checkpoint(path)["step"] == 4 and not stale_temp_files(tmp_path, CHECKPOINT)


def test_the_digest_sees_values_dtypes_shapes_and_order_but_not_itself():
    digest = ckpt_mod.state_digest
    base = {"a": torch.ones(2), "n": 1}
    assert digest(base) == digest({**base, "digest": "anything"})
    for other in ({"a": torch.zeros(2), "n": 1}, {"a": torch.ones(2).half(), "n": 1}, {"a": torch.ones(1, 2), "n": 1},
                  {"n": 1, "a": torch.ones(2)}, {"a": torch.ones(2), "n": 1.0}):
        assert digest(other) != digest(base), other


# ---------------------------------------------------------------------------------------------
# 4. the Python API: Monitor's arguments


@pytest.fixture(scope="module")
def tiny_model():
    from rankprobe.model import Transformer

    return Transformer(load("demo", {"model.n_layer": "1", "model.d_model": "32", "model.n_head": "2",
                                     "model.head_dim": "16", "model.seq_len": "16", "model.vocab_size": "300"}).model)


@pytest.mark.parametrize("kwargs, needle", [
    ({"every": float("nan")}, "the cadence must be a whole number"),  # never due: nothing measured
    ({"every": 1.5}, "the cadence must be a whole number"),
    ({"every": "10"}, "the cadence must be a whole number"),  # was a TypeError
    ({"batch_size": 0}, "sequences per forward"),
    ({"taps": ["nrom"]}, "unknown tap(s) nrom"),  # a misspelt tap measured nothing
    ({"taps": 5}, "a list of tap names"),
    ({"heads": 3}, "do not split into 3 heads"),  # 32 features: heads of 10 would misread every head
    ({"heads": 0}, "a number of heads, 1 or more"),  # was a ZeroDivisionError
    ({"sinks": ("tensorboard",)}, "needs out=FOLDER"),  # without out the sinks were dropped, silently
], ids=["every-nan", "every-float", "every-str", "batch-0", "tap-misspelt", "taps-int", "heads-3", "heads-0",
        "sinks-no-out"])
def test_bad_monitor_arguments_are_a_user_error(tiny_model, kwargs, needle):
    from rankprobe import Monitor, Patterns
    from rankprobe.errors import UserError

    if "heads" in kwargs:
        kwargs = {**kwargs, "patterns": Patterns(layers="blocks.*.attn", q="wq", k="wk", v="wv", o="wo")}
    with pytest.raises(UserError) as e:
        Monitor(tiny_model, **kwargs)
    assert needle in str(e.value)


def test_one_tap_may_be_named_as_a_string(tiny_model):
    from rankprobe import Monitor

    tokens = torch.randint(0, 300, (2, 16))
    rows = Monitor(tiny_model, taps="norm", weights=False).probe(tokens)  # not the letters n, o, r, m
    assert {r["tap"] for r in rows if r["kind"] == "probe"} == {"norm"}


def test_a_monitor_never_writes_into_a_run_it_did_not_write(tiny_model, finished, copy_of):
    """Its rows were appended after the run's `end` and read as that run's (a second run row is ignored)."""
    from rankprobe import Monitor

    run = copy_of(finished)
    before = files(run)
    with pytest.raises(FolderError, match="holds a run a Monitor did not write"):
        Monitor(tiny_model, out=run)
    assert files(run) == before
    mine = run.parent / "mine"
    Monitor(tiny_model, out=mine).close()
    Monitor(tiny_model, out=mine).close()  # a Monitor's own file goes on, as a resumed loop's does


@pytest.mark.parametrize("tokens, needle", [
    (torch.zeros(0, 16, dtype=torch.long), "a non-empty (N, T) tensor"),  # measured nothing, said nowhere
    (torch.randint(0, 300, (16,)), "a non-empty (N, T) tensor"),
    (torch.rand(2, 16), "a non-empty (N, T) tensor"),
    (torch.full((2, 16), 300), "ids must lie in [0, 300)"),  # a device-side assert on CUDA
], ids=["empty", "1-d", "float", "past-vocab"])
def test_monitor_probe_tokens_are_checked(tiny_model, tokens, needle):
    from rankprobe import Monitor
    from rankprobe.errors import UserError

    with pytest.raises(UserError) as e:
        Monitor(tiny_model, weights=False).probe(tokens)
    assert needle in str(e.value)

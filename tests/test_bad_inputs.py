"""Bad input that never ends, readers that never crash, models probe cannot load, and sweeps (issue 17):
each ends in one `rankprobe: error:` line and exit 2, with no traceback, no hang and no orphan."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from conftest import files, flags, refused
from rankprobe.cli import main
from rankprobe.config import load
from rankprobe.data.corpus import load_corpus
from rankprobe.errors import DataError, UserError
from rankprobe.files import memory_bound, read_regular
from rankprobe.runfolder import METRICS


class System:
    """A pickle that would run a shell command: what a booby-trapped weights file holds."""

    def __reduce__(self):
        return (os.system, ("true",))


# ---------------------------------------------------------------------------------------------
# 3. usage mistakes argparse catches


@pytest.mark.parametrize("argv, needle", [
    ([], "the following arguments are required: COMMAND"),
    (["nonsense"], "invalid choice: 'nonsense'"),
    (["train"], "the following arguments are required: CONFIG"),
    (["sweep", "demo", "--workers", "x"], "argument --workers: invalid int value: 'x'"),
    (["export", "runs", "--to", "xlsx"], "argument --to: invalid choice: 'xlsx'"),
    (["train", "demo", "--resume", "--force"], "argument --force: not allowed with argument --resume"),
], ids=["no-command", "unknown-command", "no-config", "bad-int", "bad-choice", "exclusive"])
def test_a_usage_mistake_is_one_line_too(capsys, argv, needle):
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        main(argv)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert stop.value.code == 2 and len(err) == 1 and err[0].startswith("rankprobe: error: ") and needle in err[0], err


def test_a_misspelt_option_is_named_not_the_value_after_it(tiny, tmp_path, capsys):
    """`--resum` took the next flag as its value, and the error named the `1` after that."""
    refused(capsys, ["train", "demo", "--out", str(tmp_path / "r"), "--resum", *flags(tiny)],
            "unknown config key resum")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("content", [b"\xaf\x00garbage", b"not json", b"[1]"], ids=["binary", "text", "list"])
def test_the_internal_arm_command_refuses_a_file_that_is_no_config(tmp_path, capsys, monkeypatch, content):
    import rankprobe.sweep

    monkeypatch.setattr(rankprobe.sweep, "die_with_parent", lambda: None)  # not this test process
    (tmp_path / "cfg.json").write_bytes(content)
    refused(capsys, ["_arm", str(tmp_path / "cfg.json"), "--out", str(tmp_path / "r")], "is not a resolved config")
    assert not (tmp_path / "r").exists()


# ---------------------------------------------------------------------------------------------
# 4. inputs that never end


class Refused(Exception):
    """The error class a caller of read_regular chooses; no relative of OSError or UserError."""


def _within_seconds(fn, seconds: float = 5.0) -> Exception | None:
    """What fn() raised, or None; fails if it has not returned within `seconds` (a reader blocked on a
    FIFO never would: the thread is a daemon, so it cannot hold the test process open)."""
    raised = []

    def call():
        try:
            fn()
        except Exception as e:
            raised.append(e)

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), "the read blocked"
    return raised[0] if raised else None


def test_read_regular_returns_a_files_exact_bytes_and_refuses_anything_else_at_once(tmp_path):
    """rankprobe.files.read_regular, the one reader of files a user names: a regular file's bytes, exactly;
    a FIFO with no writer, a socket, a device, a folder, a missing name and a file over the limit each raise
    the caller's class with the caller's words, at once."""
    data = os.urandom(4096) + b"\x00\xff\n"
    good = tmp_path / "good.bin"
    good.write_bytes(data)
    (tmp_path / "link").symlink_to(good)
    (tmp_path / "empty").write_bytes(b"")
    assert read_regular(good, "test file", Refused) == data
    assert read_regular(tmp_path / "link", "test file", Refused, limit=len(data)) == data  # the limit is inclusive
    assert read_regular(tmp_path / "empty", "test file", Refused) == b""
    os.mkfifo(tmp_path / "fifo")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(tmp_path / "sock"))
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():  # Linux: MemTotal counts the same pages sysconf gives
        kb = next(int(line.split()[1]) for line in meminfo.read_text().splitlines() if line.startswith("MemTotal"))
        assert memory_bound() == kb * 1024 // 8
    sparse = tmp_path / "sparse"
    with open(sparse, "wb") as f:
        f.truncate(memory_bound() + 1)  # a hole: no disk used, and never read
    cases = [
        (tmp_path / "fifo", {}, f"test file {tmp_path / 'fifo'} is not a regular file but a pipe (FIFO)"),
        (tmp_path / "sock", {"expect": "a TOML file"},
         f"test file {tmp_path / 'sock'} is not a TOML file but a socket"),
        ("/dev/zero", {"hint": "give a file"},
         "test file /dev/zero is not a regular file but a character device (give a file)"),
        (tmp_path, {}, f"test file {tmp_path} is not a regular file but a folder"),
        (tmp_path / "nope", {"hint": "or a preset"}, f"test file not found: {tmp_path / 'nope'} (or a preset)"),
        (good / "x", {}, f"cannot read test file {good / 'x'}: Not a directory"),
        (good, {"limit": len(data) - 1},
         f"test file {good} is {len(data)} bytes, more than {len(data) - 1} bytes"),
        (sparse, {}, f"test file {sparse} is {(memory_bound() + 1) / 2**30:.1f} GiB, more than an eighth of this "
                     f"machine's memory ({memory_bound() / 2**30:.1f} GiB)"),
    ]
    try:
        for path, options, message in cases:
            error = _within_seconds(lambda: read_regular(path, "test file", Refused, **options))
            assert type(error) is Refused and str(error) == message, (path, error)
    finally:
        sock.close()


def test_a_corpus_must_be_a_regular_file(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(tmp_path / "sock"))
    try:
        for path in (fifo, "/dev/zero", tmp_path / "sock"):
            t0 = time.monotonic()
            with pytest.raises(DataError, match="is not a regular file"):
                load_corpus(str(path))
            assert time.monotonic() - t0 < 5
    finally:
        sock.close()


def test_an_empty_corpus_name_is_refused_not_read_as_the_current_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("text that is no corpus of the user's choosing\n")
    with pytest.raises(DataError, match="the corpus is an empty string"):
        load_corpus("")


def test_a_config_must_be_a_regular_file(tmp_path, capsys):
    """A FIFO blocked `rankprobe train` for ever; /dev/zero filled the memory, then read as out of memory."""
    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo)
    for path in (fifo, "/dev/zero", tmp_path):
        t0 = time.monotonic()
        refused(capsys, ["train", str(path), "--out", str(tmp_path / "r")], "is not a TOML file")
        assert time.monotonic() - t0 < 5
    assert not (tmp_path / "r").exists()


def test_a_tokenizer_file_and_a_metrics_file_must_be_regular_files(tmp_path):
    """A FIFO blocked training (data.tokenizer), `rankprobe report` (a metrics.jsonl) or `rankprobe probe`
    (a run folder's config.json) for ever."""
    from rankprobe.data.tokenizer import load_tiktoken
    from rankprobe.probes.hf import probe_checkpoint
    from rankprobe.runfolder import read_rows

    fifo = tmp_path / METRICS
    os.mkfifo(fifo)
    t0 = time.monotonic()
    for path in (fifo, Path("/dev/zero")):
        with pytest.raises(DataError, match="is not a .tiktoken file"):
            load_tiktoken(path)
    with pytest.raises(UserError, match="is not a regular file"):
        read_rows(fifo)
    os.mkfifo(tmp_path / "config.json")  # a run folder's, for `rankprobe probe`
    with pytest.raises(DataError, match="is not a Hugging Face model folder"):
        probe_checkpoint([str(tmp_path)], tmp_path / "out")
    assert time.monotonic() - t0 < 5 and not (tmp_path / "out").exists()


def test_an_hf_config_too_big_for_memory_is_refused_before_it_is_built(tmp_path):
    pytest.importorskip("transformers")
    from rankprobe.probes.hf import hf_config

    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "llama", "num_hidden_layers": 100_000, "hidden_size": 8192, "intermediate_size": 22016,
        "num_attention_heads": 64, "vocab_size": 32000}))
    t0 = time.monotonic()
    with pytest.raises(DataError, match="describes about"):
        hf_config(tmp_path)
    assert time.monotonic() - t0 < 10


# ---------------------------------------------------------------------------------------------
# 5. readers that never crash


@pytest.mark.parametrize("field, change, needle", [
    ("run", lambda r: r.update(config=None), "`config` of a run row is null, not dict"),
    ("run", lambda r: r.update(seed="abc"), "`seed` of a run row is \"abc\", not int"),
    ("run", lambda r: r.update(head_dim="16"), "`head_dim` of a run row"),
    ("run", lambda r: r["config"].update(probe="x"), "`config.probe` is \"x\", not a table"),
    ("probe", lambda r: r.update(tokens=None), "`tokens` of a probe row is null, not int"),
    ("probe", lambda r: r.pop("tap"), "a probe row without `tap`"),
])
def test_the_report_names_the_first_bad_row(finished, copy_of, capsys, field, change, needle):
    run = copy_of(finished)
    lines = (run / METRICS).read_text().splitlines()
    at = next(i for i, line in enumerate(lines) if json.loads(line)["kind"] == field)
    row = json.loads(lines[at])
    change(row)
    lines[at] = json.dumps(row)
    (run / METRICS).write_text("\n".join(lines) + "\n")
    refused(capsys, ["report", str(run)], f"{run / METRICS}, line {at + 1}: bad metrics row ({needle}")


def test_a_json_line_nested_too_deep_is_a_bad_row_not_a_crash(finished, copy_of, capsys):
    run = copy_of(finished)
    lines = (run / METRICS).read_text().splitlines()
    lines.insert(1, "[" * 100_000 + "]" * 100_000)
    (run / METRICS).write_text("\n".join(lines) + "\n")
    refused(capsys, ["report", str(run)], "line 2: corrupt metrics row")


@pytest.mark.parametrize("text", ["", "\x00\x00\x00", "precious notes, no metrics\n"], ids=["empty", "torn", "not-json"])
def test_a_report_with_no_readable_run_is_the_error_alone(tmp_path, capsys, text):
    """A warning per file (no run row, a torn last line) before the error would print three lines, not one."""
    (tmp_path / METRICS).write_text(text)
    import warnings

    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        refused(capsys, ["report", str(tmp_path)], "no readable runs under")
    assert not said, [str(w.message) for w in said]
    assert sorted(os.listdir(tmp_path)) == [METRICS]


def test_a_report_that_cannot_be_written_is_one_line(finished, copy_of, capsys):
    run = copy_of(finished)
    (run / "report.md").mkdir()  # as root, a read-only folder is still writable: a folder in the way fails the same
    refused(capsys, ["report", str(run)], "report.md")


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory):
    """A one-layer Llama folder with a tokenizer of its own, as `rankprobe probe` takes it."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_attention_heads=2, num_key_value_heads=2,
                                   num_hidden_layers=1, vocab_size=300, max_position_embeddings=32)
    path = tmp_path_factory.mktemp("llama")
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.train_from_iterator([load_corpus("embedded").text[:20_000]],
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>"]))
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(path)
    return path


def _unknown_with_auto_map(p):
    (p / "config.json").write_text(json.dumps({"model_type": "evil", "auto_map": {"AutoConfig": "evil.Config"}}))
    (p / "evil.py").write_text(f"open({str(p / 'pwned')!r}, 'w')\n")


def _truncated(p):
    f = p / "model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])


def _pickle_only(p):
    from safetensors.torch import load_file

    torch.save(load_file(p / "model.safetensors"), p / "pytorch_model.bin")
    (p / "model.safetensors").unlink()
    torch.save({"x": System()}, p / "pytorch_model.bin")  # and an unsafe one at that


def _config_says(**change):
    def damage(p):
        (p / "config.json").write_text(json.dumps({**json.loads((p / "config.json").read_text()), **change}))
    return damage


@pytest.mark.parametrize("damage, needle", [
    (_unknown_with_auto_map, "model_type 'evil' is not supported"),
    (_config_says(num_hidden_layers=2), "lack 9 tensor(s) of the model its config.json describes"),  # not random ones
    (_config_says(num_hidden_layers=0), "describes a model of no layers"),
    (_config_says(rms_norm_eps=float("nan")), "every key statistic is NaN or infinite"),  # not rows of nulls
    (lambda p: (p / "config.json").write_text("[1, 2]"), "config.json is not a Hugging Face model config (a list"),
    (lambda p: (p / "model.safetensors").unlink(), "no weights"),
    (_truncated, "cannot load the model in"),
    (_pickle_only, "pytorch_model.bin"),
], ids=["auto-map", "more-layers", "no-layers", "nan-activations", "list", "no-weights", "truncated", "pickle"])
def test_probe_maps_every_loading_failure_to_one_line(hf_llama, tmp_path, capsys, damage, needle):
    model = Path(shutil.copytree(hf_llama, tmp_path / "model"))
    damage(model)
    refused(capsys, ["probe", str(model), "--out", str(tmp_path / "out"), "--device", "cpu", "--seq-len", "16",
                     "--tokens", "64"], needle)
    assert not (model / "pwned").exists() and not (tmp_path / "out").exists()


def test_the_undamaged_model_probes(hf_llama, tmp_path):  # so the refusals above are the damage's doing
    assert main(["probe", str(hf_llama), "--out", str(tmp_path / "out"), "--seq-len", "16", "--tokens", "64"]) == 0


def test_probe_into_the_model_folder_itself_never_overwrites_its_config(hf_llama, tmp_path, capsys):
    """`--out MODEL` wrote RankProbe's config.json over the model's own, exit 0: the model was gone."""
    model = Path(shutil.copytree(hf_llama, tmp_path / "model"))
    before = files(model)
    for force in ([], ["--force"]):
        refused(capsys, ["probe", str(model), "--out", str(model), "--seq-len", "16", "--tokens", "64", *force],
                "holds config.json but no RankProbe run")
    assert files(model) == before


def _tokenizer_of_unknown_type(p):
    tok = json.loads((p / "tokenizer.json").read_text())
    tok["model"]["type"] = "Evil"
    (p / "tokenizer.json").write_text(json.dumps(tok))


def test_probe_refuses_a_tokenizer_it_cannot_build_in_one_line(hf_llama, tmp_path, capsys):
    model = Path(shutil.copytree(hf_llama, tmp_path / "model"))
    _tokenizer_of_unknown_type(model)
    refused(capsys, ["probe", str(model), "--out", str(tmp_path / "out"), "--seq-len", "16", "--tokens", "64"],
            f"no usable tokenizer in {model}")


@pytest.mark.parametrize("edit, needle", [
    (lambda c: c["model"].update(extra=1), "unknown config key model.extra"),
    (lambda c: c["model"].update(n_layer=10**7, d_model=8192), "more than this machine's"),
    (lambda c: c.update(data=[1]), "data must be a table of settings"),
], ids=["extra-key", "too-big", "not-a-table"])
def test_probe_of_a_run_folder_with_a_bad_config_is_one_line(finished, copy_of, capsys, tmp_path, edit, needle):
    run = copy_of(finished)
    cfg = json.loads((run / "config.json").read_text())
    edit(cfg)
    (run / "config.json").write_text(json.dumps(cfg))
    line = refused(capsys, ["probe", str(run), "--out", str(tmp_path / "out")], needle)
    assert f"{run / 'config.json'}" in line


def test_probe_of_a_run_folder_missing_a_table_takes_its_defaults(finished, copy_of, tmp_path):
    run = copy_of(finished)
    cfg = json.loads((run / "config.json").read_text())
    del cfg["sweep"]
    (run / "config.json").write_text(json.dumps(cfg))
    assert main(["probe", str(run), "--out", str(tmp_path / "out")]) == 0


# ---------------------------------------------------------------------------------------------
# 6. sweeps


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for t in os.listdir(f"/proc/{pid}/task")
                for c in Path(f"/proc/{pid}/task/{t}/children").read_text().split()]
    except OSError:
        return []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_killed_sweep_leaves_no_worker_behind(tiny, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src"), "PYTHONWARNINGS": "ignore"}
    slow = {**tiny, "train.tokens": "200000", "probe.checkpoints": "0"}  # a worker that would run for minutes
    sweep = subprocess.Popen([sys.executable, "-m", "rankprobe.cli", "sweep", "demo", "--out", str(tmp_path / "s"),
                              "--workers", "1", *flags(slow)], env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not (workers := _children(sweep.pid)) or not (tmp_path / "s" / "adamw-s0" / METRICS).exists():
        assert sweep.poll() is None and time.monotonic() < deadline, "the sweep never started its worker"
        time.sleep(0.05)
    sweep.kill()
    sweep.wait()
    deadline = time.monotonic() + 20
    try:
        while alive := [w for w in workers if _running(w)]:
            assert time.monotonic() < deadline, f"worker {alive} outlived its sweep"
            time.sleep(0.05)
    finally:  # a failing test must not leave the orphan it found
        for w in workers:
            if _running(w):
                os.kill(w, signal.SIGKILL)


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_a_scan_over_the_corpus_reads_each_value_and_stays_in_its_folder(tiny, tmp_path, capsys):
    """A scan's values reach the data too (each run tokenizes its own corpus), and a value that is a
    path builds a run folder inside the scan folder, not where the path points."""
    scan = tmp_path / "deep" / "scan"
    refused(capsys, ["scan", "demo", "--param", "data.corpus", "--values", "../../x", "--out", str(scan),
                     *flags(tiny)], "corpus not found: ../../x")
    assert not (tmp_path / "deep").exists() and not (tmp_path / "x").exists()


@pytest.mark.parametrize("command", [["sweep", "demo"], ["scan", "demo", "--param", "optim.lr", "--values", "1e-3"]])
def test_a_sweep_into_the_folder_of_a_single_run_is_refused_before_training(tiny, finished, copy_of, capsys, command):
    """Else its arms train inside the other run's folder (for hours, at full size) and the report then
    refuses the two runs of one arm."""
    run = copy_of(finished)
    before = sorted(os.listdir(run))
    refused(capsys, [*command, "--out", str(run), *flags(tiny)], "holds a single run (metrics.jsonl)")
    assert sorted(os.listdir(run)) == before


@pytest.mark.parametrize("param", ["sweep.seeds", "name", "arm"])
def test_a_scan_over_a_setting_no_run_reads_is_refused(tiny, tmp_path, capsys, param):
    """Scanning sweep.seeds trained the same seed-0 run twice: two "seeds" that agree exactly."""
    refused(capsys, ["scan", "demo", "--param", param, "--values", "1,2", "--out", str(tmp_path / "scan"),
                     *flags(tiny)], f"--param {param}: a single run does not read it")
    assert not (tmp_path / "scan").exists()


def test_a_grid_whose_runs_would_share_a_folder_is_refused(tiny, tmp_path):
    from rankprobe.sweep import run_scan

    with pytest.raises(UserError, match="would share the folder"):
        run_scan(load("demo", tiny), tmp_path / "scan", "optim.lr", ["1e-3", "1e-3"])
    assert not (tmp_path / "scan").exists()

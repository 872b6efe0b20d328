"""Seeded fuzzing of the CLI's inputs (issue 17): random corruptions of a real metrics file, a real
checkpoint and a real config, fed to `rankprobe` in this process. Whatever the damage, the command
either works or refuses with exit 2 and one `rankprobe: error:` line; it never raises (a traceback),
never changes a run it refuses, and never touches a file outside the run folder."""

import json
import random
import shutil
from pathlib import Path

import pytest

from conftest import TINY, flags
from rankprobe.cli import main
from rankprobe.config import Config, all_keys
from rankprobe.runfolder import CHECKPOINT, LOCK, METRICS

SEED = 17
JUNK = [None, -1, 0, 10**30, -1e308, 1e308, "abc", "", [], [None], {}, {"a": [1]}, True, [[[[]]]]]


def snapshot(root: Path, skip: tuple[Path, ...]) -> dict:
    """Every file under `root` outside `skip`, with its bytes: what a command must leave alone."""
    return {p: p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not any(p.is_relative_to(s) for s in skip)}


def run_cli(capsys, argv: list[str]) -> tuple[int, list[str]]:
    capsys.readouterr()
    code = main(argv)  # a traceback would be an exception escaping here, failing the test
    return code, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def one_line_or_success(code: int, err: list[str], ok: tuple[int, ...] = (0,)) -> None:
    assert code in (*ok, 2), (code, err)
    if code == 2:
        assert len(err) == 1 and err[0].startswith("rankprobe: error: "), err


def corrupt_metrics(rng: random.Random, text: str) -> str:
    lines = text.splitlines()
    how = rng.choice(["flip", "cut", "value", "drop-key", "insert"])
    if how == "flip":
        data = bytearray(text.encode())
        for _ in range(rng.randint(1, 3)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        return data.decode("utf-8", errors="replace")
    if how == "cut":
        return text[: rng.randrange(len(text))]
    i = rng.randrange(len(lines))
    if how == "insert":
        lines.insert(i, rng.choice(["{", "[]", "null", '{"kind": 5}', '"x"', "{" * 5000 + "}" * 5000]))
        return "\n".join(lines) + "\n"
    row = json.loads(lines[i])
    key = rng.choice(sorted(row))
    if how == "drop-key":
        del row[key]
    else:
        row[key] = rng.choice(JUNK)
    lines[i] = json.dumps(row)
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("case", range(20))
def test_corrupt_metrics_files(finished, tmp_path, capsys, case):
    rng = random.Random(SEED * 1000 + case)
    run = Path(shutil.copytree(finished, tmp_path / "run"))
    (run / METRICS).write_text(corrupt_metrics(rng, (run / METRICS).read_text()))
    before = snapshot(tmp_path, (run,))
    one_line_or_success(*run_cli(capsys, ["report", str(run)]))
    assert snapshot(tmp_path, (run,)) == before


def corrupt_checkpoint(rng: random.Random, path: Path) -> None:
    data = bytearray(path.read_bytes())
    if rng.random() < 0.2:
        del data[rng.randrange(len(data)):]
    else:
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("case", range(15))
def test_corrupt_checkpoints(tiny, cutoff, tmp_path, capsys, case):
    rng = random.Random(SEED * 2000 + case)
    run = Path(shutil.copytree(cutoff, tmp_path / "run"))
    corrupt_checkpoint(rng, run / CHECKPOINT)
    kept = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name != LOCK}
    before = snapshot(tmp_path, (run, Path(tiny["data.cache_dir"])))
    code, err = run_cli(capsys, ["train", "demo", "--out", str(run), "--resume", *flags(tiny)])
    one_line_or_success(code, err)  # 0 only where the damage missed every byte the checkpoint's digest covers
    if code == 2:
        assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name != LOCK} == kept
    assert snapshot(tmp_path, (run, Path(tiny["data.cache_dir"]))) == before


# Keys whose every value is a free string (a name, a path): any junk string is a valid value there.
FREE_STRINGS = {"name", "out", "data.corpus", "data.cache_dir", "data.jsonl_field", "data.tokenizer", "optim.cls"}
BAD = ["nan", "inf", "-inf", "1e400", '"abc"', "[1, \"x\"]", "{a = 1}", str(2**70), "-7"]


def toml_value(key: str, value, types: dict) -> bool:
    """Whether the TOML literal `value` is surely invalid for `key` (the fuzz must only make bad configs)."""
    tp = types[key]
    if value == "-7":
        return tp is int and key not in ("train.seed",)  # negative sizes; a negative seed is fine
    if value == str(2**70):
        return tp is int
    return not (value == '"abc"' and tp is str and key not in ("optim.name", "optim.decay", "probe.tap",
                                                                "train.dtype", "optim.ns_dtype", "train.compile"))


@pytest.mark.parametrize("case", range(15))
def test_corrupt_configs(tiny, tmp_path, capsys, case):
    import typing

    rng = random.Random(SEED * 3000 + case)
    types = {}
    for key in all_keys():
        section, _, leaf = key.rpartition(".")
        cls = typing.get_type_hints(Config)[section] if section else Config
        types[key] = typing.get_origin(typing.get_type_hints(cls)[leaf]) or typing.get_type_hints(cls)[leaf]
    key, value = rng.choice([(k, v) for k in all_keys() if k not in FREE_STRINGS and k not in TINY
                             for v in BAD if toml_value(k, v, types)])
    section, _, leaf = key.rpartition(".")
    toml = tmp_path / "fuzz.toml"
    toml.write_text(f"[{section}]\n{leaf} = {value}\n")
    run = tmp_path / "out" / "run"
    before = snapshot(tmp_path, ())
    code, err = run_cli(capsys, ["train", str(toml), "--out", str(run), *flags(tiny)])
    assert code == 2 and len(err) == 1 and err[0].startswith("rankprobe: error: "), (key, value, code, err)
    assert not (tmp_path / "out").exists() and snapshot(tmp_path, ()) == before

"""`rankprobe probe` on checkpoint series and its guard rails: tiny random Llama / GPT-2 folders saved
here with a tokenizer trained here (nothing downloaded), run through the CLI as a user would."""

import json
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from rankprobe.cli import main  # noqa: E402
from rankprobe.data.corpus import load_corpus  # noqa: E402

V = 300
ARGS = ["--tokens", "256", "--seq-len", "32", "--batch-size", "4"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.train_from_iterator([load_corpus("embedded").text[:40_000]],
                            trainers.BpeTrainer(vocab_size=V, special_tokens=["<unk>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def llama(seed: int, **kw):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
                                   num_hidden_layers=2, vocab_size=V, max_position_embeddings=64, **kw)
    return transformers.AutoModelForCausalLM.from_config(cfg)


def rows_of(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trainer_output(tmp_path_factory, tokenizer):
    """An HF Trainer output folder: checkpoint-N with trainer_state.json, the tokenizer beside them."""
    out = tmp_path_factory.mktemp("trainer")
    tokenizer.save_pretrained(out)
    for i, step in enumerate((10, 20, 30)):
        ckpt = out / f"checkpoint-{step}"
        llama(i).save_pretrained(ckpt)
        (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": step, "num_input_tokens_seen": step * 512}))
    return out


def test_a_trainer_output_folder_becomes_one_trajectory_the_report_draws(trainer_output, tmp_path):
    study = tmp_path / "study"
    assert main(["probe", str(trainer_output), "--out", str(study / "series"), "--arm", "my-llama", *ARGS]) == 0
    rows = rows_of(study / "series")
    run = rows[0]
    assert run["arm"] == "my-llama" and run["optimizer"] == "checkpoints" and "source" not in run
    assert run["probe_checkpoints"] == [5120, 10240, 15360] and run["seq_len"] == 32 and run["dtype"] == "fp32"
    assert [c["step"] for c in run["checkpoints"]] == [10, 20, 30]
    assert len({c["weights_sha256"] for c in run["checkpoints"]}) == 3  # three different models
    assert run["data"]["corpus_sha256"] == load_corpus("embedded").sha256
    assert len(run["data"]["tokenizer"]["sha256"]) == 64 and run["data"]["long_context"] is False
    for kind, per in (("probe", 14), ("attn", 2), ("weights", 8)):
        got = [(r["step"], r["tokens"]) for r in rows if r["kind"] == kind]
        assert sorted(set(got)) == [(10, 5120), (20, 10240), (30, 15360)] and len(got) == 3 * per
    assert rows[-1]["kind"] == "end" and rows[-1]["tokens"] == 15360

    # beside it, the last checkpoint alone as a reference; then the report draws both
    assert main(["probe", str(trainer_output / "checkpoint-30"), "--out", str(study / "final"), *ARGS]) == 0
    assert rows_of(study / "final")[0]["optimizer"] == "pretrained"
    assert main(["report", str(study)]) == 0
    report = (study / "report.md").read_text()
    assert "my-llama" in report and "hf:llama" in report


def test_pythia_style_step_folders_need_a_token_count(trainer_output, tmp_path, tokenizer, capsys):
    for i, step in enumerate((1000, 2000)):
        llama(10 + i).save_pretrained(tmp_path / f"step{step}")
        tokenizer.save_pretrained(tmp_path / f"step{step}")
    glob = str(tmp_path / "step*")
    assert main(["probe", glob, "--out", str(tmp_path / "p"), *ARGS]) == 2
    assert "--tokens-per-step" in capsys.readouterr().err
    assert main(["probe", glob, "--out", str(tmp_path / "p"), "--tokens-per-step", "2048", *ARGS]) == 0
    assert rows_of(tmp_path / "p")[0]["probe_checkpoints"] == [2_048_000, 4_096_000]
    wider = tmp_path / "step3000"
    transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(
        hidden_size=64, intermediate_size=48, num_attention_heads=4, num_hidden_layers=2, vocab_size=V,
        max_position_embeddings=64)).save_pretrained(wider)
    assert main(["probe", glob, "--out", str(tmp_path / "q"), "--tokens-per-step", "2048", *ARGS]) == 2
    assert "is another model than" in capsys.readouterr().err


def test_two_probes_claiming_one_arm_are_refused_by_the_report(trainer_output, tmp_path, capsys):
    for name in ("a", "b"):
        assert main(["probe", str(trainer_output / "checkpoint-10"), "--out", str(tmp_path / name), *ARGS]) == 0
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "hf:llama seed 0 appears twice" in err[-1] and "--arm" in err[-1]
    assert "Traceback" not in "\n".join(err)


def test_one_line_refusals(tmp_path, tokenizer, capsys):
    gpt2 = tmp_path / "gpt2"
    transformers.AutoModelForCausalLM.from_config(transformers.GPT2Config(
        n_embd=32, n_head=4, n_layer=2, vocab_size=V, n_positions=64, bos_token_id=0,
        eos_token_id=0)).save_pretrained(gpt2)
    short = tmp_path / "short"
    llama(0).save_pretrained(short)  # 64 positions, no tokenizer
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        (["probe", str(gpt2)], "--seq-len 512 is longer than the 64 learned positions"),
        (["probe", str(gpt2), "--seq-len", "128", "--allow-long-context"], "learned positions"),
        (["probe", str(short), "--seq-len", "128"], "--allow-long-context"),
        (["probe", str(empty)], "is not a Hugging Face model folder (no config.json)"),
        (["probe", str(short), "--seq-len", "32"], "has no tokenizer"),
        (["probe", str(short), "--dtype", "fp64"], "invalid choice"),
        (["probe", str(tmp_path / "nowhere")], "is not a folder"),
    ]
    if not torch.cuda.is_available():
        cases.append((["probe", str(short), "--device", "cuda"], "CUDA is not available"))
    for argv, message in cases:
        with pytest.raises(SystemExit) if message == "invalid choice" else _no_raise():
            assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert message in err[-1], (argv, err)
        assert "Traceback" not in "\n".join(err)


class _no_raise:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_long_context_when_asked_and_bf16_weights_give_float64_statistics_close_to_fp32(tmp_path, tokenizer):
    model = tmp_path / "m"
    llama(3).save_pretrained(model)
    tokenizer.save_pretrained(model)
    assert main(["probe", str(model), "--out", str(tmp_path / "long"), "--tokens", "256", "--seq-len", "128",
                 "--allow-long-context"]) == 0
    long = rows_of(tmp_path / "long")
    assert long[0]["seq_len"] == 128 and long[0]["data"]["long_context"] is True and long[0]["max_positions"] == 64
    assert {r["seq_len"] for r in long if r["kind"] == "attn"} == {128}
    runs = {}
    for dtype in ("fp32", "bf16"):
        assert main(["probe", str(model), "--out", str(tmp_path / dtype), "--dtype", dtype, *ARGS]) == 0
        rows = rows_of(tmp_path / dtype)
        assert rows[0]["dtype"] == dtype
        runs[dtype] = {(r["tap"], r["tensor"], r["layer"]): r["pr"] for r in rows if r["kind"] == "probe"}
    assert runs["bf16"].keys() == runs["fp32"].keys()
    assert all(math.isclose(runs["bf16"][k], runs["fp32"][k], rel_tol=0.05) for k in runs["fp32"])

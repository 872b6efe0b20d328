"""`rankprobe probe` on checkpoint series as they lie on real disks: a Trainer output folder that also
holds its final model, step folders that are links into a download cache, a half-written checkpoint,
a tokenizer that changes mid-series, trainer states whose token counts cannot be trusted. Tiny random
Llama folders saved here (test_probe_series's), nothing downloaded."""

import json
import logging
import os
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from rankprobe.cli import main  # noqa: E402
from rankprobe.config import DataError  # noqa: E402
from rankprobe.probes.series import default_out, find_checkpoints, stored_dtype  # noqa: E402
from test_probe_series import V, llama, rows_of, tokenizer  # noqa: E402,F401

ARGS = ["--tokens", "128", "--seq-len", "32", "--batch-size", "4"]


def checkpoint(folder, step, seed=0, tokens=None, **state):
    """A Trainer checkpoint-N folder: a tiny model and its trainer_state.json."""
    llama(seed).save_pretrained(folder)
    state = {"global_step": step} | ({"num_input_tokens_seen": tokens} if tokens is not None else {}) | state
    (folder / "trainer_state.json").write_text(json.dumps(state))
    return folder


def test_a_trainer_output_folder_that_holds_its_final_model_is_still_its_series(tmp_path, tokenizer, caplog):
    """trainer.save_model() writes the final model beside the checkpoint-N folders: the folder is the
    series of its checkpoints, not one pretrained reference of the model on top."""
    out = tmp_path / "trainer"
    for i, step in enumerate((10, 20)):
        checkpoint(out / f"checkpoint-{step}", step, seed=i, tokens=step * 512)
    llama(5).save_pretrained(out)
    tokenizer.save_pretrained(out)
    with caplog.at_level(logging.WARNING):
        assert main(["probe", str(out), "--out", str(tmp_path / "p"), *ARGS]) == 0
    run = rows_of(tmp_path / "p")[0]
    assert run["optimizer"] == "checkpoints" and run["probe_checkpoints"] == [5120, 10240]
    assert [c["path"] for c in run["checkpoints"]] == [str(out / "checkpoint-10"), str(out / "checkpoint-20")]
    assert "a model of its own" in caplog.text and "checkpoint-10" in caplog.text


def test_step_folders_that_are_links_keep_their_names_and_steps(tmp_path, tokenizer):
    """Pythia revisions linked from a download cache (step1000 -> snapshots/<hash>): the step is the
    link's name, and the default output folder sits beside the series, not in the cache."""
    series = tmp_path / "pythia"
    series.mkdir()
    for i, step in enumerate((1000, 2000)):
        target = tmp_path / "cache" / "snapshots" / f"{i}a5f"
        llama(i).save_pretrained(target)
        tokenizer.save_pretrained(target)
        os.symlink(target, series / f"step{step}")
    assert main(["probe", str(series), "--tokens-per-step", "100", *ARGS]) == 0
    run = rows_of(tmp_path / "pythia-probe")[0]
    assert [c["step"] for c in run["checkpoints"]] == [1000, 2000] and run["probe_checkpoints"] == [100_000, 200_000]
    assert [c["path"] for c in run["checkpoints"]] == [str(series / "step1000"), str(series / "step2000")]
    # a link whose target is gone (a cleaned cache) is refused, not passed over
    os.symlink(tmp_path / "cache" / "snapshots" / "gone", series / "step3000")
    with pytest.raises(DataError, match="step3000"):
        find_checkpoints([str(series)], 100)
    (series / "step3000").unlink()
    # the same folder named twice (a link and its target) is probed once
    found = find_checkpoints([str(series / "step1000"), str(tmp_path / "cache" / "snapshots" / "0a5f")], 100)
    assert [(c.path.name, c.step) for c in found] == [("step1000", 1000)]


def test_a_checkpoint_folder_without_a_model_config_is_refused_not_skipped(tmp_path, tokenizer, capsys):
    out = tmp_path / "trainer"
    for i, step in enumerate((10, 20, 30)):
        checkpoint(out / f"checkpoint-{step}", step, seed=i, tokens=step * 512)
    tokenizer.save_pretrained(out)
    (out / "checkpoint-20" / "config.json").unlink()  # a checkpoint still being written, or a broken copy
    assert main(["probe", str(out), "--out", str(tmp_path / "p"), *ARGS]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "checkpoint-20" in err[-1] and "config.json" in err[-1] and "Traceback" not in "\n".join(err)
    assert not (tmp_path / "p").exists()


def test_a_tokenizer_that_changes_mid_series_is_refused(tmp_path, tokenizer, capsys):
    """The probe text is tokenized once; a checkpoint whose own tokenizer encodes it otherwise would be
    measured on ids that mean other words to it."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from rankprobe.data.corpus import load_corpus

    other = Tokenizer(models.BPE(unk_token="<unk>"))
    other.pre_tokenizer = pre_tokenizers.ByteLevel()
    other.train_from_iterator([load_corpus("embedded").text[-40_000:]],
                              trainers.BpeTrainer(vocab_size=V, special_tokens=["<unk>"]))
    for i, (step, tok) in enumerate(((1000, tokenizer), (2000, PreTrainedTokenizerFast(tokenizer_object=other)))):
        llama(i).save_pretrained(tmp_path / "s" / f"step{step}")
        tok.save_pretrained(tmp_path / "s" / f"step{step}")
    assert main(["probe", str(tmp_path / "s"), "--tokens-per-step", "8", "--out", str(tmp_path / "p"), *ARGS]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "step2000" in err[-1] and "tokenizer" in err[-1] and "Traceback" not in "\n".join(err)
    tokenizer.save_pretrained(tmp_path / "s" / "step2000")  # the same tokenizer again: fine
    assert main(["probe", str(tmp_path / "s"), "--tokens-per-step", "8", "--out", str(tmp_path / "p"), *ARGS]) == 0


def _state_folder(tmp_path, name, state):
    folder = tmp_path / name
    folder.mkdir()
    (folder / "trainer_state.json").write_text(json.dumps(state))
    return str(folder)


def test_token_counts_come_from_the_checkpoints_own_step_or_the_flag(tmp_path, caplog):
    # a count logged at step 20 is not the count at step 25 (logging every 10 steps, saving at 25)
    history = [{"step": 10, "num_input_tokens_seen": 5120}, {"step": 20, "num_input_tokens_seen": 10240}]
    a = _state_folder(tmp_path, "checkpoint-10", {"global_step": 10, "log_history": history[:1]})
    b = _state_folder(tmp_path, "checkpoint-25", {"global_step": 25, "num_input_tokens_seen": 0,
                                                  "log_history": history})
    with pytest.raises(DataError, match="checkpoint-25 does not record"):
        find_checkpoints([a, b])
    # --tokens-per-step is the user's word for every checkpoint, said when a recorded count disagrees
    with caplog.at_level(logging.WARNING):
        found = find_checkpoints([a, b], tokens_per_step=600)
    assert [(c.step, c.tokens) for c in found] == [(10, 6000), (25, 15000)]
    assert "checkpoint-10" in caplog.text and "5,120" in caplog.text


def test_a_token_count_that_goes_backwards_is_refused(tmp_path):
    """A resumed run whose counter restarted: drawn against tokens, step 20 would sit before step 10."""
    a = _state_folder(tmp_path, "checkpoint-10", {"global_step": 10, "num_input_tokens_seen": 5120})
    b = _state_folder(tmp_path, "checkpoint-20", {"global_step": 20, "num_input_tokens_seen": 2560})
    with pytest.raises(DataError, match="fewer tokens"):
        find_checkpoints([a, b])


@pytest.mark.parametrize("state", [[1, 2], {"global_step": "ten"}, {"global_step": 10, "num_input_tokens_seen": -5},
                                   {"global_step": 10, "log_history": [3]}, {"global_step": True}])
def test_a_trainer_state_of_the_wrong_shape_is_one_line(tmp_path, state):
    a = _state_folder(tmp_path, "checkpoint-10", state)
    b = _state_folder(tmp_path, "checkpoint-20", {"global_step": 20, "num_input_tokens_seen": 10240})
    with pytest.raises(DataError, match="trainer_state.json"):
        find_checkpoints([a, b], tokens_per_step=512)


def test_a_trainer_state_that_is_a_pipe_is_refused_at_once(tmp_path):
    a = _state_folder(tmp_path, "checkpoint-10", {"global_step": 10})
    (tmp_path / "checkpoint-10" / "trainer_state.json").unlink()
    os.mkfifo(tmp_path / "checkpoint-10" / "trainer_state.json")  # read as a file, it would block for ever
    with pytest.raises(DataError, match="trainer_state.json is not a regular file"):
        find_checkpoints([a], tokens_per_step=512)


def test_activations_that_overflow_only_in_the_probe_dtype_are_refused_not_nulled(tmp_path, tokenizer, capsys):
    """A residual stream of ~1e6 is finite in fp32 and inf in fp16 (max 65504): every layer after it would
    be rows of nulls beside finite ones, an answer of the dtype and not of the model. A head whose keys are
    all zero (null PR in any dtype) is no overflow and stays a null."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(
        hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=3,
        vocab_size=V, max_position_embeddings=64))
    with torch.no_grad():
        model.model.layers[0].self_attn.k_proj.weight.zero_()  # a dead key projection: PR undefined, keys finite
        model.model.layers[1].mlp.down_proj.weight.mul_(3e6)
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    assert main(["probe", str(tmp_path / "m"), "--out", str(tmp_path / "fp32"), *ARGS]) == 0
    pr = {(r["tensor"], r["layer"]): r["pr"] for r in rows_of(tmp_path / "fp32") if r["kind"] == "probe"
          and r["tap"] == "proj"}
    assert pr[("k", 0)] is None and all(v is not None for (t, layer), v in pr.items() if (t, layer) != ("k", 0))
    assert main(["probe", str(tmp_path / "m"), "--out", str(tmp_path / "fp16"), "--dtype", "fp16", *ARGS]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "layer 2" in err[-1] and "fp16" in err[-1] and "--dtype fp32" in err[-1]
    assert not (tmp_path / "fp16").exists()


def test_the_dtype_the_weights_were_saved_in_is_recorded(tmp_path, tokenizer):
    """bf16 weights probed in fp32 (the default) are upcast exactly; the run row says both."""
    for i, (step, dtype) in enumerate(((1000, torch.bfloat16), (2000, torch.float32))):
        llama(i).to(dtype).save_pretrained(tmp_path / "s" / f"step{step}")
    tokenizer.save_pretrained(tmp_path / "s")
    assert main(["probe", str(tmp_path / "s"), "--tokens-per-step", "8", "--out", str(tmp_path / "p"), *ARGS]) == 0
    run = rows_of(tmp_path / "p")[0]
    assert run["dtype"] == "fp32" and [c["weights_dtype"] for c in run["checkpoints"]] == ["bf16", "fp32"]
    odd = tmp_path / "odd.safetensors"
    odd.write_bytes((2).to_bytes(8, "little") + b"[]")  # a header that is not a table: no dtype, no traceback
    assert stored_dtype([odd]) is None


def test_force_replaces_an_earlier_probe_never_a_run_it_did_not_write(tmp_path, tokenizer, capsys):
    """--force is for an earlier probe in --out; a training loop's own run folder (here a Monitor's) keeps its
    rows, and a second --force probe replaces the first whole."""
    from rankprobe import Monitor
    from conftest import files

    model = llama(0)
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    monitor = Monitor(model, out=tmp_path / "mine")
    monitor.probe(torch.randint(0, V, (2, 16)), step=10, tokens_seen=320)
    monitor.close()
    before = files(tmp_path / "mine")
    assert main(["probe", str(tmp_path / "m"), "--out", str(tmp_path / "mine"), "--force", *ARGS]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "mine" in err[-1] and "--force" in err[-1] and "Traceback" not in "\n".join(err)
    assert files(tmp_path / "mine") == before
    for _ in range(2):
        assert main(["probe", str(tmp_path / "m"), "--out", str(tmp_path / "p"), "--force", *ARGS]) == 0
    rows = rows_of(tmp_path / "p")
    assert [r["kind"] for r in rows].count("run") == 1 and rows[-1]["kind"] == "end"


def _model_folder(folder, state=None):
    """A folder `_expand` takes for a checkpoint (its config.json; no weights needed to find it)."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    return folder


def test_revisions_in_the_hugging_face_cache_are_named_by_their_refs(tmp_path):
    """snapshot_download(repo, revision="step1000") keeps snapshots/<commit> and refs/step1000 -> <commit>:
    the repo's cache folder, or a glob of its snapshots, is the series of its step revisions."""
    repo = tmp_path / "hub" / "models--EleutherAI--pythia-14m"
    for step, commit in ((1000, "9e1f"), (143000, "0b2a"), (2000, "77cd")):
        _model_folder(repo / "snapshots" / commit)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / f"step{step}").write_text(commit)
    (repo / "refs" / "main").write_text("0b2a")  # the default revision is the last step
    (repo / "blobs").mkdir()
    for spec in (repo, repo / "snapshots" / "*"):
        found = find_checkpoints([str(spec)], tokens_per_step=10)
        assert [(c.step, c.tokens, c.path.name) for c in found] == [
            (1000, 10_000, "9e1f"), (2000, 20_000, "77cd"), (143000, 1_430_000, "0b2a")]
        assert default_out(found) == Path.cwd() / "EleutherAI--pythia-14m-probe"  # not inside the cache


def test_olmo_revision_names_give_their_step(tmp_path):
    for name in ("stage1-step1000-tokens5B", "stage1-step2000-tokens9B", "step3000-tokens13B"):
        _model_folder(tmp_path / "olmo" / name)
    found = find_checkpoints([str(tmp_path / "olmo")], tokens_per_step=4)
    assert [(c.step, c.tokens) for c in found] == [(1000, 4000), (2000, 8000), (3000, 12000)]
    # a later stage restarts its steps: ordered by step it would sit among stage 1, so it is not guessed
    _model_folder(tmp_path / "olmo" / "stage2-ingredient1-step500-tokens3B")
    with pytest.raises(DataError, match="stage2-ingredient1-step500"):
        find_checkpoints([str(tmp_path / "olmo")], tokens_per_step=4)
    # the same revisions in the Hugging Face cache: refused too, not passed over
    repo = tmp_path / "hub" / "models--allenai--OLMo-x"
    for ref, commit in (("stage1-step100-tokens1B", "aa"), ("stage2-ingredient1-step100-tokens1B", "bb")):
        _model_folder(repo / "snapshots" / commit)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    with pytest.raises(DataError, match="stage2-ingredient1-step100-tokens1B, a later training stage"):
        find_checkpoints([str(repo)], tokens_per_step=4)


def test_a_glob_of_step_folders_passes_over_an_earlier_probe_beside_them(tmp_path, caplog):
    """`rankprobe probe pythia/step1000` writes pythia/step1000-probe; `pythia/step*` then matches it too."""
    for step in (1000, 2000):
        _model_folder(tmp_path / f"step{step}")
    probe = _model_folder(tmp_path / "step1000-probe")
    (probe / "metrics.jsonl").write_text("")
    with caplog.at_level(logging.WARNING):
        found = find_checkpoints([str(tmp_path / "step*")], tokens_per_step=1)
    assert [c.step for c in found] == [1000, 2000] and "step1000-probe" in caplog.text
    with pytest.raises(DataError, match="only RankProbe probe folders"):  # nothing else left: one line
        find_checkpoints([str(tmp_path / "step1000-*")], tokens_per_step=1)


def test_two_checkpoints_with_the_same_weights_are_said(tmp_path, tokenizer, caplog):
    """A copy saved under two steps would draw a flat stretch of trajectory that training never made."""
    for step in (1000, 2000):
        llama(0).save_pretrained(tmp_path / "s" / f"step{step}")
    tokenizer.save_pretrained(tmp_path / "s")
    with caplog.at_level(logging.WARNING):
        assert main(["probe", str(tmp_path / "s"), "--tokens-per-step", "8", "--out", str(tmp_path / "p"), *ARGS]) == 0
    assert "step2000" in caplog.text and "same weights" in caplog.text


def test_a_checkpoint_with_only_a_tokenizer_json_is_probed_with_it_not_its_parents(tmp_path, tokenizer):
    """tokenizer.json without tokenizer_config.json (saved by `tokenizers` itself) is the model's own: a
    tokenizer in the folder above (another model's) must not be taken instead."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from rankprobe.data.corpus import load_corpus

    llama(0).save_pretrained(tmp_path / "m")
    tokenizer.backend_tokenizer.save(str(tmp_path / "m" / "tokenizer.json"))
    other = Tokenizer(models.BPE(unk_token="<unk>"))
    other.pre_tokenizer = pre_tokenizers.ByteLevel()
    other.train_from_iterator([load_corpus("embedded").text[-20_000:]],
                              trainers.BpeTrainer(vocab_size=V, special_tokens=["<unk>"]))
    PreTrainedTokenizerFast(tokenizer_object=other).save_pretrained(tmp_path)
    assert main(["probe", str(tmp_path / "m"), "--out", str(tmp_path / "p"), *ARGS]) == 0
    assert rows_of(tmp_path / "p")[0]["data"]["tokenizer"]["name"] == str(tmp_path / "m")


def test_an_interrupted_series_probe_resumes_where_it_stopped(tmp_path, tokenizer, monkeypatch, capsys):
    """The third checkpoint of three is broken: the first two are kept, and the same command after the
    repair probes only the third, writing exactly the rows a probe from scratch writes."""
    import rankprobe.probes.hf as hf

    series = tmp_path / "s"
    for i, step in enumerate((10, 20, 30)):
        checkpoint(series / f"checkpoint-{step}", step, seed=i, tokens=step * 512)
    tokenizer.save_pretrained(series)
    weights = series / "checkpoint-30" / "model.safetensors"
    whole = weights.read_bytes()
    weights.write_bytes(whole[: len(whole) // 2])
    probed = []
    real = hf.probe_lenses
    monkeypatch.setattr(hf, "probe_lenses", lambda model, *a, **k: probed.append(model.name_or_path) or real(
        model, *a, **k))
    argv = ["probe", str(series), "--out", str(tmp_path / "p"), *ARGS]
    assert main(argv) == 2
    assert "checkpoint-30" in capsys.readouterr().err and not (tmp_path / "p" / "metrics.jsonl").exists()
    weights.write_bytes(whole)
    probed.clear()
    assert main(argv) == 0
    assert [p.rsplit("/", 1)[-1] for p in probed] == ["checkpoint-30"]
    assert sorted(os.listdir(tmp_path / "p")) == [".rankprobe.lock", "config.json", "env.json", "metrics.jsonl"]
    # a second probe into the folder while one runs is refused at once (they would share the kept rows)
    from rankprobe.runfolder import folder_lock

    with folder_lock(tmp_path / "p"):
        assert main([*argv, "--force"]) == 2
    assert "in use by another rankprobe process" in capsys.readouterr().err
    # the same series from scratch, into a folder of its own
    probed.clear()
    assert main([*argv[:-len(ARGS)], "--out", str(tmp_path / "fresh"), *ARGS]) == 0 and len(probed) == 3
    measured = lambda folder: [r for r in rows_of(folder) if r["kind"] in ("probe", "attn", "weights")]  # noqa: E731
    assert measured(tmp_path / "p") == measured(tmp_path / "fresh")
    run, fresh = rows_of(tmp_path / "p")[0], rows_of(tmp_path / "fresh")[0]
    assert run["checkpoints"] == fresh["checkpoints"] and run["config"] == fresh["config"]


def test_a_checkpoint_of_another_shape_is_refused_before_anything_is_probed(tmp_path, tokenizer, capsys,
                                                                           monkeypatch):
    """Layers added mid-series: said at once, naming the setting, not after probing the checkpoints before it."""
    import rankprobe.probes.hf as hf

    llama(0).save_pretrained(tmp_path / "s" / "step1000")
    torch.manual_seed(1)
    transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(
        hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=3,
        vocab_size=V, max_position_embeddings=64)).save_pretrained(tmp_path / "s" / "step2000")
    tokenizer.save_pretrained(tmp_path / "s")
    monkeypatch.setattr(hf, "probe_lenses", lambda *a, **k: pytest.fail("probed before the series was checked"))
    assert main(["probe", str(tmp_path / "s"), "--tokens-per-step", "8", "--out", str(tmp_path / "p"), *ARGS]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "step2000" in err[-1] and "num_hidden_layers 3" in err[-1] and "2" in err[-1]


def test_a_deepspeed_checkpoint_folder_is_one_checkpoint_and_an_adapter_is_named(tmp_path):
    """A Trainer checkpoint under DeepSpeed holds its optimizer shards in global_stepN/ beside the model;
    a PEFT checkpoint holds an adapter and no model config."""
    ckpt = _model_folder(tmp_path / "trainer" / "checkpoint-100")
    (ckpt / "global_step100").mkdir()
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": 100, "num_input_tokens_seen": 800}))
    for spec in (ckpt, tmp_path / "trainer", tmp_path / "trainer" / "checkpoint-*"):
        assert [(c.path, c.step, c.tokens) for c in find_checkpoints([str(spec)])] == [(ckpt, 100, 800)]
    lora = tmp_path / "trainer" / "checkpoint-200"
    lora.mkdir()
    (lora / "adapter_config.json").write_text("{}")
    with pytest.raises(DataError, match="checkpoint-200 holds a PEFT adapter"):
        find_checkpoints([str(tmp_path / "trainer")])

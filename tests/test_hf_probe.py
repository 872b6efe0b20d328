"""Probing Hugging Face checkpoints: tiny random models saved and loaded from disk (nothing is
downloaded), taps checked against the models' own modules, and RankProbe run folders loaded back."""

import json
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from rankprobe.config import Config, DataError, ModelConfig, UserError, to_dict  # noqa: E402
from rankprobe.model import Transformer  # noqa: E402
from rankprobe.probes.capture import attach_taps, probe_model  # noqa: E402
from rankprobe.probes.hf import (  # noqa: E402
    load_hf, load_run_checkpoint, probe_checkpoint_to_dir)
from rankprobe.probes.attention import attention_lenses  # noqa: E402
from rankprobe.report.metrics import find_runs  # noqa: E402
from rankprobe.report.series import Study  # noqa: E402

V, T = 300, 12
SMALL = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
             vocab_size=V, max_position_embeddings=64)


def configs():
    from transformers import GPT2Config, LlamaConfig, Qwen2Config, Qwen3Config

    return {
        "llama": LlamaConfig(**SMALL, rope_parameters={"rope_type": "default", "rope_theta": 500.0}),
        "qwen2": Qwen2Config(**SMALL),  # q/k/v biases
        "qwen3": Qwen3Config(**SMALL, head_dim=16),  # per-head q_norm / k_norm
        "gpt2": GPT2Config(n_embd=64, n_head=4, n_layer=2, vocab_size=V, n_positions=64, bos_token_id=0,
                           eos_token_id=0),
    }


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    out = {}
    for name, cfg in configs().items():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg)
        with torch.no_grad():  # non-trivial QK-Norm gains, and large queries for peaked attention
            for p_name, p in model.named_parameters():
                if "q_norm" in p_name or "k_norm" in p_name:
                    p.uniform_(0.5, 2.0)
                elif "q_proj.weight" in p_name:
                    p.mul_(40)
                elif "c_attn.weight" in p_name:
                    p[:, :64].mul_(40)  # Conv1D (in, out): the query columns
        path = tmp_path_factory.mktemp(name)
        model.save_pretrained(path)
        out[name] = path
    return out


def taps_of(model, tokens) -> dict:
    seen = {}
    handles = attach_taps(model, lambda key, x: seen.__setitem__(key, x.detach().clone()))
    with torch.no_grad():
        hidden = model(input_ids=tokens, output_hidden_states=True, use_cache=False).hidden_states
    for h in handles:
        h.remove()
    return seen, hidden


@pytest.mark.parametrize("name", ["llama", "qwen2", "qwen3"])
def test_rope_model_taps_match_the_models_own_modules(saved, name):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    model = load_hf(saved[name])
    tokens = torch.randint(0, V, (2, T))
    seen, hidden = taps_of(model, tokens)
    assert len(seen) == 7 * 2
    for i, layer in enumerate(model.model.layers):
        a = layer.self_attn
        x = layer.input_layernorm(hidden[i])  # hidden_states[i] is the input of decoder layer i
        with torch.no_grad():
            q, k, v = (m(x).view(2, T, -1, 16) for m in (a.q_proj, a.k_proj, a.v_proj))  # (B, T, H, D)
            torch.testing.assert_close(seen[("proj", "q", i)], q)
            torch.testing.assert_close(seen[("proj", "k", i)], k)
            torch.testing.assert_close(seen[("proj", "v", i)], v)
            assert seen[("proj", "k", i)].shape == (2, T, 2, 16) and seen[("proj", "q", i)].shape == (2, T, 4, 16)
            if name == "qwen3":
                q, k = a.q_norm(q), a.k_norm(k)
                assert not torch.allclose(seen[("norm", "k", i)], seen[("proj", "k", i)])
            torch.testing.assert_close(seen[("norm", "q", i)], q)
            torch.testing.assert_close(seen[("norm", "k", i)], k)
            pos = torch.arange(T)[None].expand(2, T)
            cos, sin = model.model.rotary_emb(x, pos)
            qr, kr = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)  # (B, H, T, D)
            torch.testing.assert_close(seen[("rope", "q", i)], qr.transpose(1, 2))
            torch.testing.assert_close(seen[("rope", "k", i)], kr.transpose(1, 2))
            assert not torch.allclose(seen[("rope", "k", i)][:, 1:], k[:, 1:])


def test_gpt2_taps_split_the_fused_projection_and_have_no_rope(saved):
    model = load_hf(saved["gpt2"])
    tokens = torch.randint(0, V, (2, T))
    seen, hidden = taps_of(model, tokens)
    for i, block in enumerate(model.transformer.h):
        with torch.no_grad():
            q, k, v = block.attn.c_attn(block.ln_1(hidden[i])).split(64, dim=-1)
        torch.testing.assert_close(seen[("proj", "k", i)], k.view(2, T, 4, 16))
        torch.testing.assert_close(seen[("proj", "v", i)], v.view(2, T, 4, 16))
        for tap in ("norm", "rope"):
            assert torch.equal(seen[(tap, "q", i)], seen[("proj", "q", i)])
            assert torch.equal(seen[(tap, "k", i)], seen[("proj", "k", i)])


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_attention_entropy_matches_the_models_eager_attention_weights(saved, name):
    from transformers import AutoModelForCausalLM

    tokens = torch.randint(0, V, (2, T))
    model = load_hf(saved[name])
    rows = attention_lenses(model, tokens, batch_size=1)
    eager = AutoModelForCausalLM.from_pretrained(saved[name], local_files_only=True, attn_implementation="eager")
    with torch.no_grad():
        probs = eager(input_ids=tokens, output_attentions=True, use_cache=False).attentions  # (B, H, T, T)
    assert len(rows) == len(probs) == 2
    for row, p in zip(rows, probs):
        p = p.double()[:, :, 1:]  # rows t >= 1
        ent = -(p * p.clamp_min(1e-300).log()).sum(-1)  # (B, H, T-1)
        norm = ent / torch.arange(2, T + 1).double().log()
        for key, want in (("entropy_heads", ent), ("entropy_norm_heads", norm)):
            torch.testing.assert_close(torch.tensor(row[key]), want.mean((0, 2)).float(), rtol=1e-4, atol=1e-6)
        assert max(row["entropy_norm_heads"]) < 0.95  # peaked attention: the check is not uniform vs uniform


def test_probe_checkpoint_to_dir_writes_a_run_the_report_reads(saved, tmp_path):
    tokens = torch.randint(0, V, (6, T))
    path = probe_checkpoint_to_dir(saved["qwen3"], tokens, tmp_path / "qwen3", batch_size=4)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    run = rows[0]
    assert run["kind"] == "run" and run["arm"] == "hf:qwen3" and run["optimizer"] == "pretrained"
    assert run["qk_norm"] is True and run["seed"] == 0 and run["probe_checkpoints"] == [0]
    assert run["config"]["model"]["n_kv_head"] == 2 and run["head_dim"] == 16 and run["n_layer"] == 2
    assert rows[-1]["kind"] == "end" and rows[-1]["status"] == "finished"
    probes = [r for r in rows if r["kind"] == "probe"]
    assert len(probes) == 14 and all(r["n"] == 6 * T and r["tokens"] == 0 for r in probes)
    assert {"pr", "pr_heads", "mean_norm", "erank_heads", "stable_rank", "rankme", "rankme_null"} <= set(probes[0])
    assert len([r for r in rows if r["kind"] == "attn"]) == 2
    assert len([r for r in rows if r["kind"] == "weights"]) == 8
    (found,) = find_runs(tmp_path)
    assert found.finished and found.arm == "hf:qwen3"
    assert Study([found], "norm").prs["hf:qwen3"].values.shape == (1, 1, 2)
    with pytest.raises(UserError, match="already holds"):
        probe_checkpoint_to_dir(saved["qwen3"], tokens, tmp_path / "qwen3")
    with pytest.raises(DataError, match="ids in"):
        probe_checkpoint_to_dir(saved["qwen3"], tokens + V, tmp_path / "bad")


def test_rankprobe_run_folder_loads_with_safetensors_and_probes_the_same(tmp_path):
    from safetensors.torch import save_model

    cfg = Config(model=ModelConfig(n_layer=2, d_model=64, n_head=4, n_kv_head=2, head_dim=16, seq_len=T,
                                   vocab_size=97, qk_norm=True, tie_embeddings=True))
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    run = tmp_path / "muon+qknorm-s0"
    run.mkdir()
    save_model(model, str(run / "model.safetensors"))
    data = to_dict(cfg)
    data["optim"]["name"] = "muon"
    (run / "config.json").write_text(json.dumps(data))
    loaded = load_run_checkpoint(run)
    for (n, p), (_, q) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(p, q), n
    tokens = torch.randint(0, 97, (4, T))
    path = probe_checkpoint_to_dir(run, tokens, tmp_path / "reprobe")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows[0]["arm"] == "rankprobe:muon+qknorm" and rows[0]["optimizer"] == "pretrained"
    want = {(r["tap"], r["tensor"], r["layer"]): r["pr"] for r in probe_model(model, tokens, 4)}
    got = {(r["tap"], r["tensor"], r["layer"]): r["pr"] for r in rows if r["kind"] == "probe"}
    assert got.keys() == want.keys()
    assert all(math.isclose(got[k], want[k], rel_tol=1e-9) for k in want)


def test_unsupported_or_missing_checkpoints_fail_with_one_line(tmp_path):
    from transformers import BertConfig

    with pytest.raises(DataError, match="no config.json"):
        load_hf(tmp_path)
    bert = BertConfig(hidden_size=32, num_attention_heads=2, num_hidden_layers=1, intermediate_size=32)
    bert.save_pretrained(tmp_path)
    with pytest.raises(DataError, match="not supported"):
        load_hf(tmp_path)


def test_probe_tokens_from_text_uses_the_checkpoints_own_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from rankprobe.probes.hf import probe_tokens_from_text

    text = "It is a truth universally acknowledged, that a single man in possession of a good fortune. " * 20
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>"]))
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(tmp_path)
    ids = tok.encode(text).ids
    got = probe_tokens_from_text(tmp_path, text, seq_len=8, max_tokens=50)
    assert got.shape == (6, 8) and got.flatten().tolist() == ids[:48]
    with pytest.raises(DataError, match="fewer than one sequence"):
        probe_tokens_from_text(tmp_path, "a", seq_len=8, max_tokens=50)


def test_cli_probe_of_an_hf_folder_and_a_run_folder_then_one_report(saved, tmp_path):
    """`rankprobe probe` end to end: a Llama folder with its own tokenizer, and a trained RankProbe run
    (probed on its own probe set), then `rankprobe report` over both."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from rankprobe.cli import main
    from rankprobe.config import load
    from rankprobe.data.corpus import load_corpus
    from rankprobe.train import train

    text = load_corpus("embedded").text[:200_000]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=V, special_tokens=["<unk>"]))
    llama = tmp_path / "llama"
    transformers.AutoModelForCausalLM.from_pretrained(saved["llama"]).save_pretrained(llama)
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(llama)
    study = tmp_path / "study"
    assert main(["probe", str(llama), "--out", str(study / "llama"), "--tokens", "512", "--seq-len", "32"]) == 0
    assert main(["probe", str(llama), "--out", str(study / "llama"), "--tokens", "512", "--seq-len", "32"]) == 2

    corpus = tmp_path / "austen.txt"
    corpus.write_text(text)
    cfg = load("demo", {"model.n_layer": "2", "model.d_model": "64", "model.n_head": "2", "model.head_dim": "16",
                        "model.seq_len": "32", "data.vocab_size": "300", "data.corpus": str(corpus),
                        "data.cache_dir": str(tmp_path / "cache"), "train.tokens": "1024", "train.batch_size": "4",
                        "train.eval_tokens": "128", "train.progress": "false", "probe.tokens": "256"})
    train(cfg, study / "adamw-s0")
    assert main(["probe", str(study / "adamw-s0"), "--out", str(tmp_path / "reprobe")]) == 0
    trained = [json.loads(line) for line in (study / "adamw-s0" / "metrics.jsonl").read_text().splitlines()]
    again = [json.loads(line) for line in (tmp_path / "reprobe" / "metrics.jsonl").read_text().splitlines()]
    final = {(r["tap"], r["tensor"], r["layer"]): r["pr"] for r in trained
             if r["kind"] == "probe" and r["tokens"] == trained[-1]["tokens"]}
    reprobed = {(r["tap"], r["tensor"], r["layer"]): r["pr"] for r in again if r["kind"] == "probe"}
    assert reprobed.keys() == final.keys()  # the same probe set and weights give the same PR
    assert all(math.isclose(reprobed[k], final[k], rel_tol=1e-6) for k in final)

    assert main(["report", str(study)]) == 0
    report = (study / "report.md").read_text()
    assert "hf:llama" in report and "`adamw`" in report
    assert main(["probe", str(tmp_path / "nowhere")]) == 2

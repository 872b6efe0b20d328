"""The Monitor inside real framework loops on the CPU, a few steps of tiny models: the transformers
Trainer, Lightning, and the plain nanoGPT-style loop of examples/. Each measurement is checked against
a fixed-batch probe of a copy of the model as it was, on the very batch the loop fed it."""

import copy
import json
import runpy
from pathlib import Path

import pytest
import torch

from rankprobe import Monitor

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "nanogpt_loop.py"


def _same(rows, want, kinds=("probe", "attn")):
    got = [r for r in rows if r["kind"] in kinds]
    want = [r for r in want if r["kind"] in kinds]
    assert [(r["kind"], r.get("tap"), r.get("tensor"), r["layer"]) for r in got] == \
           [(r["kind"], r.get("tap"), r.get("tensor"), r["layer"]) for r in want]
    for a, b in zip(want, got):
        for m in ("pr", "erank", "rankme", "entropy", "max_logit"):
            if m in a:
                assert b[m] == pytest.approx(a[m], rel=1e-5), (a["kind"], m, a["layer"])
        assert b.get("n") == a.get("n")


class _Batches:
    """The input_ids of every training-mode forward of `model`, and its weights just before it."""

    def __init__(self, model):
        self.model, self.inputs, self.states = model, [], []
        self.handle = model.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        if module.training:  # not the monitor's own fixed-batch passes (eval mode)
            self.inputs.append((kwargs["input_ids"] if "input_ids" in kwargs else args[0]).detach().clone())
            self.states.append({k: v.detach().clone() for k, v in module.state_dict().items()})

    def model_at(self, i):
        """A hook-free copy of the model with the weights of forward i."""
        self.handle.remove()
        hooks = [(m, m._forward_hooks.copy(), m._forward_pre_hooks.copy()) for m in self.model.modules()]
        for m, _, _ in hooks:  # the copy must not carry anyone's hooks
            m._forward_hooks.clear()
            m._forward_pre_hooks.clear()
        twin = copy.deepcopy(self.model)
        for m, fwd, pre in hooks:
            m._forward_hooks.update(fwd)
            m._forward_pre_hooks.update(pre)
        twin.load_state_dict(self.states[i])
        return twin


def _tiny_llama(transformers):
    """A 2-layer LlamaForCausalLM (4 heads, 2 key/value heads) over 64 tokens, seeded."""
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg)


@pytest.mark.parametrize("background", [False, True])
def test_transformers_trainer_callback(tmp_path, background):
    """`rows` and metrics.jsonl hold every measured step, also when each measurement's rows arrive with the
    next one (the Monitor's background mode, forced on the CPU) and the last ones in `on_train_end`."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from rankprobe.integrations.hf_callback import RankProbeCallback

    model = _tiny_llama(transformers)
    data = torch.randint(0, 64, (16, 16), generator=torch.Generator().manual_seed(0))
    dataset = [{"input_ids": x, "labels": x} for x in data]
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "hf"), max_steps=4, per_device_train_batch_size=4,
                                          learning_rate=1e-2, report_to=[], use_cpu=True, save_strategy="no",
                                          logging_steps=2, disable_tqdm=True, dataloader_num_workers=0)
    seen = _Batches(model)
    callback = RankProbeCallback(every=2, out=tmp_path / "rp", weights=False, background=background)
    transformers.Trainer(model=model, args=args, train_dataset=dataset, callbacks=[callback]).train()
    assert sorted({r["step"] for r in callback.rows}) == [0, 2]
    assert (tmp_path / "rp" / "metrics.jsonl").read_text().count("\n") == 1 + len(callback.rows)
    for step in (0, 2):  # one forward per step (no accumulation): forward `step` is the step's batch
        want = Monitor(seen.model_at(step), weights=False).probe(seen.inputs[step])
        _same([r for r in callback.rows if r["step"] == step], want)

    # the fixed-batch mode: after steps 0 and 4, equal to probing the final model directly
    probe_set = data[:4]
    fixed = RankProbeCallback(every=4, probe_tokens=probe_set, weights=False, background=background)
    transformers.Trainer(model=model, args=args, train_dataset=dataset, callbacks=[fixed]).train()
    assert sorted({r["step"] for r in fixed.rows}) == [0, 4]
    _same([r for r in fixed.rows if r["step"] == 4], Monitor(model, weights=False).probe(probe_set))


def _lightning_module(L, optimizer=torch.optim.SGD):
    """A LightningModule around a 2-layer RankProbe model over 64 tokens (its `model` attribute)."""
    from rankprobe.config import load
    from rankprobe.model import Transformer

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = Transformer(load("demo", {"model.n_layer": "2", "model.d_model": "32", "model.n_head": "2",
                                                   "model.head_dim": "16", "model.seq_len": "16",
                                                   "model.vocab_size": "64"}).model)

        def training_step(self, batch, batch_idx):
            return self.model(batch[0], batch[0])

        def configure_optimizers(self):
            return optimizer(self.parameters(), lr=1e-2)

    return Module()


@pytest.mark.parametrize("background", [False, True])
def test_lightning_callback(tmp_path, background):
    """Each measured step's scalars reach the logger at that step, also when its rows arrive a measurement
    later (the Monitor's background mode, forced on the CPU) and the last ones at the end of training."""
    L = pytest.importorskip("lightning")
    import csv

    from rankprobe.monitor import flat_scalars
    from lightning.pytorch.loggers import CSVLogger

    from rankprobe.integrations.lightning_callback import RankProbeCallback

    torch.manual_seed(0)
    module = _lightning_module(L, torch.optim.AdamW)
    data = torch.randint(0, 64, (24, 16), generator=torch.Generator().manual_seed(0))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data), batch_size=4)
    seen = _Batches(module.model)
    callback = RankProbeCallback(every=2, module="model", weights=False, background=background)
    trainer = L.Trainer(max_steps=5, accelerator="cpu", callbacks=[callback], enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, logger=CSVLogger(tmp_path),
                        log_every_n_steps=1)
    trainer.fit(module, loader)
    assert sorted({r["step"] for r in callback.rows}) == [0, 2, 4]
    for step in (0, 2, 4):
        want = Monitor(seen.model_at(step), weights=False).probe(seen.inputs[step])
        _same([r for r in callback.rows if r["step"] == step], want)
    assert callback.monitor.background == background
    with open(Path(trainer.logger.log_dir) / "metrics.csv") as f:
        logged = [r for r in csv.DictReader(f) if r.get("rankprobe/k_pr/L01")]
    assert {"rankprobe/k_pr/L01", "rankprobe/attn_entropy/L00", "rankprobe/proj/v_erank/L01"} <= set(logged[0])
    assert [int(r["step"]) for r in logged] == [0, 2, 4]
    for r in logged:
        want = flat_scalars([row for row in callback.rows if row["step"] == int(r["step"])])
        for name in ("rankprobe/k_pr/L01", "rankprobe/attn_entropy/L00"):
            assert float(r[name]) == pytest.approx(want[name], rel=1e-9), (r["step"], name)


def test_transformers_rows_carry_the_tokens_their_weights_were_trained_on(tmp_path):
    """With the Trainer counting tokens, a row of step s (weights after s steps of 64 tokens) says
    s × 64 tokens in both modes: the training-forward mode measures in step s + 1's forward, whose
    batch the count already holds by on_step_end, and step 0 is 0 tokens, not unknown."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from rankprobe.integrations.hf_callback import RankProbeCallback

    model = _tiny_llama(transformers)
    data = torch.randint(0, 64, (12, 16), generator=torch.Generator().manual_seed(0))
    for probe_tokens in (None, data[:4]):
        callback = RankProbeCallback(every=1, weights=False, probe_tokens=probe_tokens)
        args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4,
                                              report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True,
                                              include_num_input_tokens_seen=True)
        transformers.Trainer(model=model, args=args, train_dataset=[{"input_ids": x, "labels": x} for x in data],
                             callbacks=[callback]).train()
        steps = sorted({(r["step"], r["tokens"]) for r in callback.rows})
        assert steps == [(s, 64 * s) for s in range(3 if probe_tokens is None else 4)], steps


def test_transformers_trainer_with_a_padding_collator_measures_the_tokens_alone(tmp_path):
    """Sequences of different lengths, padded per batch by the collator: each measured step's rows count
    exactly the tokens of its batch (the Trainer's attention_mask), and equal a fixed-batch probe of
    the model as it was, fed those sequences one by one without padding."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from rankprobe.integrations.hf_callback import RankProbeCallback

    model = _tiny_llama(transformers)
    g = torch.Generator().manual_seed(0)
    data = [torch.randint(1, 64, (int(n),), generator=g) for n in torch.randint(4, 17, (8,), generator=g)]

    def pad(batch):  # right padding with token 0, masked; labels -100 there
        T = max(len(b["input_ids"]) for b in batch)
        ids, mask = torch.zeros(len(batch), T, dtype=torch.long), torch.zeros(len(batch), T, dtype=torch.long)
        for i, b in enumerate(batch):
            ids[i, : len(b["input_ids"])], mask[i, : len(b["input_ids"])] = b["input_ids"], 1
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}

    seen = _Batches(model)
    masks = []
    model.register_forward_pre_hook(lambda m, a, kw: masks.append(kw["attention_mask"].clone()) if m.training else None,
                                    with_kwargs=True)
    callback = RankProbeCallback(every=1, weights=False)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4,
                                          report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True,
                                          remove_unused_columns=False)
    transformers.Trainer(model=model, args=args, train_dataset=[{"input_ids": x} for x in data], data_collator=pad,
                         callbacks=[callback]).train()
    for step in (0, 1):
        rows = [r for r in callback.rows if r["step"] == step]
        keep = masks[step].bool()
        assert not keep.all() and {r["n"] for r in rows if r["kind"] == "probe"} == {int(keep.sum())}
        twin = seen.model_at(step)
        alone = Monitor(twin, every=1, weights=False, background=False)
        with alone.watch(0):
            for ids, k in zip(seen.inputs[step], keep):
                twin(input_ids=ids[k][None])
        _same(rows, alone.last)


def test_one_callback_measures_a_second_training_too(tmp_path):
    """`on_train_end` closes the callback's Monitor (final since the background mode); a second
    `Trainer.train()` / `fit()` with the same callback measures again with a fresh one."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    L = pytest.importorskip("lightning")
    from rankprobe.integrations.hf_callback import RankProbeCallback as HFCallback
    from rankprobe.integrations.lightning_callback import RankProbeCallback as LightningCallback

    model = _tiny_llama(transformers)
    data = torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(0))
    hf = HFCallback(every=2, weights=False)
    for run in ("a", "b"):
        args = transformers.TrainingArguments(output_dir=str(tmp_path / run), max_steps=2, per_device_train_batch_size=4,
                                              report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True)
        transformers.Trainer(model=model, args=args, train_dataset=[{"input_ids": x, "labels": x} for x in data],
                             callbacks=[hf]).train()
    assert [r["step"] for r in hf.rows if r["kind"] == "attn" and r["layer"] == 0] == [0, 0]

    module, lit = _lightning_module(L), LightningCallback(every=2, module="model", weights=False)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data), batch_size=4)
    for _ in range(2):
        L.Trainer(max_steps=1, accelerator="cpu", callbacks=[lit], enable_checkpointing=False, logger=False,
                  enable_progress_bar=False, enable_model_summary=False).fit(module, loader)
    assert [r["step"] for r in lit.rows if r["kind"] == "attn" and r["layer"] == 0] == [0, 0]


@pytest.mark.parametrize("background", [False, True])
def test_nanogpt_example_runs_its_loop_with_the_five_lines(tmp_path, capsys, background):
    out = tmp_path / "nanogpt"
    ns = runpy.run_path(str(EXAMPLE), run_name="example")
    ns["main"](["--steps", "5", "--every", "2", "--out", str(out)] + ["--background"] * background)
    rows = [r for r in ns["LAST"]["rows"]]
    assert [r["step"] for r in rows if r["kind"] == "probe"] == sorted(r["step"] for r in rows if r["kind"] == "probe")
    assert sorted({r["step"] for r in rows if r["kind"] == "probe"}) == [0, 2, 4]
    assert [line.split()[1] for line in capsys.readouterr().out.splitlines()] == ["0", "2", "4"]
    model, batch = ns["LAST"]["model_at_4"], ns["LAST"]["batch_at_4"]
    _same([r for r in rows if r["step"] == 4], Monitor(model, **ns["TAPS"], weights=False).probe(batch))
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert '"kind": "train"' in lines[-1] or any('"kind": "train"' in x for x in lines)


def test_monitor_rows_equal_rankprobe_probe_of_the_saved_checkpoint(tmp_path):
    transformers = pytest.importorskip("transformers")
    from rankprobe.probes.hf import probe_checkpoint_to_dir
    from rankprobe.runfolder import read_rows

    cfg = transformers.Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.Qwen3ForCausalLM(cfg).eval()
    model.save_pretrained(tmp_path / "ckpt")
    tokens = torch.randint(0, 64, (6, 16), generator=torch.Generator().manual_seed(2))
    path = probe_checkpoint_to_dir(tmp_path / "ckpt", tokens, tmp_path / "probe", batch_size=4)
    probed = [r for r in read_rows(path) if r["kind"] in ("probe", "attn", "weights")]
    ours = Monitor(transformers.Qwen3ForCausalLM.from_pretrained(tmp_path / "ckpt"), batch_size=4).probe(tokens, 0, 0)
    ours = json.loads(json.dumps(ours))
    assert len(ours) == len(probed)
    for a, b in zip(ours, probed):
        assert a == b, {k: (a.get(k), b.get(k)) for k in set(a) | set(b) if a.get(k) != b.get(k)}


@pytest.mark.parametrize("background", [False, True])
def test_lightning_rows_carry_tokens_per_step(tmp_path, background):
    """With `tokens_per_step` a row of step s says s × tokens_per_step tokens (the tokens its weights were
    trained on), also when its rows arrive a measurement later; the metrics.jsonl holds the same. A
    count that is not a positive int is refused in one line."""
    L = pytest.importorskip("lightning")
    from rankprobe.errors import UserError
    from rankprobe.integrations.lightning_callback import RankProbeCallback

    data = torch.randint(0, 64, (20, 16), generator=torch.Generator().manual_seed(0))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data), batch_size=4)
    callback = RankProbeCallback(every=2, module="model", weights=False, tokens_per_step=64, out=tmp_path / "rp",
                                 background=background)
    L.Trainer(max_steps=5, accelerator="cpu", callbacks=[callback], enable_checkpointing=False, logger=False,
              enable_progress_bar=False, enable_model_summary=False).fit(_lightning_module(L), loader)
    assert sorted({(r["step"], r["tokens"]) for r in callback.rows}) == [(0, 0), (2, 128), (4, 256)]
    written = [json.loads(x) for x in (tmp_path / "rp" / "metrics.jsonl").read_text().splitlines()[1:]]
    assert sorted({(r["step"], r["tokens"]) for r in written}) == [(0, 0), (2, 128), (4, 256)]
    for bad in (0, -64, 64.0, True, "64"):
        with pytest.raises(UserError, match="tokens_per_step must be a positive int"):
            RankProbeCallback(tokens_per_step=bad)

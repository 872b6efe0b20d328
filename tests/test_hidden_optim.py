"""Tests for the hidden-matrix optimizers of arms other than adamw and muon (rankprobe.optim.hidden,
rankprobe.optim.normsgd): each against its reference class or its paper's update rule in float64,
parameter groups, config and arm labels, one-line errors, scans, and a few training steps of each."""

from __future__ import annotations

import json
import math
import re

import pytest
import pytorch_optimizer  # pinned in requirements-dev.txt: a missing install fails here rather than skipping
import torch

from rankprobe import config as C
from rankprobe.config import OPTIMIZERS, ModelConfig, OptimConfig, arm_label, parse_arm
from rankprobe.model import Transformer
from rankprobe.optim import Muon, NormSGD, adjusted_lr, build_optimizers, orthogonal_norm_scale, param_groups
from rankprobe.optim.hidden import NAMED, check, resolve



@pytest.fixture(autouse=True)
def _one_cpu_thread():
    n = torch.get_num_threads()  # tiny matrices: intra-op threads only spin on a shared 2-core machine
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_model(seed: int = 0) -> Transformer:
    """Real parameter names; the MLP matrices are tall (64, 32) and wide (32, 64)."""
    torch.manual_seed(seed)
    return Transformer(ModelConfig(n_layer=2, d_model=32, n_head=2, head_dim=16, mlp_hidden=64, seq_len=8,
                                   vocab_size=40, qk_norm=True))


def hidden_steps(cfg: OptimConfig, steps: int = 3, seed: int = 0):
    """Step the arm's hidden matrices `steps` times on fresh random gradients.

    Returns (initial weights, per-step gradients, final weights) of the hidden group, in model order.
    """
    model = tiny_model(seed)
    opts, _ = build_optimizers(model, cfg, "cpu")
    hidden = [p for _, p in param_groups(model, cfg)[cfg.name]]
    start = [p.detach().clone() for p in hidden]
    grads = []
    gen = torch.Generator().manual_seed(seed + 1)
    for _ in range(steps):
        g = [torch.randn(p.shape, generator=gen) for p in hidden]
        for p, gi in zip(hidden, g):
            p.grad = gi.clone()
        for o in opts:
            o.step()
        grads.append(g)
    return start, grads, [p.detach().clone() for p in hidden]


def reference_steps(cls, start, grads, **kwargs):
    """The same steps with `cls` used directly on copies of the weights."""
    params = [torch.nn.Parameter(w.clone()) for w in start]
    opt = cls(params, **kwargs)
    for g in grads:
        for p, gi in zip(params, g):
            p.grad = gi.clone()
        opt.step()
    return [p.detach() for p in params]


# ---------------------------------------------------------------------------------------------
# each optimizer against its reference


@pytest.mark.parametrize("name,cls,kwargs", [
    ("sgd", torch.optim.SGD, dict(lr=0.05, momentum=0.95, nesterov=True, weight_decay=0.0)),
    ("adafactor", torch.optim.Adafactor, dict(lr=0.01, weight_decay=0.0)),
    ("soap", pytorch_optimizer.SOAP, dict(lr=3e-3, weight_decay=0.0)),  # SOAP's first step only sets up
])
def test_library_arms_follow_their_class_exactly(name, cls, kwargs):
    start, grads, ours = hidden_steps(OptimConfig(name=name), steps=3)
    for a, b in zip(ours, reference_steps(cls, start, grads, **kwargs)):
        assert torch.equal(a, b)
    assert not torch.equal(ours[0], start[0])


def test_custom_class_with_kwargs_follows_it_exactly():
    cfg = OptimConfig(name="custom", cls="torch.optim.RAdam", hidden_lr=2e-3, weight_decay=0.1,
                      kwargs={"betas": [0.8, 0.9], "decoupled_weight_decay": True})
    start, grads, ours = hidden_steps(cfg)
    ref = reference_steps(torch.optim.RAdam, start, grads, lr=2e-3, betas=(0.8, 0.9), weight_decay=0.1,
                          decoupled_weight_decay=True)
    assert all(torch.equal(a, b) for a, b in zip(ours, ref))
    assert resolve(OptimConfig(name="custom", cls="torch.optim.RAdam"))[1]["lr"] == 1e-3  # the class's default


def test_lion_follows_the_paper_update_in_float64():
    # Chen et al. 2023 (arXiv 2302.06675), Algorithm 2: c = b1 m + (1 - b1) g; x -= lr (sign(c) + wd x);
    # m = b2 m + (1 - b2) g.
    lr, wd, (b1, b2) = 1e-3, 0.1, (0.8, 0.95)
    cfg = OptimConfig(name="lion", hidden_lr=lr, weight_decay=wd, kwargs={"betas": [b1, b2]})
    start, grads, ours = hidden_steps(cfg, steps=4)
    for i, x in enumerate(start):
        x, m = x.double(), torch.zeros_like(x, dtype=torch.float64)
        for g in grads:
            g = g[i].double()
            c = b1 * m + (1 - b1) * g
            x = x - lr * (torch.sign(c) + wd * x)
            m = b2 * m + (1 - b2) * g
        torch.testing.assert_close(ours[i].double(), x, rtol=0, atol=1e-6)


def test_signum_follows_the_paper_update_in_float64():
    # Bernstein et al. 2018 (arXiv 1802.04434), Algorithm 1 (Signum): m = b m + (1 - b) g; x -= lr sign(m);
    # weight decay decoupled: x *= 1 - lr wd first.
    lr, wd, beta = 2e-3, 0.05, 0.9
    start, grads, ours = hidden_steps(OptimConfig(name="signum", hidden_lr=lr, weight_decay=wd, momentum=beta), 4)
    for i, x in enumerate(start):
        x, m = x.double(), torch.zeros_like(x, dtype=torch.float64)
        for g in grads:
            m = beta * m + (1 - beta) * g[i].double()
            x = x * (1 - lr * wd) - lr * torch.sign(m)
        torch.testing.assert_close(ours[i].double(), x, rtol=0, atol=1e-6)


@pytest.mark.parametrize("nesterov", [True, False])
def test_normsgd_follows_its_rule_in_float64(nesterov):
    lr, wd, mu = 0.03, 0.1, 0.9
    cfg = OptimConfig(name="normsgd", hidden_lr=lr, weight_decay=wd, momentum=mu, nesterov=nesterov)
    start, grads, ours = hidden_steps(cfg, steps=3)
    assert {tuple(w.shape) for w in start} == {(32, 32), (64, 32), (32, 64)}
    for i, x in enumerate(start):
        x, buf = x.double(), torch.zeros_like(x, dtype=torch.float64)
        m, n = x.shape
        for g in grads:
            g = g[i].double()
            buf = mu * buf + (1 - mu) * g
            u = (1 - mu) * g + mu * buf if nesterov else buf
            step = lr * math.sqrt(max(1, m / n)) * math.sqrt(min(m, n)) * u / torch.linalg.norm(u)
            x = x * (1 - lr * wd) - step
        torch.testing.assert_close(ours[i].double(), x, rtol=1e-5, atol=1e-6)


def test_normsgd_direction_has_the_norm_of_the_orthogonal_factor():
    torch.manual_seed(0)
    for shape in [(12, 12), (20, 7), (7, 20), (3, 5, 9)]:
        M = torch.randn(shape, dtype=torch.float64) * 3.7
        U, _, Vh = torch.linalg.svd(M, full_matrices=False)
        D = orthogonal_norm_scale(M)
        norms = torch.linalg.norm(D, dim=(-2, -1))
        torch.testing.assert_close(norms, torch.linalg.norm(U @ Vh, dim=(-2, -1)))  # sqrt(min(m, n)) each
        torch.testing.assert_close(D / norms[..., None, None], M / torch.linalg.norm(M, dim=(-2, -1), keepdim=True))
        rms = D.pow(2).mean(dim=(-2, -1)).sqrt()
        torch.testing.assert_close(rms, torch.full_like(rms, 1 / math.sqrt(max(shape[-2:]))))
    assert torch.equal(orthogonal_norm_scale(torch.zeros(4, 6)), torch.zeros(4, 6))


def test_normsgd_step_is_the_pure_function_times_muons_adjusted_lr():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s)) for s in [(24, 8), (8, 24), (16, 16), (24, 8)]]
    start = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.randn(p.shape)
    NormSGD(params, lr=0.1, momentum=0.9, nesterov=True).step()
    for p, w in zip(params, start):
        update = p.grad.lerp(0.1 * p.grad, 0.9)  # Nesterov after one step from a zero buffer
        torch.testing.assert_close(p.detach(), w - adjusted_lr(0.1, p.shape) * orthogonal_norm_scale(update))


def test_muon_and_normsgd_steps_are_near_equal_in_size():
    # Equal by construction against an exact orthogonalisation; Muon's quintic Newton-Schulz stops
    # short of it (singular values ~0.68-1.2), so its step measures 0.80-0.93 of NormSGD's here.
    torch.manual_seed(0)
    for shape in [(64, 64), (96, 32), (32, 96)]:
        g = torch.randn(shape)
        a, b = torch.nn.Parameter(torch.zeros(shape)), torch.nn.Parameter(torch.zeros(shape))
        a.grad, b.grad = g.clone(), g.clone()
        Muon([a], lr=0.02).step()
        NormSGD([b], lr=0.02).step()
        assert 0.75 < (a.norm() / b.norm()).item() < 1.0


# ---------------------------------------------------------------------------------------------
# groups, config, labels, errors


def test_every_name_has_an_optimizer_and_documented_default_lr():
    assert set(NAMED) | {"adamw", "muon", "custom"} == set(OPTIMIZERS)
    doc = " ".join(C.field_docs()["optim.hidden_lr"].split())
    for name, arm in NAMED.items():
        assert float(re.search(rf"\b{name} ([0-9.e-]+)[,)]", doc).group(1)) == arm.lr
        assert resolve(OptimConfig(name=name))[1]["lr"] == arm.lr


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_arm_groups_every_parameter_once(name):
    model = tiny_model()
    cfg = OptimConfig(name=name, cls="torch.optim.RAdam" if name == "custom" else "")
    groups = param_groups(model, cfg)
    names = [n for ps in groups.values() for n, _ in ps]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    hidden = "adamw_decay" if name == "adamw" else name
    where = {n: g for g, ps in groups.items() for n, _ in ps}
    matrices = [n for n, p in model.named_parameters() if n.startswith("blocks.") and p.ndim == 2]
    assert len(matrices) == 2 * 7 and all(where[n] == hidden for n in matrices)
    assert where["tok_emb.weight"] == "adamw_no_decay" and where["blocks.0.attn.k_norm.weight"] == "adamw_no_decay"
    opts, sizes = build_optimizers(model, cfg, "cpu")
    assert sum(s["n_params"] for s in sizes.values()) == sum(p.numel() for p in model.parameters())
    assert sizes["adamw_no_decay"]["optimizer"] == "torch.optim.adamw.AdamW"
    if name not in ("adamw", "muon"):
        assert sizes[name]["n_tensors"] == 2 * 7 and sizes[name]["kwargs"]["lr"] > 0
        assert json.loads(json.dumps(sizes)) == sizes  # recorded in the run row as it is


@pytest.mark.parametrize("label", [arm_label(o, q, c) for o in OPTIMIZERS
                                   for q in (False, True) for c in (False, True)])
def test_arm_labels_round_trip(label):
    assert arm_label(*parse_arm(label)) == label


@pytest.mark.parametrize("label", ["rmsprop", "lion+qknrm", "lion+qknorm+qknorm", "+qknorm"])
def test_bad_arm_labels_are_one_line_errors(label):
    with pytest.raises(C.ConfigError, match="sweep.arms: cannot read arm") as e:
        parse_arm(label)
    assert "\n" not in str(e.value)


def test_kwargs_from_a_toml_table_or_an_override(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[optim]\nname = "lion"\n[optim.kwargs]\nbetas = [0.9, 0.98]\n')
    a = C.load(str(path))
    b = C.load("demo", {"optim.name": "lion", "optim.kwargs": "{betas = [0.9, 0.98]}"})
    assert a.optim.kwargs == b.optim.kwargs == {"betas": [0.9, 0.98]}
    assert C.from_dict(json.loads(json.dumps(C.to_dict(b)))) == b
    assert resolve(b.optim)[1]["betas"] == [0.9, 0.98]


@pytest.mark.parametrize("overrides,message", [
    ({"optim.name": "rmsprop"}, "optim.name must be one of adamw, muon, sgd"),
    ({"optim.name": "custom"}, "optimizer 'custom' needs optim.cls"),
    ({"optim.name": "lion", "optim.cls": "torch.optim.SGD"}, "optim.cls (torch.optim.SGD) is used only by"),
    ({"optim.kwargs": "{betas = [0.9, 0.9]}"}, "optim.kwargs is for the hidden matrices' optimizer"),
    ({"optim.name": "lion", "optim.kwargs": "{lr = 1}"}, "optim.kwargs may not set lr"),
    ({"optim.name": "lion", "optim.kwargs": "betas"}, "optim.kwargs must be a TOML table"),
    ({"optim.name": "lion", "optim.hidden_lr": "-1"}, "hidden_lr"),
    ({"sweep.arms": "sgd,custom"}, "optimizer 'custom' needs optim.cls"),
])
def test_bad_config_is_a_one_line_error(overrides, message):
    with pytest.raises(C.ConfigError) as e:
        C.load("demo", overrides)
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("cfg,message", [
    (dict(cls="torch.optim.NoSuch"), "torch.optim.NoSuch is not a torch.optim.Optimizer subclass"),
    (dict(cls="torch.nn.Linear"), "torch.nn.Linear is not a torch.optim.Optimizer subclass"),
    (dict(cls="no_such_package.Opt"), "cannot import no_such_package"),
    (dict(cls="RAdam"), "must be a dotted class path"),
    (dict(cls="torch.optim.RAdam", kwargs={"betaz": [0.9, 0.9]}), "torch.optim.RAdam takes no argument 'betaz'"),
    (dict(cls="torch.optim.RAdam", kwargs={"betas": [2.0, 0.9]}), "rejected its arguments"),
    (dict(cls="torch.optim.SGD", kwargs={"momentum": "fast"}), "rejected its arguments"),
])
def test_bad_custom_classes_and_kwargs_are_one_line_errors(cfg, message):
    with pytest.raises(C.ConfigError) as e:
        check(OptimConfig(name="custom", **cfg))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_lion_kwarg_typo_is_caught_despite_its_catch_all():
    with pytest.raises(C.ConfigError, match="Lion takes no argument 'beta'"):
        check(OptimConfig(name="lion", kwargs={"beta": [0.9, 0.99]}))


def test_cli_refuses_a_bad_class_before_anything_runs(tmp_path, capsys):
    from rankprobe.cli import main

    rc = main(["sweep", "demo", "--sweep.arms", "custom+qknorm", "--optim.cls", "torch.optim.Nope",
               "--out", str(tmp_path / "s")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and "torch.optim.Nope is not a torch.optim.Optimizer subclass" in err
    assert not any((tmp_path / "s").glob("*/metrics.jsonl"))


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_scanning_each_arms_lr_key_sets_its_hidden_lr(name):
    from rankprobe.sweep import scan_configs

    key = {"adamw": "optim.lr", "muon": "optim.muon_lr"}.get(name, "optim.hidden_lr")
    base = C.load("demo", {"optim.name": name, "optim.cls": "torch.optim.RAdam" if name == "custom" else ""})
    for c in scan_configs(base, key, ["1e-4", "2e-3"]):
        opts, sizes = build_optimizers(tiny_model(), c.optim, "cpu")
        group = "adamw_decay" if name == "adamw" else name
        peak = {g["name"]: g["peak_lr"] for o in opts for g in o.param_groups}[group]
        assert peak == float(c.name.split("=")[1])


# ---------------------------------------------------------------------------------------------
# a few training steps of each


@pytest.mark.slow
@pytest.mark.parametrize("name", [*NAMED, "custom"])
def test_each_arm_trains_a_few_steps_with_finite_loss(name, corpus_file, cache, tmp_path):
    from rankprobe.train import train

    cfg = C.load("demo", {
        "model.n_layer": "1", "model.d_model": "32", "model.n_head": "2", "model.head_dim": "16",
        "model.seq_len": "16", "data.vocab_size": "300", "train.tokens": "256", "train.batch_size": "4",
        "train.eval_tokens": "64", "train.log_every": "1", "train.progress": "false", "probe.tokens": "64",
        "probe.checkpoints": "0", "probe.attention": "false", "probe.weights": "false",
        "train.checkpoint_minutes": "0", "data.corpus": str(corpus_file), "data.cache_dir": str(cache),
        "optim.name": name, "optim.cls": "torch.optim.RAdam" if name == "custom" else "",
    })
    metrics = train(cfg, tmp_path / name)
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    run, end = rows[0], rows[-1]
    losses = [r["loss"] for r in rows if r["kind"] == "train"]
    assert end["kind"] == "end" and end["status"] == "finished" and len(losses) == 4
    assert all(math.isfinite(v) for v in losses)
    hidden = run["param_groups"][name]
    assert hidden["optimizer"].rsplit(".", 1)[-1] == {"custom": "RAdam"}.get(name, NAMED.get(name) and
                                                                              NAMED[name].cls.rsplit(".", 1)[-1])
    assert hidden["kwargs"]["lr"] == resolve(cfg.optim)[1]["lr"]


@pytest.mark.parametrize("name", list(NAMED))
def test_each_arm_resumes_bit_exactly_from_a_weights_only_state(name, tmp_path):
    """What checkpoint.py does: state_dicts through torch.save and a weights_only load."""
    cfg = OptimConfig(name=name)

    def steps(model, opts, n, seed):
        gen = torch.Generator().manual_seed(seed)
        for _ in range(n):
            for p in model.parameters():
                p.grad = torch.randn(p.shape, generator=gen)
            for o in opts:
                o.step()

    a = tiny_model()
    opts_a, _ = build_optimizers(a, cfg, "cpu")
    steps(a, opts_a, 11, 0)  # past SOAP's first basis refresh (every 10 steps)
    torch.save({"model": a.state_dict(), "optimizers": [o.state_dict() for o in opts_a]}, tmp_path / "s.pt")
    state = torch.load(tmp_path / "s.pt", weights_only=True)
    b = tiny_model(seed=1)
    opts_b, _ = build_optimizers(b, cfg, "cpu")
    b.load_state_dict(state["model"])
    for o, s in zip(opts_b, state["optimizers"]):
        o.load_state_dict(s)
    steps(a, opts_a, 3, 1)
    steps(b, opts_b, 3, 1)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_a_sweep_of_new_arms_sets_each_runs_optimizer():
    from rankprobe.sweep import arms

    grid = arms(C.load("demo", {"sweep.arms": "sgd,lion+qknorm,custom", "optim.cls": "torch.optim.RAdam",
                                "sweep.seeds": "0,1"}))
    assert [(a.name, a.optim.name, a.model.qk_norm) for a in grid] == [
        ("sgd-s0", "sgd", False), ("sgd-s1", "sgd", False), ("lion+qknorm-s0", "lion", True),
        ("lion+qknorm-s1", "lion", True), ("custom-s0", "custom", False), ("custom-s1", "custom", False)]
    assert all(a.optim.cls == "torch.optim.RAdam" for a in grid)


def test_runs_made_before_the_optimizer_keys_still_match_at_their_defaults():
    from rankprobe.checkpoint import config_differences

    now = C.to_dict(C.load("demo"))
    before = json.loads(json.dumps(now))
    for key in ("hidden_lr", "cls", "kwargs"):
        del before["optim"][key]
    assert config_differences(before, now) == []
    lion = C.to_dict(C.load("demo", {"optim.name": "lion", "optim.hidden_lr": "1e-4"}))
    assert ("optim.hidden_lr", None, 1e-4) in config_differences(before, lion)

"""Config tree: presets load, overrides are typed, mistakes are named in CLI terms."""

import pytest

from rankprobe import config as C
from rankprobe.cli import parse_overrides


def test_presets_load_and_validate():
    assert {"demo", "seed-22l"} <= set(C.preset_names())
    demo = C.load("demo")
    assert demo.train.device == "cpu" and demo.sweep.optimizers == ["adamw", "muon"]
    big = C.load("seed-22l")
    assert (big.model.n_layer, big.model.head_dim, big.train.tokens) == (22, 64, 25_000_000)
    assert {1_000_000, 2_000_000, 5_000_000, 10_000_000, 25_000_000} <= set(big.probe.checkpoints)


def test_overrides_are_coerced_to_field_types():
    cfg = C.load("demo", parse_overrides(
        ["--model.n_layer", "6", "--optim.lr=1e-3", "--model.qk_norm", "true", "--sweep.seeds", "0,1,2",
         "--train.tokens", "2e6", "--optim.betas", "0.9,0.99", "--sweep.qk_norm", "false"]))
    assert cfg.model.n_layer == 6 and cfg.optim.lr == 1e-3 and cfg.model.qk_norm is True
    assert cfg.sweep.seeds == [0, 1, 2] and cfg.train.tokens == 2_000_000
    assert cfg.optim.betas == (0.9, 0.99) and cfg.sweep.qk_norm == [False]


def test_toml_file_roundtrip(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('name = "x"\n[model]\nn_layer = 3\n[train]\ntokens = 5000\n')
    cfg = C.load(str(path))
    assert cfg.name == "x" and cfg.model.n_layer == 3
    assert C.from_dict(C.to_dict(cfg)) == cfg


@pytest.mark.parametrize("overrides,message", [
    ({"model.n_layers": "3"}, "unknown config key model.n_layers; did you mean model.n_layer?"),
    ({"optim.lrr": "3"}, "did you mean optim.lr?"),
    ({"model.n_layer": "three"}, "model.n_layer must be an integer; got 'three'"),
    ({"model.qk_norm": "maybe"}, "model.qk_norm must be true or false"),
    ({"optim.lr": "fast"}, "optim.lr must be a number"),
    ({"optim.name": "rmsprop"}, "optim.name must be one of adamw, muon, sgd"),
    ({"model.head_dim": "15"}, "model.head_dim must be even"),
    ({"train.tokens": "0"}, "train.tokens must be positive"),
    ({"model.n_kv_head": "3"}, "must be a multiple of model.n_kv_head"),
    ({"probe.tap": "post"}, "probe.tap must be one of proj, norm, rope"),
    ({"sweep.optimizers": "adamw,rmsprop"}, "unknown optimizer 'rmsprop'"),
])
def test_bad_values_are_named(overrides, message):
    with pytest.raises(C.ConfigError) as e:
        C.load("demo", overrides)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_bad_files(tmp_path):
    with pytest.raises(C.ConfigError, match="config file not found"):
        C.load(str(tmp_path / "missing.toml"))
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\nn_layer = 2")
    with pytest.raises(C.ConfigError, match="not valid TOML"):
        C.load(str(bad))
    wrong = tmp_path / "wrong.toml"
    wrong.write_text("[modle]\nn_layer = 2\n")
    with pytest.raises(C.ConfigError, match="unknown config key modle; did you mean model"):
        C.load(str(wrong))
    with pytest.raises(C.ConfigError, match="neither a file nor a preset"):
        C.load("no-such-preset")


def test_every_field_has_help():
    docs = C.field_docs()
    assert set(docs) == set(C.all_keys())
    missing = [k for k, v in docs.items() if not v and k not in ("name", "out")]
    assert not missing, missing

"""sweep.settings and @variant arms: each arm of one sweep with its own settings (e.g. its own learning rate)."""

from __future__ import annotations

import pytest

from rankprobe.checkpoint import config_differences
from rankprobe.config import ConfigError, load, parse_arm, to_dict
from rankprobe.sweep import arms

SETTINGS = ('{lion = {"optim.hidden_lr" = 1e-5, "optim.warmup_frac" = 0.02}, '
            '"lion+qknorm" = {"optim.hidden_lr" = 2e-5}, '
            '"lion@short" = {"optim.warmup_frac" = 0.01}, '
            'muon = {"optim.muon_lr" = 0.03}}')


def test_settings_apply_by_optimizer_then_label_then_variant():
    cfg = load("demo", {"sweep.arms": "lion,lion+qknorm,lion@short,lion+qknorm@short,muon,adamw",
                        "sweep.settings": SETTINGS, "sweep.seeds": "0,1"})
    got = {a.name: (a.arm, a.optim.name, a.model.qk_norm, a.optim.hidden_lr, a.optim.warmup_frac, a.optim.muon_lr,
                    a.train.seed) for a in arms(cfg)}
    base = cfg.optim.muon_lr
    assert got["lion-s0"] == ("lion", "lion", False, 1e-5, 0.02, base, 0)
    assert got["lion+qknorm-s1"] == ("lion+qknorm", "lion", True, 2e-5, 0.02, base, 1)
    assert got["lion@short-s0"] == ("lion@short", "lion", False, 1e-5, 0.01, base, 0)
    assert got["lion+qknorm@short-s0"] == ("lion+qknorm@short", "lion", True, 2e-5, 0.02, base, 0)
    assert got["muon-s0"][5] == 0.03 and got["adamw-s1"][3:6] == (0.0, cfg.optim.warmup_frac, base)
    assert len(got) == 12


def test_an_arm_label_is_a_name_only():
    a, b = arms(load("demo", {"sweep.arms": "lion@x,lion@y"}))
    assert config_differences(to_dict(a), to_dict(b)) == []  # same settings: the label changes no metric


@pytest.mark.parametrize("settings,message", [
    ('{lion = {"optim.hiden_lr" = 1e-5}}', "did you mean optim.hidden_lr"),
    ('{lion = {"optim.name" = "sgd"}}', "comes from the arm's label"),
    ('{lion = {"train.seed" = 3}}', "comes from the arm's label"),
    ('{lamb = {"optim.lr" = 1e-3}}', "cannot read arm 'lamb'"),
    ('{lion = 3}', "every value must be a table"),
    ('{lion = {"optim.hidden_lr" = "fast"}}', "must be a number"),
])
def test_bad_settings_fail_with_one_line(settings, message):
    with pytest.raises(ConfigError, match=message):
        arms(load("demo", {"sweep.arms": "lion", "sweep.settings": settings}))


@pytest.mark.parametrize("label", ["lion@", "lion@a/b", "lion@..", "lion+qknorm@x@y"])
def test_bad_variant_names_are_refused(label):
    with pytest.raises(ConfigError, match="cannot read arm"):
        parse_arm(label)


def test_train_takes_its_arms_settings_and_the_command_line_wins(capsys):
    """`rankprobe train PRESET --optim.name lion` is the preset's lion arm as its sweep makes it (the
    settings by optimizer, then label), not lion at the defaults; an override given on the command
    line wins over the settings; the change is said in one line."""
    from rankprobe.cli import _arm_settings

    def train_config(overrides):
        return _arm_settings(load("demo", overrides), overrides)

    common = {"sweep.settings": SETTINGS, "optim.name": "lion"}
    lion = train_config(common)
    assert (lion.optim.hidden_lr, lion.optim.warmup_frac) == (1e-5, 0.02)
    sweep_arm = next(a for a in arms(load("demo", {**common, "sweep.arms": "lion"})))
    assert config_differences(to_dict(lion), to_dict(sweep_arm)) == []
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["rankprobe: arm lion takes the preset's sweep.settings: optim.hidden_lr = 1e-05, "
                   "optim.warmup_frac = 0.02"]
    assert train_config({**common, "model.qk_norm": "true"}).optim.hidden_lr == 2e-5  # the label's own
    mine = train_config({**common, "optim.hidden_lr": "3e-4"})
    assert (mine.optim.hidden_lr, mine.optim.warmup_frac) == (3e-4, 0.02)
    plain = load("demo", {"optim.name": "lion"})
    assert _arm_settings(plain, {"optim.name": "lion"}) is plain  # no settings: unchanged, nothing said
    assert capsys.readouterr().err.count("\n") == 2


def test_a_scan_of_a_presets_arm_starts_from_its_settings(capsys):
    """`rankprobe scan PRESET --optim.name lion --param optim.warmup_frac` scans lion's arm (its own rate),
    and the scanned key wins over the settings (scanning optim.hidden_lr itself scans the rate)."""
    from rankprobe.cli import _arm_settings
    from rankprobe.sweep import scan_configs

    overrides = {"sweep.settings": SETTINGS, "optim.name": "lion"}
    cfg = _arm_settings(load("demo", overrides), overrides)
    warm = scan_configs(cfg, "optim.warmup_frac", ["0.01", "0.05"])
    assert [(c.optim.hidden_lr, c.optim.warmup_frac) for c in warm] == [(1e-5, 0.01), (1e-5, 0.05)]
    rates = scan_configs(cfg, "optim.hidden_lr", ["3e-4", "1e-3"])
    assert [(c.optim.hidden_lr, c.optim.warmup_frac) for c in rates] == [(3e-4, 0.02), (1e-3, 0.02)]

"""Which optimizer steps the hidden matrices of an arm other than adamw and muon, with which arguments.

Every arm but `adamw` gives the 2-D matrices inside blocks to one optimizer and the embedding, head
and gains to AdamW (build.py's RULES), so the hidden matrices' optimizer is the only difference
between arms. `NAMED` lists the ready-made ones; `optim.name = "custom"` takes any
`torch.optim.Optimizer` subclass by dotted path (`optim.cls`). `resolve` turns a config into the class
and its keyword arguments and fails with one line (ConfigError) on a class that does not import, is
no Optimizer, or does not take a keyword; `check` also builds it once on a dummy matrix, so that a
sweep can refuse a bad arm before any arm runs.

Lion, Signum and SOAP come from `pytorch_optimizer` (the `optimizers` extra), imported only when an
arm names them.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch

from rankprobe.config import ConfigError, OptimConfig


@dataclass(frozen=True)
class Named:
    """A ready-made hidden-matrix optimizer: its class, default lr and the arguments it takes from the config."""

    cls: str
    """dotted path of the class"""
    lr: float
    """lr when optim.hidden_lr is 0; a starting point for the scan, not a tuned value"""
    from_cfg: Callable[[OptimConfig], dict]
    """keyword arguments drawn from shared config keys (momentum, nesterov)"""


def _momentum(c: OptimConfig) -> dict:
    return {"momentum": c.momentum, "nesterov": c.nesterov}


# Default lrs, by the per-element size of a step: Muon's 0.02 moves each element of a 768-wide
# matrix by ~0.02 / sqrt(768) = 7e-4 a step; sign updates (lion, signum) move every element by lr, and
# the Lion paper (Chen et al. 2023, arXiv 2302.06675, Sec. 5) takes 3-10x below AdamW's lr (1.5e-3 at
# seed-22l); torch's SGD momentum sums gradients (1 / (1 - 0.95) = 20x a gradient); Adafactor's lr is a
# relative step (scaled by each matrix's RMS), torch's default; SOAP's is pytorch_optimizer's default.
NAMED: dict[str, Named] = {
    "sgd": Named("torch.optim.SGD", 0.05, _momentum),
    "normsgd": Named("rankprobe.optim.normsgd.NormSGD", 0.02, _momentum),
    "lion": Named("pytorch_optimizer.Lion", 3e-4, lambda c: {}),
    "signum": Named("pytorch_optimizer.SignSGD", 3e-4, lambda c: {"momentum": c.momentum}),
    "adafactor": Named("torch.optim.Adafactor", 1e-2, lambda c: {}),
    "soap": Named("pytorch_optimizer.SOAP", 3e-3, lambda c: {}),
}

_INSTALL = "pip install 'rankprobe[optimizers]' (or -r requirements-dev.txt)"


def import_optimizer(path: str, key: str = "optim.cls") -> type[torch.optim.Optimizer]:
    """The class at dotted `path` ('torch.optim.RAdam'); ConfigError naming `key` if it is not an Optimizer."""
    module, _, name = path.rpartition(".")
    if not module or not name:
        raise ConfigError(f"{key} must be a dotted class path such as torch.optim.RAdam; got {path!r}")
    try:
        obj = getattr(importlib.import_module(module), name, None)
    except ImportError as e:
        hint = f"; {_INSTALL}" if module.split(".")[0] == "pytorch_optimizer" else ""
        raise ConfigError(f"{key}: cannot import {module} ({e}){hint}") from None
    if not (isinstance(obj, type) and issubclass(obj, torch.optim.Optimizer)):
        raise ConfigError(f"{key}: {path} is not a torch.optim.Optimizer subclass")
    return obj


def _arguments(cls: type) -> dict[str, inspect.Parameter]:
    """The named keyword arguments of cls.__init__ after `params`. A **kwargs catch-all is not counted:
    several library optimizers store whatever it gets in their defaults, so a misspelt name would vanish."""
    sig = inspect.signature(cls.__init__)
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {n: p for n, p in list(sig.parameters.items())[2:] if p.kind in kinds}


def resolve(cfg: OptimConfig) -> tuple[type[torch.optim.Optimizer], dict]:
    """(class, keyword arguments including lr) for the hidden matrices of `cfg`'s arm.

    Arguments, later ones winning: those the named arm draws from the config (momentum, nesterov);
    weight_decay = optim.weight_decay where the class takes it; optim.kwargs; lr = optim.hidden_lr,
    or when that is 0 the named arm's default or the class's own.
    """
    if cfg.name in ("adamw", "muon"):
        raise ValueError(f"optim.name={cfg.name!r} has no hidden-matrix optimizer here (see build.py)")
    named = NAMED.get(cfg.name)
    if named is None and cfg.name != "custom":
        raise ConfigError(f"optim.name: unknown optimizer {cfg.name!r}")
    path = named.cls if named else cfg.cls
    cls = import_optimizer(path, "optim.cls" if named is None else f"optim.name={cfg.name!r}")
    takes = _arguments(cls)
    kwargs = named.from_cfg(cfg) if named else {}
    if "weight_decay" in takes:
        kwargs["weight_decay"] = cfg.weight_decay
    kwargs |= cfg.kwargs
    unknown = sorted(set(kwargs) - set(takes))
    if unknown:
        raise ConfigError(f"optim.kwargs: {path} takes no argument {unknown[0]!r} "
                          f"(it takes {', '.join(takes) or 'none'})")
    lr = cfg.hidden_lr or (named.lr if named else takes["lr"].default if "lr" in takes else None)
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or lr <= 0:
        raise ConfigError(f"{path} has no default lr; set optim.hidden_lr")
    return cls, {**kwargs, "lr": float(lr)}


def build(cfg: OptimConfig, group: dict) -> torch.optim.Optimizer:
    """The hidden matrices' optimizer over one torch param group (which carries its own lr).

    A class rejecting the values of its arguments (ValueError, TypeError) is the user's input too: one line.
    """
    cls, kwargs = resolve(cfg)
    try:
        return cls([group], **kwargs)
    except (ValueError, TypeError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"optim: {cls.__module__}.{cls.__qualname__} rejected its arguments "
                          f"{_show(kwargs)}: {msg}") from None


def check(cfg: OptimConfig) -> None:
    """Fail now, with one line, if `cfg`'s hidden-matrix optimizer cannot be built (adamw, muon: nothing to do)."""
    if cfg.name in ("adamw", "muon"):
        return
    w = torch.nn.Parameter(torch.zeros(2, 2))
    build(cfg, {"params": [w], "lr": resolve(cfg)[1]["lr"]})


def describe(opt: torch.optim.Optimizer, kwargs: dict | None = None) -> dict:
    """What a run records about the optimizer of a group: its class's full path and, given, its arguments."""
    out: dict = {"optimizer": f"{type(opt).__module__}.{type(opt).__qualname__}"}
    if kwargs is not None:
        out["kwargs"] = {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}
    return out


def _show(kwargs: dict) -> str:
    return "(" + ", ".join(f"{k}={v!r}" for k, v in kwargs.items()) + ")"

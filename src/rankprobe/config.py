"""One typed config tree for a RankProbe run or sweep: dataclasses, TOML files, dotted overrides.

A config file is TOML whose tables mirror the dataclasses below (`[model]`, `[optim]`, ...). Values
are checked against the field types (rankprobe.coerce); unknown keys fail with the nearest valid name. Presets live in
`rankprobe/presets/*.toml` and are addressed by name (`demo`, `seed-22l`). No torch import here, so
configs can be validated and reports rebuilt on a machine without it.
"""

from __future__ import annotations

import dataclasses
import math
import re
import tomllib
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

# The errors live in rankprobe.errors; importing them from here keeps working.
from .coerce import coerce, unknown_key
from .errors import ConfigError, DataError, UserError  # noqa: F401
from .files import read_regular
from .runfolder import check_name


@dataclass
class ModelConfig:
    n_layer: int = 4
    """number of decoder blocks"""
    d_model: int = 256
    """residual stream width"""
    n_head: int = 4
    """query heads"""
    n_kv_head: int = 0
    """key/value heads for grouped-query attention (0 = n_head)"""
    head_dim: int = 64
    """width of one head"""
    mlp_hidden: int = 0
    """SwiGLU hidden width (0 = 8/3 * d_model rounded up to a multiple of 64)"""
    seq_len: int = 256
    """context length in tokens"""
    vocab_size: int = 0
    """vocabulary size (0 = taken from the tokenizer)"""
    qk_norm: bool = False
    """per-head RMSNorm on queries and keys before RoPE"""
    qk_norm_gain: bool = True
    """learnable gain in the QK-Norm RMSNorms"""
    tie_embeddings: bool = False
    """share the token embedding with the output head"""
    rope_theta: float = 10000.0
    """RoPE base"""
    norm_eps: float = 1e-6
    """epsilon of every RMSNorm"""
    init_std: float = 0.02
    """std of the normal init of linear and embedding weights"""


@dataclass
class OptimConfig:
    name: str = "adamw"
    """optimizer of the 2-D matrices inside blocks: 'adamw' (then of every parameter), 'muon', 'sgd', 'normsgd',
    'lion', 'signum', 'adafactor', 'soap', or 'custom' (optim.cls); all but adamw leave embeddings, head and gains
    to AdamW"""
    lr: float = 3e-3
    """AdamW learning rate (for the AdamW groups of every other arm too)"""
    muon_lr: float = 0.02
    """Muon learning rate, scaled per matrix by sqrt(max(1, rows/cols)) as in torch.optim.Muon"""
    hidden_lr: float = 0.0
    """learning rate of the hidden matrices' optimizer for every name but adamw and muon (0 = its default: sgd 0.05,
    normsgd 0.02, lion 3e-4, signum 3e-4, adafactor 0.01, soap 3e-3, custom the class's own)"""
    cls: str = ""
    """for optim.name='custom': dotted path of the torch.optim.Optimizer subclass for the hidden matrices, e.g.
    torch.optim.RAdam"""
    kwargs: dict[str, object] = field(default_factory=dict)
    """more keyword arguments for the hidden matrices' optimizer (not adamw or muon), as a TOML table, e.g.
    '{betas = [0.95, 0.98]}'; they override those taken from optim.momentum, nesterov and weight_decay"""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas"""
    eps: float = 1e-8
    """AdamW epsilon"""
    weight_decay: float = 0.0
    """weight decay on 2-D hidden matrices and the head (never on norms or gains); decoupled except for sgd and
    custom classes that couple it to the gradient"""
    momentum: float = 0.95
    """momentum of muon, sgd, normsgd and signum"""
    nesterov: bool = True
    """Nesterov momentum for muon, sgd and normsgd"""
    ns_steps: int = 5
    """Muon quintic Newton-Schulz iterations"""
    ns_dtype: str = "auto"
    """Muon's Newton-Schulz dtype: 'bf16', 'fp32', or 'auto' (bf16 on CUDA and on CPUs with bf16 matrix instructions, else fp32)"""
    warmup_frac: float = 0.05
    """fraction of the token budget spent in linear warmup"""
    decay: str = "cosine"
    """schedule after warmup: 'cosine', 'linear' or 'constant'"""
    min_lr_frac: float = 0.1
    """final learning rate as a fraction of the peak"""
    grad_clip: float = 1.0
    """global gradient-norm clip (0 = off)"""
    qk_clip: bool = False
    """QK-Clip (MuonClip's clipping half, Kimi K2): after each step rescale heads whose max q·k logit > tau"""
    qk_clip_tau: float = 100.0
    """QK-Clip threshold on the largest scaled q·k logit of a head in a step"""
    qk_clip_sequences: int = 0
    """sequences of each batch QK-Clip scores for its max (0 = all; fewer is cheaper but sees a lower bound)"""


@dataclass
class DataConfig:
    corpus: str = "embedded"
    """'embedded' (the shipped Austen + Melville corpus) or a path: a .txt or .jsonl file, or a folder (every .txt, .md and .jsonl under it)"""
    jsonl_field: str = "text"
    """field holding the text in JSONL records"""
    tokenizer: str = "bpe"
    """'bpe' (byte-level BPE trained on the corpus) or a path to a .tiktoken file (GPT-2 ranks)"""
    vocab_size: int = 4096
    """vocabulary size of the trained BPE tokenizer"""
    val_frac: float = 0.05
    """fraction of the corpus held out for validation"""
    probe_frac: float = 0.02
    """fraction of the corpus held out as the fixed probe set"""
    cache_dir: str = ""
    """where tokenizers and token caches live (empty = ~/.cache/rankprobe or $RANKPROBE_CACHE)"""


@dataclass
class TrainConfig:
    tokens: int = 1_000_000
    """training budget in tokens"""
    batch_size: int = 16
    """sequences per optimizer step"""
    seed: int = 0
    """seed for init and batch order"""
    device: str = "auto"
    """'auto', 'cpu', 'cuda', 'cuda:N'"""
    dtype: str = "auto"
    """autocast dtype: 'auto' (bf16 on CUDA, fp32 on CPU), 'bf16', 'fp32'"""
    compile: str = "auto"
    """torch.compile the training step: 'true' (the whole model as one graph), 'regional' (each block
    compiled on its own, plus the loss head: the layers share one compiled block, so a cold compile
    takes a fraction of the time), 'false', or 'auto': regional on one GPU, the whole model under
    torchrun, off on the CPU"""
    eval_tokens: int = 65536
    """validation tokens per evaluation"""
    log_every: int = 10
    """steps between train-loss rows in metrics.jsonl"""
    progress: bool = True
    """show a progress bar"""
    tensorboard: bool = False
    """also write TensorBoard scalars under the run directory"""
    checkpoint_minutes: float = 10.0
    """minutes between resumable checkpoints (0 = one at every probe checkpoint instead)"""
    allow_large: bool = False
    """train even when the model and optimizer state look too big for the device's memory (the estimate
    counts fp32 weights, gradients and optimizer state only)"""


@dataclass
class ProbeConfig:
    checkpoints: list[int] = field(default_factory=list)
    """token counts to probe at (empty = 0, then log-spaced up to the budget)"""
    n_checkpoints: int = 8
    """number of log-spaced checkpoints after initialization when `checkpoints` is empty"""
    tokens: int = 16384
    """probe-set tokens fed through the model at each checkpoint"""
    tap: str = "norm"
    """headline tap for key PR: 'proj' (after W_k), 'norm' (after QK-Norm), 'rope' (after RoPE)"""
    dead_pr: float = 10.0
    """layers whose mean key PR is below this are reported as dead"""
    attention: bool = True
    """also measure attention entropy and the max pre-softmax logit per head (an explicit-softmax pass)"""
    weights: bool = True
    """also measure spectra of W_q, W_k, W_v, W_o and the RMS of the update at each checkpoint"""


@dataclass
class SweepConfig:
    optimizers: list[str] = field(default_factory=lambda: ["adamw", "muon"])
    """optimizer arms"""
    qk_norm: list[bool] = field(default_factory=lambda: [False, True])
    """QK-Norm arms"""
    seeds: list[int] = field(default_factory=lambda: [0])
    """seeds per arm"""
    arms: list[str] = field(default_factory=list)
    """explicit arms instead of the optimizers × qk_norm grid: an optimizer, then +qknorm and/or +qkclip, then @variant (a name)"""
    settings: dict[str, dict] = field(default_factory=dict)
    """per-arm settings: {optimizer or arm label = {dotted key = value}}, e.g. lion = {"optim.hidden_lr" = 1e-5}"""


@dataclass
class Config:
    name: str = "run"
    """run name (a sweep names each arm itself)"""
    arm: str = ""
    """the arm label the run reports under ('' = optimizer, +qknorm, +qkclip; a sweep sets it)"""
    out: str = "runs"
    """output directory (a run writes here; a sweep puts one folder per arm under it)"""
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)

    def __post_init__(self) -> None:
        validate(self)


# Every optimizer an arm may name. rankprobe.optim.hidden says which class steps the hidden matrices of each
# (this module imports no torch); 'custom' takes its class from optim.cls.
OPTIMIZERS = ("adamw", "muon", "sgd", "normsgd", "lion", "signum", "adafactor", "soap", "custom")

_CHOICES = {
    ("optim", "name"): OPTIMIZERS,
    ("optim", "decay"): ("cosine", "linear", "constant"),
    ("probe", "tap"): ("proj", "norm", "rope"),
    ("train", "dtype"): ("auto", "bf16", "fp32"),
    ("optim", "ns_dtype"): ("auto", "bf16", "fp32"),
    ("train", "compile"): ("auto", "true", "regional", "false"),
}


_VARIANT = re.compile(r"[A-Za-z0-9_-]+")
_ARM_KEYS = ("name", "arm", "optim.name", "optim.qk_clip", "model.qk_norm", "train.seed")


def parse_arm(label: str) -> tuple[str, bool, bool]:
    """'muon+qknorm+qkclip' -> ('muon', True, True): optimizer, QK-Norm, QK-Clip. A trailing '@variant'
    ('lion@warmup1') names an arm that differs only by its sweep.settings; it is not part of the triple."""
    base, at, variant = label.partition("@")
    name, *flags = base.split("+")
    if name not in OPTIMIZERS or any(f not in ("qknorm", "qkclip") for f in flags) or len(set(flags)) != len(flags) \
            or (at and not _VARIANT.fullmatch(variant)):
        raise ConfigError(f"sweep.arms: cannot read arm {label!r} (an optimizer, then +qknorm and/or +qkclip, then "
                          f"optionally @name, e.g. lion+qknorm@warmup1; optimizers: {', '.join(OPTIMIZERS)})")
    return name, "qknorm" in flags, "qkclip" in flags


def arm_label(optimizer: str, qk_norm: bool, qk_clip: bool = False) -> str:
    """The inverse of parse_arm: the label a run's arm is reported under."""
    return optimizer + ("+qknorm" if qk_norm else "") + ("+qkclip" if qk_clip else "")


INT64_MAX = 2**63 - 1


def _leaves(obj, prefix: str = ""):
    """(dotted key, value) for every leaf of a config (lists and tables walked into), for the checks
    that hold for every value: finite floats, integers that fit 64 bits."""
    if dataclasses.is_dataclass(obj):
        for f in dataclasses.fields(obj):
            yield from _leaves(getattr(obj, f.name), f"{prefix}{f.name}.")
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _leaves(v, f"{prefix}{k}.")
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _leaves(v, prefix)
    else:
        yield prefix.rstrip("."), obj


def _check_numbers(cfg: Config) -> None:
    """No NaN or infinity anywhere (torch would take them and fail, or worse, silently turn a feature
    off: a NaN grad_clip clips nothing); no integer past 64 bits (torch cannot hold it)."""
    for key, value in _leaves(cfg):
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key} must be a finite number; got {value}")
        if isinstance(value, int) and not isinstance(value, bool) and not -INT64_MAX - 1 <= value <= INT64_MAX:
            raise ConfigError(f"{key} is too large for a 64-bit integer; got {str(value)[:30]}...")


def validate(cfg: Config) -> None:
    """Check values that types alone cannot; messages name the CLI key."""
    _check_numbers(cfg)
    check_name(cfg.name)
    for (section, key), choices in _CHOICES.items():
        value = getattr(getattr(cfg, section), key)
        if value not in choices:
            raise ConfigError(f"{section}.{key} must be one of {', '.join(choices)}; got {value!r}")
    for opt in cfg.sweep.optimizers:
        if opt not in _CHOICES[("optim", "name")]:
            raise ConfigError(f"sweep.optimizers: unknown optimizer {opt!r} (use {', '.join(OPTIMIZERS)})")
    m, t, o, d, p = cfg.model, cfg.train, cfg.optim, cfg.data, cfg.probe
    positive = {
        "model.n_layer": m.n_layer, "model.d_model": m.d_model, "model.n_head": m.n_head,
        "model.head_dim": m.head_dim, "model.seq_len": m.seq_len, "train.tokens": t.tokens,
        "train.batch_size": t.batch_size, "train.log_every": t.log_every, "probe.tokens": p.tokens,
        "optim.ns_steps": o.ns_steps, "data.vocab_size": d.vocab_size, "train.eval_tokens": t.eval_tokens,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key} must be positive; got {value}")
    at_least_zero = {"model.n_kv_head": m.n_kv_head, "model.mlp_hidden": m.mlp_hidden,
                     "model.vocab_size": m.vocab_size, "model.init_std": m.init_std,
                     "probe.n_checkpoints": p.n_checkpoints, "probe.dead_pr": p.dead_pr}
    for key, value in at_least_zero.items():
        if value < 0:
            raise ConfigError(f"{key} must be >= 0; got {value}")
    for key, value in {"model.rope_theta": m.rope_theta, "model.norm_eps": m.norm_eps, "optim.eps": o.eps}.items():
        if value <= 0:
            raise ConfigError(f"{key} must be positive; got {value}")
    if not all(0 <= b < 1 for b in o.betas):
        raise ConfigError(f"optim.betas must each lie in [0, 1); got {list(o.betas)}")
    if m.head_dim % 2:
        raise ConfigError(f"model.head_dim must be even for RoPE; got {m.head_dim}")
    kv = m.n_kv_head or m.n_head
    if kv < 0 or m.n_head % kv:
        raise ConfigError(f"model.n_head ({m.n_head}) must be a multiple of model.n_kv_head ({kv})")
    if not 0 < d.val_frac < 0.5 or not 0 < d.probe_frac < 0.5:
        raise ConfigError("data.val_frac and data.probe_frac must lie in (0, 0.5)")
    if not 0 <= o.warmup_frac < 1 or not 0 <= o.min_lr_frac <= 1:
        raise ConfigError("optim.warmup_frac must lie in [0, 1) and optim.min_lr_frac in [0, 1]")
    if o.lr <= 0 or o.muon_lr <= 0 or o.hidden_lr < 0 or o.weight_decay < 0 or o.grad_clip < 0:
        raise ConfigError("optim.lr and optim.muon_lr must be positive, hidden_lr, weight_decay and grad_clip >= 0")
    _validate_hidden(cfg)
    if not 0 <= t.checkpoint_minutes < float("inf"):
        raise ConfigError(f"train.checkpoint_minutes must be a number >= 0; got {t.checkpoint_minutes}")
    for label in cfg.sweep.arms:
        parse_arm(label)
    for key, table in cfg.sweep.settings.items():
        if key not in OPTIMIZERS:
            parse_arm(key)
        for dotted in table:
            if dotted in _ARM_KEYS:
                raise ConfigError(f"sweep.settings.{key}: {dotted} comes from the arm's label and sweep.seeds; "
                                  "name another arm instead")
            if dotted not in all_keys():
                raise ConfigError(f"sweep.settings.{key}: {unknown_key(dotted, all_keys())}")
    if o.qk_clip_tau <= 0 or o.qk_clip_sequences < 0:
        raise ConfigError("optim.qk_clip_tau must be positive and optim.qk_clip_sequences >= 0")
    if not 0 <= o.momentum < 1:
        raise ConfigError(f"optim.momentum must lie in [0, 1); got {o.momentum}")
    if any(c < 0 or c > t.tokens for c in p.checkpoints):
        raise ConfigError(f"probe.checkpoints must lie in [0, train.tokens={t.tokens}]")
    if not cfg.sweep.optimizers or not cfg.sweep.qk_norm or not cfg.sweep.seeds:
        raise ConfigError("sweep.optimizers, sweep.qk_norm and sweep.seeds must each be non-empty")
    for key in ("optimizers", "qk_norm", "seeds", "arms"):
        values = getattr(cfg.sweep, key)
        twice = sorted({str(v) for v in values if values.count(v) > 1})
        if twice:  # two arms of one name would share a run folder
            raise ConfigError(f"sweep.{key} lists {', '.join(twice)} more than once")


def _validate_hidden(cfg: Config) -> None:
    """optim.cls and optim.kwargs must fit the arms that use them: a sweep's arms as much as optim.name.

    Whether the class imports and takes these keywords is checked where torch is (rankprobe.optim.hidden).
    """
    o = cfg.optim
    names = {o.name, *cfg.sweep.optimizers, *(parse_arm(a)[0] for a in cfg.sweep.arms)}
    if "custom" in names and not o.cls:
        raise ConfigError("optimizer 'custom' needs optim.cls, a dotted class path such as torch.optim.RAdam")
    if o.cls and "custom" not in names:
        raise ConfigError(f"optim.cls ({o.cls}) is used only by optim.name='custom'; got {o.name!r}")
    if o.kwargs and names <= {"adamw", "muon"}:
        raise ConfigError("optim.kwargs is for the hidden matrices' optimizer of arms other than adamw and muon, "
                          "which have their own keys (optim.betas, optim.momentum, ...)")
    if "lr" in o.kwargs or "params" in o.kwargs:
        raise ConfigError("optim.kwargs may not set lr or params; the hidden matrices' lr is optim.hidden_lr")


# ---------------------------------------------------------------------------------------------
# building configs from dicts, files and dotted overrides


def _fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def all_keys(cls=None, prefix: str = "") -> list[str]:
    """Every dotted leaf key of the config tree, e.g. 'model.n_layer'."""
    cls = cls or Config
    hints = typing.get_type_hints(cls)
    keys = []
    for name in _fields(cls):
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            keys += all_keys(tp, f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


def _build(cls, data: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    fields = _fields(cls)
    kwargs = {}
    for key, value in data.items():
        dotted = prefix + key
        if key not in fields:
            raise unknown_key(dotted, all_keys())
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"{dotted} must be a table of settings; got {value!r}")
            kwargs[key] = _build(tp, value, dotted + ".")
        else:
            kwargs[key] = coerce(value, tp, dotted)
    return cls(**kwargs)


def from_dict(data: dict) -> Config:
    """Build and validate a Config from nested plain data (as TOML or JSON give)."""
    return _build(Config, data)


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    """Nested config data -> {dotted key: value}, e.g. {'model': {'n_layer': 4}} -> {'model.n_layer': 4}."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def to_dict(cfg: Config) -> dict:
    """Plain nested data (lists for tuples), JSON- and TOML-friendly."""
    return dataclasses.asdict(cfg)


def field_docs() -> dict[str, str]:
    """Dotted key -> the docstring under its field in this module (what `--help` prints)."""
    import ast
    import inspect
    import sys

    tree = ast.parse(inspect.getsource(sys.modules[__name__]))
    per_class: dict[str, dict[str, str]] = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            docs, body = {}, node.body
            for a, b in zip(body, body[1:]):
                if (isinstance(a, ast.AnnAssign) and isinstance(a.target, ast.Name)
                        and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant)):
                    docs[a.target.id] = str(b.value.value)
            per_class[node.name] = docs
    out = {}
    for key in all_keys():
        *sections, leaf = key.split(".")
        cls = Config
        for s in sections:
            cls = typing.get_type_hints(cls)[s]
        out[key] = per_class.get(cls.__name__, {}).get(leaf, "")
    return out


def preset_names() -> list[str]:
    files = resources.files("rankprobe") / "presets"
    return sorted(p.name[:-5] for p in files.iterdir() if p.name.endswith(".toml"))


MAX_CONFIG_BYTES = 16 * 2**20  # far above any config; a bound on what a path that is no config can make us read


def read_toml(source: str) -> dict:
    """Read a preset name or a TOML path into nested data."""
    if not source.strip():  # `rankprobe train "$CONFIG"` with CONFIG unset must not train the defaults
        raise ConfigError(f"the config is an empty string; give a TOML file or a preset ({', '.join(preset_names())})")
    path = Path(source)
    if path.suffix != ".toml" and not path.exists():
        if source not in preset_names():
            raise ConfigError(f"config {source!r} is neither a file nor a preset ({', '.join(preset_names())})")
        raw = (resources.files("rankprobe") / "presets" / f"{source}.toml").read_bytes()
    else:  # a FIFO would block for ever, /dev/zero fill the memory: read_regular refuses them
        raw = read_regular(path, "config file", ConfigError, expect="a TOML file", limit=MAX_CONFIG_BYTES)
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"cannot read config file {source}: {e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {source} is not valid TOML: {e}") from None


def apply_overrides(data: dict, overrides: dict[str, str]) -> dict:
    """Set dotted keys ('model.n_layer' -> '22') in nested data; unknown keys fail early."""
    valid = all_keys()
    for key, value in overrides.items():
        if key not in valid:
            raise unknown_key(key, valid)
        *path, leaf = key.split(".")
        node = data
        for i, part in enumerate(path):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{'.'.join(path[:i + 1])} must be a table of settings (the config sets it to "
                                  f"{node!r}), so --{key} cannot apply")
        node[leaf] = value
    return data


def load(source: str | None = None, overrides: dict[str, str] | None = None) -> Config:
    """A preset name or TOML file (None = defaults) plus dotted overrides -> validated Config."""
    data = read_toml(source) if source is not None else {}
    return from_dict(apply_overrides(data, overrides or {}))

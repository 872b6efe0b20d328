"""Parameter groups, optimizers and the token-based learning-rate schedule of a RankProbe run.

`param_groups` sorts every trainable parameter into named groups by declarative rules and fails
loudly when a parameter lands in no group or two, or when a rule matches nothing (a renamed module
would otherwise slip silently into the wrong optimizer). `build_optimizers` turns the groups into
AdamW and the hidden matrices' optimizer (Muon, or any other: `hidden.py`), whose param groups
remember their peak lr; `lr_scale` and `apply_lr` are the schedule, a pure function of tokens seen
plus a setter.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from rankprobe.config import OPTIMIZERS, OptimConfig
from rankprobe.optim import hidden
from rankprobe.optim.muon import Muon, fast_ns_dtype

NamedParams = list[tuple[str, nn.Parameter]]


@dataclass(frozen=True)
class Rule:
    """Parameters whose (name, tensor) satisfy `match`; RULES says which group they go to."""

    what: str
    match: Callable[[str, nn.Parameter], bool]
    optional: bool = False
    """may match nothing (the head is absent when tied to the embedding)"""


_GAIN = re.compile(r"(^|\.)(attn_norm|mlp_norm|norm_f|q_norm|k_norm)\.weight$")

# Hidden matrices: q, k, v, o and the three MLP matrices of every block. Muon is meant for exactly
# these: Keller's post leaves the input embedding, the output layer and gains to AdamW, and
# Moonlight (arXiv 2502.16982) keeps AdamW for embeddings, head and norms too.
HIDDEN = Rule("2-D matrices inside blocks", lambda n, p: n.startswith("blocks.") and p.ndim == 2)
HEAD = Rule("output head lm_head.weight", lambda n, p: n == "lm_head.weight", optional=True)
EMBED = Rule("token embedding tok_emb.weight", lambda n, p: n == "tok_emb.weight")
GAINS = Rule("RMSNorm gains", lambda n, p: p.ndim == 1 and _GAIN.search(n) is not None)

# Every arm decays the same tensors, so the hidden matrices' optimizer is the only difference
# between arms. Weight decay on the head but not on gains or the embedding follows nanoGPT's
# "2-D weights decay except embeddings" convention; gains never decay (config: optim.weight_decay).
# Every arm but adamw splits like muon: its hidden matrices form a group named after the optimizer.
RULES: dict[str, dict[str, tuple[Rule, ...]]] = {
    "adamw": {"adamw_decay": (HIDDEN, HEAD), "adamw_no_decay": (EMBED, GAINS)},
    **{name: {name: (HIDDEN,), "adamw_decay": (HEAD,), "adamw_no_decay": (EMBED, GAINS)}
       for name in OPTIMIZERS if name != "adamw"},
}


def param_groups(model: nn.Module, cfg: OptimConfig) -> dict[str, NamedParams]:
    """Every trainable parameter of `model` in exactly one named group; empty groups are left out.

    Raises ValueError naming the parameter that no rule or several rules claim, or the rule that
    matched no parameter.
    """
    if cfg.name not in RULES:
        raise ValueError(f"unknown optimizer {cfg.name!r}; expected one of {', '.join(RULES)}")
    rules = [(group, rule) for group, rs in RULES[cfg.name].items() for rule in rs]
    groups: dict[str, NamedParams] = {group: [] for group in RULES[cfg.name]}
    hits = {key: 0 for key in rules}
    for name, p in model.named_parameters():  # shared (tied) tensors appear once, under their first name
        if not p.requires_grad:
            continue
        claimed = [(group, rule) for group, rule in rules if rule.match(name, p)]
        if len(claimed) != 1:
            by = ", ".join(f"{rule.what} -> {group}" for group, rule in claimed)
            hint = f" ({by})" if by else "; add a rule in rankprobe/optim/build.py"
            raise ValueError(f"parameter {name} {tuple(p.shape)} is claimed by {len(claimed)} optimizer"
                             f" rules for optim.name={cfg.name!r}{hint}")
        groups[claimed[0][0]].append((name, p))
        hits[claimed[0]] += 1
    for (group, rule), n in hits.items():
        if n == 0 and not rule.optional:
            raise ValueError(f"optimizer rule {rule.what!r} (group {group}) matched no model parameter")
    return {group: params for group, params in groups.items() if params}


def _fused_ok(device: torch.device) -> bool:
    # Fused AdamW (one kernel for all tensors) runs on CUDA and, since torch 2.4, on CPU; both
    # torch 2.11 and 2.13 have it. Elsewhere fall back to foreach.
    return device.type in ("cuda", "cpu")


def ns_dtype(cfg: OptimConfig, device: str | torch.device) -> torch.dtype:
    """Muon's Newton-Schulz dtype for `device`: optim.ns_dtype, with 'auto' the device's fast one."""
    if cfg.ns_dtype == "auto":
        return fast_ns_dtype(device)
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[cfg.ns_dtype]


def build_optimizers(
    model: nn.Module, cfg: OptimConfig, device: str | torch.device
) -> tuple[list[torch.optim.Optimizer], dict[str, dict]]:
    """AdamW (every arm) and the hidden matrices' optimizer (every arm but adamw) over `param_groups`;
    returns (optimizers, group_sizes).

    group_sizes maps each group name to {"n_tensors", "n_params", "optimizer"} (the stepping class's
    full path), plus the resolved "kwargs" for a `hidden.py` optimizer; a run records it. Every torch
    param group carries 'name' and 'peak_lr' (the lr at schedule scale 1), which `apply_lr` reads.
    """
    device = torch.device(device)
    groups = param_groups(model, cfg)
    for name, p in (np for params in groups.values() for np in params):
        if p.device.type != device.type:
            raise ValueError(f"parameter {name} is on {p.device}, but the optimizers are built for {device}")
    sizes = {g: {"n_tensors": len(ps), "n_params": sum(p.numel() for _, p in ps)} for g, ps in groups.items()}

    def torch_group(name: str, lr: float, **extra) -> dict:
        return {"params": [p for _, p in groups[name]], "name": name, "lr": lr, "peak_lr": lr, **extra}

    adamw_groups = [torch_group(g, cfg.lr, weight_decay=cfg.weight_decay if g == "adamw_decay" else 0.0)
                    for g in ("adamw_decay", "adamw_no_decay") if g in groups]
    fused = _fused_ok(device)
    optimizers: list[torch.optim.Optimizer] = []
    spec = None  # the hidden.py optimizer's resolved arguments, recorded with its group
    if "muon" in groups:
        optimizers.append(Muon([torch_group("muon", cfg.muon_lr)], lr=cfg.muon_lr, momentum=cfg.momentum,
                               nesterov=cfg.nesterov, ns_steps=cfg.ns_steps, weight_decay=cfg.weight_decay,
                               ns_dtype=ns_dtype(cfg, device)))
    elif cfg.name in groups:
        _, spec = hidden.resolve(cfg)
        optimizers.append(hidden.build(cfg, torch_group(cfg.name, spec["lr"])))
    optimizers.append(torch.optim.AdamW(adamw_groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                                        fused=fused or None, foreach=None if fused else True))
    for opt in optimizers:
        for group in opt.param_groups:
            sizes[group["name"]] |= hidden.describe(opt, spec if group["name"] == cfg.name else None)
    return optimizers, sizes


def lr_scale(
    tokens_seen: int, total_tokens: int, warmup_frac: float, decay: str, min_lr_frac: float
) -> float:
    """Multiplier on the peak lr after `tokens_seen` of `total_tokens` training tokens.

    Linear warmup from 0 to 1 over the first warmup_frac * total_tokens, then 'cosine' or 'linear'
    decay to min_lr_frac at total_tokens (and after), or 'constant' at 1. Token-based so runs with
    different batch sizes follow the same curve. Pass the count *including* the batch about to be
    stepped on, so the first step has a small non-zero lr.
    """
    if decay not in ("cosine", "linear", "constant"):
        raise ValueError(f"decay must be 'cosine', 'linear' or 'constant'; got {decay!r}")
    warmup = warmup_frac * total_tokens
    if tokens_seen < warmup:
        return tokens_seen / warmup
    if decay == "constant":
        return 1.0
    progress = min(1.0, (tokens_seen - warmup) / max(total_tokens - warmup, 1))
    if decay == "cosine":
        return min_lr_frac + (1 - min_lr_frac) * 0.5 * (1 + math.cos(math.pi * progress))
    return 1 - (1 - min_lr_frac) * progress


def apply_lr(optimizers: Iterable[torch.optim.Optimizer], scale: float) -> None:
    """Set every param group's lr to its peak_lr * scale."""
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["peak_lr"] * scale

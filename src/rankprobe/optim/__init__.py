"""Optimizers for RankProbe: Muon (batched Newton-Schulz), NormSGD, and the parameter-group builder.

`muon` and `normsgd` hold the math (pure functions) and thin optimizers; `hidden` says which optimizer
steps the hidden matrices of every other arm (sgd, lion, signum, adafactor, soap, or a custom class by
dotted path); `build` holds the parameter-group rules, `build_optimizers` and the token-based lr
schedule (`lr_scale`, `apply_lr`).
"""

from rankprobe.optim.build import apply_lr, build_optimizers, lr_scale, ns_dtype, param_groups
from rankprobe.optim.muon import Muon, adjusted_lr, fast_ns_dtype, muon_update, newton_schulz
from rankprobe.optim.normsgd import NormSGD, orthogonal_norm_scale

__all__ = [
    "Muon",
    "NormSGD",
    "adjusted_lr",
    "apply_lr",
    "build_optimizers",
    "fast_ns_dtype",
    "lr_scale",
    "muon_update",
    "newton_schulz",
    "ns_dtype",
    "orthogonal_norm_scale",
    "param_groups",
]

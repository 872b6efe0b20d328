"""Optimizers for RankProbe: Muon (batched Newton-Schulz) and the AdamW/Muon parameter-group builder.

`muon` holds the math (pure functions) and the thin `Muon` optimizer; `build` holds the parameter-group
rules, `build_optimizers` and the token-based lr schedule (`lr_scale`, `apply_lr`).
"""

from rankprobe.optim.build import apply_lr, build_optimizers, lr_scale, ns_dtype, param_groups
from rankprobe.optim.muon import Muon, adjusted_lr, fast_ns_dtype, muon_update, newton_schulz

__all__ = [
    "Muon",
    "adjusted_lr",
    "apply_lr",
    "build_optimizers",
    "fast_ns_dtype",
    "lr_scale",
    "muon_update",
    "newton_schulz",
    "ns_dtype",
    "param_groups",
]

"""Does the attention lens measure the attention the model computes? A check for `Patterns` models.

The attention lens recomputes each layer's softmax(scale · q·kᵀ) from the rope taps. For the models
RankProbe knows (its own, the Hugging Face families) those are the q and k the attention kernel gets.
For a model tapped through `Patterns` they are only as right as the patterns: a rotary applied inside
`forward` (a function, no module to tap) leaves the rope tap pre-rotary, a logit scale other than
1/sqrt(D) needs `attention_spec`, a bidirectional model is not causal. Each is a silently wrong
entropy. The model's own attention output is at hand, though: the input of its output projection
`o`, (B, T, H·D). So `AttentionCheck` recomputes that output from the taps (the lens's softmax times
the proj-tap v, float32) and warns where the two differ, once per layer: at the first measured forward
where the comparison can hold (what it checks is the model's structure, which does not change between
steps, and each comparison costs about what the attention lens does).

Skipped where the comparison cannot hold: a layer with a sliding window or soft-cap, a padded batch,
a layer holding an active dropout in training mode, activation checkpointing's recomputed forward.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from .adapters import Key, ModuleAdapter, in_backward

# relative error ‖y − ŷ‖ / ‖ŷ‖ tolerated: float32 kernels agree to ~1e-6, bf16 / fp16 ones to ~1e-2
TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-3}
LOW_PRECISION_TOLERANCE = 5e-2


class AttentionCheck:
    """`sink` collects each layer's rope-tap q, k and proj-tap v; `attach` hooks each layer's `o`,
    whose input is compared with softmax(scale · q·kᵀ, causal)·v. `compared`: the layers checked
    (each once), `warned`: those that differed."""

    def __init__(self, adapter: ModuleAdapter, padded=lambda: None):
        self.adapter, self.padded = adapter, padded
        self.got: dict[int, dict[str, torch.Tensor]] = {}
        self.compared: set[int] = set()
        self.warned: set[int] = set()

    def sink(self, key: Key, x: torch.Tensor) -> None:
        tap, tensor, layer = key
        if self.adapter.p.o is None or layer in self.compared:  # nothing will compare (and free) them
            return
        if (tap == "rope" and tensor != "v") or (tap == "proj" and tensor == "v"):
            self.got.setdefault(layer, {})[tensor] = x

    def attach(self) -> list:
        if self.adapter.p.o is None:
            return []
        return [self.adapter.sub(attn, self.adapter.p.o).register_forward_pre_hook(
                    lambda _m, args, i=i: self._check(i, args)) for i, attn in enumerate(self.adapter.layers)]

    def _check(self, layer: int, args: tuple) -> None:
        got = self.got.pop(layer, {})
        spec = self.adapter.attention(layer)
        if len(got) < 3 or layer in self.compared or not args or not isinstance(args[0], torch.Tensor) \
                or spec.window is not None or spec.softcap is not None or self.padded() is not None \
                or in_backward() or _dropout(self.adapter.layers[layer]):
            return
        q, k, v = got["q"], got["k"], got["v"]
        B, T, H, D = q.shape
        y = args[0]
        if tuple(y.shape) != (B, T, H * v.size(-1)):  # not the heads side by side: nothing to compare
            return
        with torch.no_grad(), torch.autocast(q.device.type, enabled=False):
            q, k, v = (t.detach().float().transpose(1, 2) for t in (q, k, v))  # (B, heads, T, D)
            k, v = (t.repeat_interleave(H // t.size(1), 1) for t in (k, v))  # query head h reads h // (H / Hkv)
            want = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=spec.scale)
            want = want.transpose(1, 2).reshape(B, T, -1)
            err = float((y.detach().float() - want).norm() / want.norm().clamp_min(1e-30))
        self.compared.add(layer)
        low = any(t.dtype not in TOLERANCE for t in (y, *got.values()))
        if err > (LOW_PRECISION_TOLERANCE if low else TOLERANCE[y.dtype]):
            self.warned.add(layer)
            o = self.adapter.p.o
            warnings.warn(f"Monitor: layer {layer}'s attention output (the input of {o!r}) differs by {err:.1%} "
                          f"from softmax({spec.scale:.4g}·q·kᵀ, causal)·v of the taps, so its attn rows do not "
                          "describe the model's attention: a rotary applied inside forward (tap it as "
                          "Patterns.q_rope / k_rope), another logit scale (attention_spec=), or not causal?",
                          RuntimeWarning, stacklevel=2)


def _dropout(layer: nn.Module) -> bool:
    """A dropout that is active: the model's output then is not the lens's expectation."""
    return any(isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 and m.training for m in layer.modules())

"""QK-Clip: the clipping half of MuonClip (Kimi K2 technical report, arXiv 2507.20534, section 2.1).

During a training step's forward, `MaxLogitTracker` records per layer and head the largest scaled
attention logit S_max = max over the batch of q_i·k_j / sqrt(D) over causal pairs j ≤ i, q and k
after RoPE (read from the model's rope taps). After the optimizer step, `qk_clip_` rescales every
head whose S_max exceeded τ by γ = τ / S_max, so that the same batch would now give at most τ:

  no QK-Norm, MHA    W_q rows and W_k rows of the head each × sqrt(γ)   (the K2 recipe)
  no QK-Norm, GQA    W_q rows of the head × γ; W_k untouched, because its key head is shared by
                     the other query heads of its group, whose logits must not move. K2 does the
                     same for MLA's shared rotary key: only the head-specific q_R takes the full γ.
  QK-Norm            rescaling W_q or W_k does nothing: RMSNorm divides the scale back out, and
                     the logit's scale is set by the gains. RankProbe's q_norm / k_norm gains are
                     shared by all heads of a layer, so the layer is clipped as one: both gains
                     × sqrt(γ_layer), γ_layer = τ / max over heads of S_max. Heads under τ in a
                     clipped layer shrink too. Without gains (model.qk_norm_gain = false) the logit
                     is bounded by sqrt(D) and there is nothing to clip.

Heads (or, with QK-Norm, layers) under τ are multiplied by exactly 1.0, which leaves them
bit-identical. Everything stays on the device: no host sync unless the caller reads the result.

Cost: the tracker forms the scores once more per layer under no_grad, in the taps' dtype, one
block of query positions at a time against the keys it can see (about half of T²):
≈ B·H·T²·D extra FLOPs per layer (half of a full QKᵀ product), no softmax, no V, no backward.
Measured step times are in docs/lenses.md.

torch.compile: the hooks are traced into the compiled graph only if they exist when the model is
first compiled *and* dynamo does not reuse a graph compiled earlier in the process for another
instance of the model without hooks (it skips hook guards by default, so a second arm in the same
process would silently lose them). Create QKClip before compiling and set
`torch._dynamo.config.skip_nnmodule_hook_guards = False` (or call `torch._dynamo.reset()`) first.
`QKClip.step` checks once, on its first call, that every head was recorded, and raises otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch


@torch.no_grad()
def max_logits(q: torch.Tensor, k: torch.Tensor, scale: float, budget: int = 2**26) -> torch.Tensor:
    """Per query head, the max of q_i·k_j·scale over causal pairs j ≤ i and the batch -> (H,) float32.

    q (B, T, H, D) and k (B, T, Hkv, D) as the rope taps give them; query head h reads key head
    h // (H / Hkv) (no copy of k: the query heads of a group share one matmul). Scores are formed in
    the taps' dtype (bf16 under autocast: tensor cores, max exact to bf16's 0.4%), one block of query
    positions at a time against only the keys it can see, at most `budget` elements per block.
    """
    B, T, H, D = q.shape
    Hkv = k.size(2)
    qg = q.transpose(1, 2).reshape(B, Hkv, H // Hkv, T, D)  # head h = g·rep + r, as repeat_interleave
    kt = k.transpose(1, 2)[:, :, None].transpose(-1, -2)  # (B, Hkv, 1, D, T)
    out = torch.full((Hkv, H // Hkv), -math.inf, device=q.device)
    rows = max(1, min(T, budget // (B * H * T)))
    with torch.autocast(q.device.type, enabled=False):
        for start in range(0, T, rows):
            end = min(T, start + rows)
            s = qg[:, :, :, start:end] @ kt[..., :end]  # (B, Hkv, rep, rows, end)
            future = torch.ones(end - start, end - start, dtype=torch.bool, device=q.device).triu(1)
            s[..., start:end].masked_fill_(future, -math.inf)  # only the diagonal block sees the future
            out = torch.maximum(out, s.amax((0, 3, 4)).float())
    return out.flatten() * scale  # scale > 0 commutes with the max


class MaxLogitTracker:
    """Running per-layer, per-head S_max of a RankProbe Transformer in training mode: `max` (L, H).

    Hooks on every layer's hook_q_rope / hook_k_rope; forwards in eval mode (validation, probes) are
    not recorded. The max runs over all forwards since `reset()`, so gradient accumulation is
    covered. With several processes, all-reduce `max` with MAX before clipping (world_size > 1).
    `sequences` = n > 0 bounds the cost: only the first n sequences of each batch are scored (cost ×
    n/B), and `max` becomes a lower bound of the batch's S_max.
    """

    def __init__(self, model, budget: int = 2**26, sequences: int = 0):
        cfg = model.cfg
        self.scale = cfg.head_dim ** -0.5  # SDPA's default, what Attention uses
        self.budget = budget
        self.rows = slice(0, sequences or None)  # the first `sequences` of each batch (0 = all)
        device = next(model.parameters()).device
        self.max = torch.full((cfg.n_layer, cfg.n_head), -math.inf, device=device)
        self._q: dict[int, torch.Tensor] = {}
        self.handles = []
        for i, block in enumerate(model.blocks):
            self.handles.append(block.attn.hook_q_rope.register_forward_hook(self._on_q(i)))
            self.handles.append(block.attn.hook_k_rope.register_forward_hook(self._on_k(i)))

    def _on_q(self, layer: int):
        def hook(module, _inputs, q):
            if module.training:
                self._q[layer] = q.detach()[self.rows]
        return hook

    def _on_k(self, layer: int):
        def hook(module, _inputs, k):
            if module.training:
                m = max_logits(self._q.pop(layer), k.detach()[self.rows], self.scale, self.budget)
                self.max[layer] = torch.maximum(self.max[layer], m)
        return hook

    def reset(self) -> None:
        self.max.fill_(-math.inf)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


@torch.no_grad()
def qk_clip_(model, s_max: torch.Tensor, tau: float = 100.0) -> torch.Tensor:
    """Rescale, in place, the heads of a RankProbe Transformer whose S_max (L, H) exceeded `tau`
    (module docstring: which weights, and why). Call after the optimizer step. Returns γ (L, H),
    the factor each head's logits were multiplied by (1 where nothing changed)."""
    cfg = model.cfg
    s = s_max.to(torch.float32)
    gamma = torch.where(s > tau, tau / s, torch.ones_like(s))  # (L, H); NaN-free since s > tau > 0
    if cfg.qk_norm:
        gamma = gamma.amin(dim=1, keepdim=True).expand_as(gamma)  # one gain per layer
        if not cfg.qk_norm_gain:
            return torch.ones_like(gamma)
    for layer, block in enumerate(model.blocks):
        a, g = block.attn, gamma[layer]
        if cfg.qk_norm:
            root = g[0].sqrt().to(a.q_norm.weight.dtype)
            a.q_norm.weight.mul_(root)
            a.k_norm.weight.mul_(root)
        elif a.n_kv_head == a.n_head:
            root = g.sqrt().to(a.wq.weight.dtype)[:, None, None]  # (H, 1, 1)
            a.wq.weight.view(a.n_head, a.head_dim, -1).mul_(root)
            a.wk.weight.view(a.n_head, a.head_dim, -1).mul_(root)
        else:
            a.wq.weight.view(a.n_head, a.head_dim, -1).mul_(g.to(a.wq.weight.dtype)[:, None, None])
    return gamma


class QKClip:
    """The tracker and the clip together. Per training step:

        loss = model(x, y); loss.backward(); optimizer.step()
        gamma = clip.step()   # rescales heads over tau, resets the running max; (L, H) on device
    """

    def __init__(self, model, tau: float = 100.0, budget: int = 2**26, sequences: int = 0,
                 merge_max: Callable[[torch.Tensor], None] | None = None):
        """`merge_max(s_max)`: under DDP, an in-place all-reduce MAX of the tracker's (L, H) maxima, so
        that every rank clips by the global batch's S_max and the replicas stay identical."""
        if tau <= 0:
            raise ValueError(f"QK-Clip threshold tau must be positive; got {tau}")
        self.model, self.tau, self._checked = model, tau, False
        self.tracker = MaxLogitTracker(model, budget, sequences)
        self.merge_max = merge_max

    def step(self) -> torch.Tensor:
        if not self._checked:  # one host sync, once: hooks dropped by torch.compile must not pass silently
            if not torch.isfinite(self.tracker.max).all():
                raise RuntimeError("QK-Clip recorded no logits for some heads: was the forward run in eval "
                                   "mode, or compiled without the tracker's hooks? (rankprobe.optim.qkclip docstring)")
            self._checked = True
        if self.merge_max is not None:
            self.merge_max(self.tracker.max)
        gamma = qk_clip_(self.model, self.tracker.max, self.tau)
        self.tracker.reset()
        return gamma

    def close(self) -> None:
        self.tracker.remove()

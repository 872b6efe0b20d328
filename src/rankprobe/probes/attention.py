"""The attention lens: per layer and head, the mean causal attention entropy and the largest
pre-softmax logit, recomputed from the rope taps (`AttentionStats`). SDPA never materialises the
attention weights; fused attention kernels return the log-sum-exp instead. `attention_sink` feeds it
from a pass's taps, `attention_lenses` is a pass of its own; `lenses.probe_lenses` fills it beside the
probe rows. Formulas: docs/lenses.md, section 2.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from .adapters import AttentionSpec
from .capture import Key, Sink, adapter_for, feed


class AttentionStats:
    """Per layer and head: sums of causal attention entropy (nats), of entropy / log(visible keys),
    and the running max of the scaled logit s = q·k·scale over visible (causal) pairs.

    `add(layer, q, k, scale)` takes the post-RoPE q (B, T, H, D) and k (B, T, Hkv, D) of one batch;
    query head h reads key head h // (H / Hkv), as SDPA's enable_gqa and HF's repeat_kv do. Rows
    t ≥ 1 (at least two visible keys) enter the entropy means; every visible pair enters the max.

    A row's entropy is H_t = logsumexp_j s_tj − Σ_j p_tj s_tj, and the second term is scale · q_t · o_t
    with o = softmax(s)·k. Everything is float32. On CUDA and on the CPU (`fused`) both come from one
    fused attention kernel with the keys as values, which returns the log-sum-exp beside o and never
    forms the T×T scores (`torch.ops.aten`'s memory-efficient kernel, and the CPU flash kernel). The
    max comes from a second call at temperature 1/SHARPNESS: max_j s_tj ≤ lse_j(SHARPNESS·s_tj) /
    SHARPNESS ≤ max_j s_tj + log(t + 1) / SHARPNESS, an excess of at most 4.2e-4 at T = 1,024 and
    ~0 unless two logits tie to within 1/SHARPNESS; on CUDA that call takes bf16 taps as they are, to
    the flash kernel (`_sharpened_lse`). Elsewhere, or with `fused=False`, the scores are
    formed in chunks of at most `budget` elements: the reference the tests hold the kernels to.

    A layer with a sliding `window` (query t sees keys t − window < j ≤ t) or a logit `softcap`
    (s = softcap · tanh(s / softcap), Gemma 2) always takes the chunked path, which forms exactly
    those logits; entropy_norm then divides by log of the keys each row really sees, min(t + 1, window).
    """

    SHARPNESS = 2.0**14

    def __init__(self, budget: int = 2**26, fused: bool = True):
        self.budget, self.fused = budget, fused
        self.layers: dict[int, dict] = {}

    @torch.no_grad()
    def add(self, layer: int, q: torch.Tensor, k: torch.Tensor, scale: float, window: int | None = None,
            softcap: float | None = None) -> None:
        # float32 on purpose, also inside a bf16 training autocast (which would recast the matmul)
        with torch.autocast(q.device.type, enabled=False):
            self._add(layer, q, k, AttentionSpec(scale, window, softcap))

    def _add(self, layer: int, q: torch.Tensor, k: torch.Tensor, spec: AttentionSpec) -> None:
        B, T, H, D = q.shape
        W = spec.window if spec.window is not None and spec.window < T else None  # a window ≥ T changes nothing
        if W is not None and W < 2:
            raise ValueError(f"layer {layer}: a sliding window of {W} key leaves no attention to measure")
        k = k.transpose(1, 2) if k.size(2) == H else k.transpose(1, 2).repeat_interleave(H // k.size(2), dim=1)
        taps = q.transpose(1, 2), k  # (B, H, T, D)
        q, k = (t.float() for t in taps)
        s = self._layer(layer, H, q.device)
        kernel = _LSE_KERNELS.get(q.device.type) if self.fused and W is None and spec.softcap is None else None
        if W is not None or spec.softcap is not None:
            lse, expected, row_max = self._masked_scores(q, k, spec.scale, W, spec.softcap)
        elif kernel is None:
            lse, expected, row_max = self._scores(q, k, spec.scale)
        else:
            out, lse = kernel(q, k, spec.scale)
            expected = spec.scale * (q * out).sum(-1)
            sharp = spec.scale * self.SHARPNESS
            row_max = _sharpened_lse(*taps, sharp, lambda: kernel(q, k, sharp)[1]) / self.SHARPNESS
        ent = (lse - expected)[..., 1:].double()  # (B, H, T-1)
        keys = torch.arange(2, T + 1, device=q.device, dtype=torch.float64)  # t + 1 visible keys, t ≥ 1
        log_keys = (keys if W is None else keys.clamp_max(W)).log()
        s["entropy"] += ent.sum((0, 2))
        s["entropy_norm"] += (ent / log_keys).sum((0, 2))
        s["max_logit"] = torch.maximum(s["max_logit"], row_max.amax((0, 2)))
        s["log_keys"] += B * (T - 1) * _mean_log_keys(T, W)
        s["rows"] += B * (T - 1)
        s["T"] = max(s["T"], T)

    def _layer(self, layer: int, H: int, device) -> dict:
        """The layer's sums, created empty on first sight (every rank holds every layer's, for the merge)."""
        return self.layers.setdefault(layer, {
            "entropy": torch.zeros(H, dtype=torch.float64, device=device),
            "entropy_norm": torch.zeros(H, dtype=torch.float64, device=device),
            "log_keys": torch.zeros((), dtype=torch.float64, device=device),  # Σ log(visible keys) over rows
            "max_logit": torch.full((H,), -math.inf, device=device), "rows": 0, "T": 0,
        })

    @torch.no_grad()
    def add_padded(self, layer: int, q: torch.Tensor, k: torch.Tensor, keep: torch.Tensor, scale: float,
                   window: int | None = None, softcap: float | None = None) -> None:
        """`add` for a padded batch: `keep` (B, T) marks each sequence's tokens, one contiguous run per
        row (left or right padding; probes/padding.py checks). Each row's tokens are measured as a
        sequence of their own, which is what the model's padding and causal masks let its queries see;
        rows of equal length go in one call. A sequence of one token adds nothing (no entropy to
        measure), as row t = 0 adds nothing to the means of a full sequence."""
        self._layer(layer, q.size(2), q.device)  # a batch of one-token rows still has the layer
        lengths = keep.sum(1)
        for n in sorted(set(lengths.tolist()) - {0, 1}):
            rows = lengths == n
            q_n, k_n = (t[rows][keep[rows]].unflatten(0, (-1, n)) for t in (q, k))
            self.add(layer, q_n, k_n, scale, window, softcap)

    def _scores(self, q: torch.Tensor, k: torch.Tensor, scale: float) -> tuple[torch.Tensor, ...]:
        """(lse, expected logit, row max), each (B, H, T), from float32 scores formed chunk by chunk
        with the causal mask added by the same matmul; the expected logit from one SDPA call."""
        B, H, T, D = q.shape
        expected = scale * (q * F.scaled_dot_product_attention(q, k, k, is_causal=True, scale=scale)).sum(-1)
        q, k = q.reshape(B * H, T, D), k.reshape(B * H, T, D)
        mask = torch.full((T, T), -math.inf, device=q.device).triu(1)
        lse, row_max = torch.empty(B * H, T, device=q.device), torch.empty(B * H, T, device=q.device)
        chunk = max(1, self.budget // (T * T))
        for i in range(0, B * H, chunk):
            scores = torch.baddbmm(mask, q[i : i + chunk], k[i : i + chunk].transpose(1, 2), alpha=scale)
            m = row_max[i : i + chunk] = scores.amax(-1)  # (c, T)
            lse[i : i + chunk] = scores.sub_(m[..., None]).exp_().sum(-1).log_().add_(m)
        return lse.view(B, H, T), expected, row_max.view(B, H, T)

    def _masked_scores(self, q: torch.Tensor, k: torch.Tensor, scale: float, window: int | None,
                       softcap: float | None) -> tuple[torch.Tensor, ...]:
        """(lse, expected logit, row max), each (B, H, T), from float32 logits formed chunk by chunk,
        soft-capped before the (sliding-window) causal mask, as the models' eager attention does."""
        B, H, T, D = q.shape
        q, k = q.reshape(B * H, T, D), k.reshape(B * H, T, D)
        visible = AttentionSpec(scale, window).visible(T, q.device)
        out = [torch.empty(B * H, T, device=q.device) for _ in range(3)]
        chunk = max(1, self.budget // (T * T))
        for i in range(0, B * H, chunk):
            s = torch.bmm(q[i : i + chunk], k[i : i + chunk].transpose(1, 2)).mul_(scale)  # (c, T, T)
            if softcap is not None:
                s = s.div_(softcap).tanh_().mul_(softcap)
            s = s.masked_fill_(~visible, -math.inf)
            m = s.amax(-1)  # (c, T)
            lse = (s - m[..., None]).exp_().sum(-1).log_().add_(m)
            p = (s - lse[..., None]).exp_()  # masked entries: exp(-inf) = 0
            out[0][i : i + chunk], out[2][i : i + chunk] = lse, m
            out[1][i : i + chunk] = (p * s.masked_fill_(~visible, 0.0)).sum(-1)
        return tuple(t.view(B, H, T) for t in out)

    def rows(self) -> list[dict]:
        """One row per layer: entropy, entropy_norm, max_logit (mean / mean / max over heads) and
        their `*_heads` lists, entropy_max (uniform attention's entropy), n_rows, seq_len."""
        layers = sorted(self.layers)
        if not layers:
            return []
        stats = [self.layers[layer] for layer in layers]
        values = torch.stack([torch.stack([s["entropy"] / max(s["rows"], 1), s["entropy_norm"] / max(s["rows"], 1),
                                           s["max_logit"].double(), (s["log_keys"] / max(s["rows"], 1)).expand_as(s["entropy"])])
                              for s in stats]).cpu()  # (layers, 4, H): one transfer
        out = []
        for layer, s, (ent, norm, mx, (entropy_max, *_)) in zip(layers, stats, values.tolist()):
            out.append({
                "layer": layer, "entropy": sum(ent) / len(ent), "entropy_heads": ent,
                "entropy_norm": sum(norm) / len(norm), "entropy_norm_heads": norm,
                "entropy_max": entropy_max, "max_logit": max(mx), "max_logit_heads": mx,
                "n_rows": s["rows"], "seq_len": s["T"],
            })
        return out


def _mean_log_keys(T: int, window: int | None) -> float:
    """Uniform attention's entropy averaged over rows t = 1 … T−1: the mean of log(visible keys)."""
    if T < 2:
        return 0.0
    if window is None:
        return math.lgamma(T + 1) / (T - 1)  # Σ log(t + 1) = log T!
    return (math.lgamma(window + 1) + (T - window) * math.log(window)) / (T - 1)


def _lse_cuda(q: torch.Tensor, k: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, k, None, True, 0.0, True, scale=scale)[:2]
    return out, lse[..., : q.size(-2)]  # the kernel pads the log-sum-exp's length to a multiple of 32


def _lse_cpu(q: torch.Tensor, k: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, k, 0.0, True, scale=scale)


def _sharpened_lse(q: torch.Tensor, k: torch.Tensor, scale: float,
                   float32_lse: Callable[[], torch.Tensor]) -> torch.Tensor:
    """The causal log-sum-exp (B, H, T) of scores q·k·scale for the max logit, from the taps (B, H, T, D).

    Only the log-sum-exp is used, so on CUDA, taps in bf16 or fp16 (every tap under the training
    autocast) go to the flash kernel in their own dtype, on tensor cores: the product of two bf16 (or
    fp16) numbers is exact in float32 and the kernel sums them and forms the log-sum-exp in float32,
    so the scores are the float32 path's up to the order of summation. The kernel's output, which
    rounds the attention weights to bf16, is thrown away. Elsewhere `float32_lse()`: the float32 kernel.
    """
    if q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and k.dtype == q.dtype and q.size(-1) <= 256 \
            and torch.cuda.get_device_capability(q.device) >= (8, 0):
        lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, k, 0.0, True, scale=scale)[1]
        return lse[..., : q.size(-2)]
    return float32_lse()


# causal attention of (B, H, T, D) float32 q against k with k as the values: (output, log-sum-exp (B, H, T))
_LSE_KERNELS: dict[str, Callable[..., tuple[torch.Tensor, torch.Tensor]]] = {"cuda": _lse_cuda, "cpu": _lse_cpu}


def attention_sink(adapter, stats: AttentionStats,
                    padding: Callable[[], torch.Tensor | None] | None = None) -> Sink:
    """Pairs each layer's rope-tap q and k (in whichever order the model computes them) and adds
    them to `stats` with what that layer computes (its AttentionSpec). `padding()`, when given, is
    the current forward's padding mask (None: every token counts; `AttentionStats.add_padded`)."""
    pending: dict[int, dict[str, torch.Tensor]] = {}

    def sink(key: Key, x: torch.Tensor) -> None:
        tap, tensor, layer = key
        if tap != "rope" or tensor == "v":
            return
        got = pending.setdefault(layer, {})
        got[tensor] = x
        if len(got) == 2:
            spec = adapter.attention(layer)
            keep = padding() if padding is not None else None
            if keep is None:
                stats.add(layer, got["q"], got["k"], spec.scale, spec.window, spec.softcap)
            else:
                stats.add_padded(layer, got["q"], got["k"], keep, spec.scale, spec.window, spec.softcap)
            del pending[layer]

    return sink


def attention_lenses(model, tokens: torch.Tensor, batch_size: int) -> list[dict]:
    """Attention entropy and max pre-softmax logit per layer and head on `tokens` (N, T): the rows
    of `AttentionStats.rows` (metrics kind `attn`). A pass of its own; see `probe_lenses` for one
    pass that also fills the probe rows."""
    adapter = adapter_for(model)
    stats = AttentionStats()
    taps = {(t, x, i) for i in range(adapter.n_layer) for t, x in (("rope", "q"), ("rope", "k"))}
    feed(adapter, tokens, batch_size, attention_sink(adapter, stats), taps)
    return stats.rows()

"""Lenses beyond the key PR: more spectra of the taps, attention entropy and max logit, weight spectra.

- `spectral_rows`: the `probe` rows of `capture.stats_to_rows` plus erank, stable rank and RankMe per
  head, each metric's isotropic finite-sample null, and the mechanism lenses (probes/mechanism.py).
- `attention_lenses`: per layer and head, the mean causal attention entropy and the largest
  pre-softmax logit, recomputed from the rope taps (SDPA never materialises the attention weights;
  fused attention kernels return the log-sum-exp instead, `AttentionStats`).
- `probe_lenses`: both of the above in one pass over the probe set.
- `weight_lenses` (or its halves, `weight_lenses_start`), `weight_snapshot`, `update_rms`: spectra and
  orthogonality of W_q, W_k, W_v, W_o and of one update.

Everything runs on any model with a tap adapter (capture.adapter_for: RankProbe's Transformer, the
Hugging Face families of probes/families.py, any nn.Module through adapters.ModuleAdapter); the
adapter also says what each attention layer computes (adapters.AttentionSpec: scale, sliding
window, soft-cap). Formulas and row keys: docs/lenses.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from .adapters import AttentionSpec
from .capture import (Key, Sink, adapter_for, base_rows, by_key, covariance_sink, feed, head_groups,
                      tap_shapes)
from .mechanism import (LAYER_MAX_KEYS, MECHANISM_KEYS, covariance_eigh, gaussian_orth_null, gram_orth_dev,
                        haar_axis_null, kurtosis_max_null, kurtosis_null, mechanism_of, orthogonality, sphere_null)
from .spectra import (CovStats, covariance_spectrum, gram, gram_spectrum, gram_spectrum_metrics,
                      isotropic_null, isotropic_pr, spectra_from, to_host)

SPECTRAL_KEYS = ("erank", "stable_rank", "rankme")


def logit_scales(model) -> list[float]:
    """Per layer, the factor attention multiplies q·k by: 1/sqrt(D) for RankProbe (SDPA's default)."""
    adapter = adapter_for(model)
    return [adapter.attention(i).scale for i in range(adapter.n_layer)]


# ---------------------------------------------------------------------------------------------
# spectra of the taps


def spectral_rows(stats: dict[Key, CovStats]) -> list[dict]:
    """`stats_to_rows(stats)` with, per row, erank / stable_rank / rankme (layer mean over heads) and
    their per-head lists `*_heads`, plus `<metric>_null` for pr and each new metric (isotropic data of
    the row's n and dim); and the mechanism lenses (`mechanism.MECHANISM_KEYS`, `*_heads` and a layer
    value each) with their nulls. One batch of eigendecompositions per head width for all of them."""
    return spectral_rows_start(stats)()


@torch.no_grad()
def spectral_rows_start(stats: dict[Key, CovStats]) -> Callable[[], list[dict]]:
    """`spectral_rows` in two halves, like `weight_lenses_start`. This call does the device half: the
    covariances, second moments and moments of every tap's heads (`HeadBatch`, one per head width) and
    their copy to host memory without blocking. It returns the host half, a function that waits for
    the copies, decomposes the covariances and returns the rows; `stats` may be reused meanwhile."""
    keys = sorted(stats, key=lambda k: (k[0], k[1], k[2]))
    groups, shapes = head_groups(stats, keys), tap_shapes(stats, keys)
    copies = [[to_host(t, wait=False) for t in (hb.cov, hb.second, hb.moments)] for _, hb in groups]
    copied = None
    if any(hb.cov.is_cuda for _, hb in groups):
        copied = torch.cuda.Event()
        copied.record()

    def rows() -> list[dict]:
        if not keys:
            return []
        if copied is not None:
            copied.synchronize()
        per_group = [_tap_lenses(*host) for host in copies]
        cut = {m: by_key(shapes, groups, torch.cat([g[m] for g in per_group])) for m in per_group[0]}
        return [_spectral_row(row, {m: parts[i] for m, parts in cut.items()})
                for i, row in enumerate(base_rows(keys, shapes, cut["pr"], cut["mean_norm"]))]

    return rows


def _spectral_row(row: dict, found: dict[str, torch.Tensor]) -> dict:
    """`row` (of `stats_to_rows`) with the spectra, mechanism lenses and nulls of `found` {metric: (H,)}."""
    for m in SPECTRAL_KEYS:
        heads = found[m].tolist()
        row[m], row[f"{m}_heads"] = sum(heads) / len(heads), heads
    for m in ("pr",) + SPECTRAL_KEYS:
        row[f"{m}_null"] = isotropic_null(m, row["n"], row["dim"])
    for m in MECHANISM_KEYS:
        heads = found[m].tolist()
        row[m] = _layer_max(heads) if m in LAYER_MAX_KEYS else sum(heads) / len(heads)
        row[f"{m}_heads"] = heads
    n, d = row["n"], row["dim"]
    return row | {"top_axis_null": haar_axis_null(d), "kurtosis_null": kurtosis_null(n),
                  "kurtosis_max_null": kurtosis_max_null(n, d), "sphere_r_null": sphere_null(n),
                  "pr_uncentered_null": isotropic_pr(n + 1, d)}


def _tap_lenses(cov: torch.Tensor, second_moment: torch.Tensor, moments: torch.Tensor) -> dict[str, torch.Tensor]:
    """Spectra (`spectra_from`) and mechanism lenses (`mechanism_of`) of a batch of heads, on the CPU:
    the inputs already there, the covariances decomposed with their eigenvectors."""
    lam, vec = covariance_eigh(cov)
    lam_m = covariance_spectrum(second_moment)
    return (spectra_from(cov, lam, lam_m) | mechanism_of(cov, second_moment, moments, lam, vec)
            | {"mean_norm": moments[:, 0].norm(dim=-1)})


def _layer_max(heads: list[float]) -> float:
    """Max over heads, ignoring NaN (heads with nothing to measure); NaN if every head is."""
    return max((h for h in heads if h == h), default=math.nan)


# ---------------------------------------------------------------------------------------------
# attention entropy and max logit


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


def _attention_sink(adapter, stats: AttentionStats,
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


attention_sink = _attention_sink
"""public name of the sink that feeds an AttentionStats from the rope taps (rankprobe.monitor)"""


def attention_lenses(model, tokens: torch.Tensor, batch_size: int) -> list[dict]:
    """Attention entropy and max pre-softmax logit per layer and head on `tokens` (N, T): the rows
    of `AttentionStats.rows` (metrics kind `attn`). A pass of its own; see `probe_lenses` for one
    pass that also fills the probe rows."""
    adapter = adapter_for(model)
    stats = AttentionStats()
    taps = {(t, x, i) for i in range(adapter.n_layer) for t, x in (("rope", "q"), ("rope", "k"))}
    feed(adapter, tokens, batch_size, _attention_sink(adapter, stats), taps)
    return stats.rows()


def probe_lenses(model, tokens: torch.Tensor, batch_size: int, attention: bool = True,
                 merge: Callable[[dict[Key, CovStats], AttentionStats], None] | None = None,
                 progress: Callable[[int], None] | None = None) -> tuple[list[dict], list[dict]]:
    """One pass over `tokens`: (`spectral_rows` of every tap -> kind `probe`, attention rows -> kind
    `attn`, empty when `attention` is False).

    `merge(cov, attn)`, when given, combines the statistics in place before any metric is computed:
    under DDP each rank passes its share of the probe set and `dist.reduce_probe_stats`, so the rows
    describe the whole set exactly (sums and maxima merge without loss). `progress(n)` is called
    after each batch of n sequences."""
    probe_rows, attn = probe_lenses_start(model, tokens, batch_size, attention, merge, progress)
    return probe_rows(), attn


def probe_lenses_start(model, tokens: torch.Tensor, batch_size: int, attention: bool = True,
                       merge: Callable[[dict[Key, CovStats], AttentionStats], None] | None = None,
                       progress: Callable[[int], None] | None = None) -> tuple[Callable[[], list[dict]], list[dict]]:
    """`probe_lenses` with its `probe` rows in two halves (`spectral_rows_start`): the forward, the
    statistics and their copy to the host happen here; the returned function decomposes them on the
    CPU and gives the rows, on whatever thread calls it (the training loop's worker)."""
    adapter = adapter_for(model)
    cov: dict[Key, CovStats] = {}
    attn = AttentionStats()
    cov_sink = covariance_sink(cov)
    attn_sink = _attention_sink(adapter, attn) if attention else None

    def sink(key: Key, x: torch.Tensor) -> None:
        cov_sink(key, x)
        if attn_sink is not None:
            attn_sink(key, x)

    feed(adapter, tokens, batch_size, sink, progress=progress)
    if merge is not None:
        merge(cov, attn)
    return spectral_rows_start(cov), attn.rows()


# ---------------------------------------------------------------------------------------------
# weights


def attention_weights(model) -> list[dict[str, tuple[torch.Tensor, int]]]:
    """Per layer {"q" | "k" | "v" | "o": (W as (out, in), heads)}: W_q (H·D, d), W_k and W_v
    (Hkv·D, d), W_o (d, H·D). The tensors are the live parameters (or views of them)."""
    return adapter_for(model).weights()


def _per_head(w: torch.Tensor, heads: int, matrix: str) -> torch.Tensor:
    """Split (out, in) into heads: q/k/v rows -> (heads, D, d); o columns -> (heads, d, D)."""
    if matrix == "o":
        d_out, width = w.shape
        return w.view(d_out, heads, width // heads).transpose(0, 1)
    return w.view(heads, w.size(0) // heads, w.size(1))


WEIGHT_KEYS = ("spectral_norm", "stable_rank", "erank", "orth_dev", "cond")


def _head_shape(shape: list[int], heads: int, matrix: str) -> tuple[int, int]:
    """The (out, in) shape of one head's block of a matrix of `shape` (as `_per_head` splits it)."""
    out, width = shape
    return (out, width // heads) if matrix == "o" else (out // heads, width)


def weight_lenses(model, per_head: bool = True) -> list[dict]:
    """One row per (layer, matrix) with spectral_norm, stable_rank, erank, orth_dev and cond of the whole
    matrix and, when `per_head`, `*_heads` lists for each head's block (rows of W_q/W_k/W_v, columns of
    W_o); `orth_dev_null` (and `orth_dev_heads_null`) is orth_dev's value for a Gaussian matrix of the
    same shape (`mechanism.orthogonality`, `mechanism.gaussian_orth_null`).
    Singular values in float64, one batch of eigendecompositions per matrix shape (metrics kind `weights`)."""
    return weight_lenses_start(model, per_head)()


@torch.no_grad()
def weight_lenses_start(model, per_head: bool = True) -> Callable[[], list[dict]]:
    """`weight_lenses` in two halves. This call does the device half: every Gram matrix in float64,
    concatenated by shape and copied to host memory without blocking (pinned buffers on CUDA). It
    returns the host half, a function that waits for the copies, decomposes the matrices on the CPU
    (`spectra.eigvalsh_host`) and returns the rows. The training loop runs that function on a worker
    thread while training goes on; the weights may change meanwhile, their Gram matrices no longer do."""
    mats = [(layer, matrix, w, heads) for layer, ws in enumerate(attention_weights(model))
            for matrix, (w, heads) in ws.items()]
    groups: dict[tuple, list[tuple[int, torch.Tensor]]] = {}  # (suffix, Gram shape, long side) -> [(i, grams)]
    for i, (_, matrix, w, heads) in enumerate(mats):
        for suffix, x in [("", w[None])] + ([("_heads", _per_head(w, heads, matrix))] if per_head else []):
            g = gram(x)
            groups.setdefault((suffix, *g.shape[1:], max(x.shape[-2:])), []).append((i, g))
    parts = [(suffix, long_side, [i for i, _ in items], [g.size(0) for _, g in items],
              to_host(torch.cat([g for _, g in items]), wait=False))
             for (suffix, *_, long_side), items in groups.items()]
    copied = None
    if any(w.is_cuda for _, _, w, _ in mats):
        copied = torch.cuda.Event()
        copied.record()
    names = [(layer, matrix, list(w.shape), heads) for layer, matrix, w, heads in mats]

    def rows() -> list[dict]:
        if copied is not None:
            copied.synchronize()
        found: list[dict] = [{} for _ in names]
        for suffix, long_side, idx, sizes, g in parts:
            lam = gram_spectrum(g, long_side)
            for m, v in (gram_spectrum_metrics(lam) | orthogonality(lam)).items():
                for i, part in zip(idx, v.split(sizes)):
                    found[i][m + suffix] = part.tolist() if suffix else part.item()
        order = [m + sfx for sfx in ("", "_heads") for m in WEIGHT_KEYS]
        out = []
        for (layer, matrix, shape, heads), f in zip(names, found):
            row = {"layer": layer, "matrix": matrix, "shape": shape} | {k: f[k] for k in order if k in f}
            row["orth_dev_null"] = gaussian_orth_null(*shape)
            if "orth_dev_heads" in f:
                row["orth_dev_heads_null"] = gaussian_orth_null(*_head_shape(shape, heads, matrix))
            out.append(row)
        return out

    return rows


class Snapshot(dict):
    """`weight_snapshot`'s copies {(layer, matrix): W}, with `heads` {(layer, matrix): heads} beside."""

    heads: dict[tuple[int, str], int]


@torch.no_grad()
def weight_snapshot(model) -> Snapshot:
    """Copies of every attention matrix, keyed (layer, "q" | "k" | "v" | "o"), on their device."""
    snap = Snapshot()
    snap.heads = {}
    for layer, mats in enumerate(attention_weights(model)):
        for m, (w, heads) in mats.items():
            snap[(layer, m)], snap.heads[(layer, m)] = w.detach().clone(), heads
    return snap


@torch.no_grad()
def update_rms(before: dict, after: dict) -> list[dict]:
    """Rows {layer, matrix, update_rms, update_rel, orth_dev, orth_dev_null} for two `weight_snapshot`s
    around an optimizer step: update_rms = RMS of ΔW = ‖ΔW‖_F / sqrt(numel), update_rel =
    ‖ΔW‖_F / ‖W_before‖_F, orth_dev of ΔW (`mechanism.gram_orth_dev`, no eigendecomposition) and its
    Gaussian null; plus, when `before` knows the heads (a `Snapshot`), `orth_dev_heads`, `cond_heads`
    of each head's block of ΔW and `orth_dev_heads_null`. One host transfer per Gram shape."""
    keys = sorted(before)
    delta = {k: after[k].double() - before[k].double() for k in keys}
    stats = torch.stack([torch.stack([delta[k].norm(), before[k].double().norm(), gram_orth_dev(gram(delta[k]))])
                         for k in keys]).cpu()
    rows = [{"layer": layer, "matrix": m, "update_rms": (d / math.sqrt(before[(layer, m)].numel())).item(),
             "update_rel": (d / w).item(), "orth_dev": o.item(),
             "orth_dev_null": gaussian_orth_null(*delta[(layer, m)].shape)}
            for (layer, m), (d, w, o) in zip(keys, stats)]
    heads = getattr(before, "heads", None)
    if heads is None:
        return rows
    groups: dict[tuple, list[tuple[int, torch.Tensor]]] = {}  # (Gram shape, long side) -> [(row, grams)]
    for i, (layer, m) in enumerate(keys):
        blocks = _per_head(delta[(layer, m)], heads[(layer, m)], m)
        g = gram(blocks)
        groups.setdefault((*g.shape[1:], max(blocks.shape[-2:])), []).append((i, g))
    for (*_, long_side), items in groups.items():
        lam = gram_spectrum(to_host(torch.cat([g for _, g in items])), long_side)
        sizes = [g.size(0) for _, g in items]
        found = orthogonality(lam)
        for (i, _), o, c in zip(items, found["orth_dev"].split(sizes), found["cond"].split(sizes)):
            shape = _head_shape(list(delta[keys[i]].shape), heads[keys[i]], keys[i][1])
            rows[i] |= {"orth_dev_heads": o.tolist(), "cond_heads": c.tolist(),
                        "orth_dev_heads_null": gaussian_orth_null(*shape)}
    return rows

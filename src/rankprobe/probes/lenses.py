"""Lenses beyond the key PR: more spectra of the taps, attention entropy and max logit, weight spectra.

- `spectral_rows`: the `probe` rows of `capture.stats_to_rows` plus erank, stable rank and RankMe per
  head, each metric's isotropic finite-sample null, and the mechanism lenses (probes/mechanism.py).
- `probe_lenses`: those rows and the attention rows (probes/attention.py: entropy and max logit per
  layer and head) in one pass over the probe set.
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

from .attention import AttentionStats, attention_sink
from .capture import (Key, adapter_for, base_rows, by_key, covariance_sink, feed, head_groups,
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
    attn_sink = attention_sink(adapter, attn) if attention else None

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

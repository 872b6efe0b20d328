"""Capture q/k/v at the model's taps and turn them into `probe` metric rows.

The model's `TapAdapter` (probes/adapters.py; Hugging Face families in probes/families.py), chosen
once per model by `adapter_for`, hands (B, T, H, D) activations to a sink; `covariance_sink` folds
them into per-head sufficient statistics (CovStats) on the model's device, so the only host transfer
is the final metric computation, once per checkpoint. probes/lenses.py adds its sinks to the same pass.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch

from ..config import DataError
from .adapters import Key, Sink, TapAdapter, rankprobe_adapter
from .moments import moment_sums
from .spectra import CovStats, HeadBatch, participation_ratio

__all__ = ["Key", "Sink", "adapter_for", "attach_taps", "feed", "covariance_sink", "probe_model", "stats_to_rows",
           "head_groups", "tap_shapes", "by_key", "base_rows"]
_ADAPTERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def adapter_for(model) -> TapAdapter:
    """The model's adapter, chosen once per model: RankProbe's Transformer (its identity taps), a
    Hugging Face causal LM (its family's row in probes/families.py), or `model` itself when it is an
    adapter already (a `ModuleAdapter` built from module-name patterns for any other nn.Module)."""
    if isinstance(model, TapAdapter):
        return model
    while hasattr(model, "_orig_mod") or type(model).__name__ == "DistributedDataParallel":
        model = getattr(model, "_orig_mod", None) or model.module  # torch.compile / DDP wrappers: the taps are inside
    if model not in _ADAPTERS:
        if hasattr(model, "tap_modules"):
            _ADAPTERS[model] = rankprobe_adapter(model)
        elif hasattr(getattr(model, "config", None), "model_type"):
            from .families import hf_adapter  # transformers is optional: imported only for its models

            _ADAPTERS[model] = hf_adapter(model)
        else:
            raise DataError(f"no tap adapter for {type(model).__name__}: wrap it in adapters.ModuleAdapter "
                            "with the module names of its projections (adapters.Patterns)")
    return _ADAPTERS[model]


def attach_taps(model, sink: Sink, taps=None) -> list:
    """Hooks that call `sink((tap, tensor, layer), x)` with x (B, T, H, D) at every tap of `model`
    (or only the keys in `taps`); returns the handles to remove."""
    return adapter_for(model).attach(sink, taps)


@torch.no_grad()
def feed(model, tokens: torch.Tensor, batch_size: int, sink: Sink, taps=None,
         progress: Callable[[int], None] | None = None) -> None:
    """Run `tokens` (N, T) through `model` (or an adapter) in eval mode with `sink` on the taps;
    restores the mode. `progress(n)` is called after each batch of n sequences."""
    adapter = adapter_for(model)
    module = adapter.model
    handles = adapter.attach(sink, taps)
    was_training = module.training
    module.eval()
    # The whole set to the device at once: a copy per batch from pageable memory would wait for the
    # previous batch's work, so the host could not queue the next batch while the GPU runs.
    tokens = tokens.to(next(module.parameters()).device)
    try:
        for i in range(0, tokens.size(0), batch_size):
            idx = tokens[i : i + batch_size]
            adapter.forward(idx)
            if progress is not None:
                progress(idx.size(0))
    finally:
        for h in handles:
            h.remove()
        module.train(was_training)


def covariance_sink(stats: dict[Key, CovStats],
                    select: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Sink:
    """A sink that accumulates each tap's activations into `stats[key]`, created on first sight;
    `select`, when given, maps a tap's (B, T, H, D) activations to the (N, H, D) vectors that count
    (the Monitor's padded batches: probes/padding.py).

    A tap that hands over the very tensor an earlier tap of the same forward did (unmodified) reuses
    its sums: with QK-Norm off, RankProbe's norm taps see the proj taps' tensors (an identity between
    them), 2 of the 7 taps of a layer."""
    recent: list[tuple[torch.Tensor, int, tuple]] = []  # (tensor, its version, (count, sums)), the last few

    def sink(key: Key, x: torch.Tensor) -> None:
        if key not in stats:
            stats[key] = CovStats(x.size(-2), x.size(-1), device=x.device)
        s = stats[key]
        found = next((got for t, version, got in recent if t is x and version == x._version), None)
        if found is None:
            vectors = (x.detach() if select is None else select(x.detach())).reshape(-1, *s.sum.shape)
            found = (vectors.size(0), *moment_sums(vectors))
            recent[:] = recent[-3:] + [(x, x._version, found)]  # q, k, v and one more: a layer's reuse distance
        s.add_sums(*found)
    return sink


def probe_model(model, tokens: torch.Tensor, batch_size: int, taps=None) -> list[dict]:
    """PR rows only: feed `tokens` (N, T) through `model` and return one row per (tap, tensor, layer).

    `taps` limits which (tap, tensor, layer) keys are captured (default: all the model has). Rows carry
    `tap`, `tensor`, `layer`, `pr`, `pr_heads`, `mean_norm`, `n`, `dim` (docs/metrics.md); the training
    loop uses `lenses.probe_lenses`, which adds the other spectra and attention to the same pass.
    """
    stats: dict[Key, CovStats] = {}
    feed(model, tokens, batch_size, covariance_sink(stats), taps)
    return stats_to_rows(stats)


def head_groups(stats: dict, keys: list) -> list[tuple[list[int], HeadBatch]]:
    """`keys` (in order) grouped by head width, each group's heads side by side in one HeadBatch:
    [(indices into keys, batch)]. Under GQA q and k differ in heads, not in width, so one group."""
    groups: dict[int, list[int]] = {}
    for i, k in enumerate(keys):
        groups.setdefault(stats[k].sum.size(-1), []).append(i)
    return [(idx, HeadBatch([stats[keys[i]] for i in idx])) for idx in groups.values()]


def stats_to_rows(stats: dict) -> list[dict]:
    """{(tap, tensor, layer): CovStats} -> metric rows, computed in float64, one device sync."""
    keys = sorted(stats, key=lambda k: (k[0], k[1], k[2]))
    if not keys:
        return []
    groups, shapes = head_groups(stats, keys), tap_shapes(stats, keys)
    found = torch.cat([torch.stack([participation_ratio(hb.cov), hb.moments[:, 0].norm(dim=-1)])
                       for _, hb in groups], 1).cpu()  # (2, all heads): the one transfer
    pr, norm = (by_key(shapes, groups, t) for t in found)
    return base_rows(keys, shapes, pr, norm)


def tap_shapes(stats: dict, keys: list) -> list[tuple[int, int, int]]:
    """(n, heads, dim) of each key's CovStats: what the rows need besides the metrics."""
    return [(stats[k].n, *stats[k].sum.shape) for k in keys]


def by_key(shapes: list[tuple[int, int, int]], groups: list, t: torch.Tensor) -> list[torch.Tensor]:
    """t (all heads, ...), the heads of `groups` one group after another, cut into one slice per key."""
    order = [i for idx, _ in groups for i in idx]
    out: list = [None] * len(shapes)
    for i, part in zip(order, t.split([shapes[i][1] for i in order])):
        out[i] = part
    return out


def base_rows(keys: list, shapes: list[tuple[int, int, int]], pr: list[torch.Tensor],
              norm: list[torch.Tensor]) -> list[dict]:
    """The rows of `stats_to_rows` from each key's (n, heads, dim) and per-head PR and mean norm (host tensors)."""
    rows = []
    for (tap, tensor, layer), (n, _, dim), p, m in zip(keys, shapes, pr, norm):
        p, m = p.tolist(), m.tolist()
        rows.append({
            "tap": tap, "tensor": tensor, "layer": layer,
            "pr": sum(p) / len(p), "pr_heads": p, "mean_norm": m, "n": n, "dim": dim,
        })
    return rows

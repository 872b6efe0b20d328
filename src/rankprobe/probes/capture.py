"""Capture q/k/v at the model's taps and turn them into `probe` metric rows.

Forward hooks on the identity taps (or, for Hugging Face models, on their attention modules:
probes/hf.py) hand (B, T, H, D) activations to a sink; `covariance_sink` folds them into per-head
sufficient statistics (CovStats) on the model's device, so the only host transfer is the final
metric computation, once per checkpoint. probes/lenses.py adds its sinks to the same pass.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .spectra import CovStats, participation_ratio

Key = tuple[str, str, int]  # (tap, tensor, layer), as in Transformer.tap_modules
Sink = Callable[[Key, torch.Tensor], None]  # receives (B, T, H, D) activations


def is_hf(model) -> bool:
    return not hasattr(model, "tap_modules")


def attach_taps(model, sink: Sink, taps=None) -> list:
    """Hooks that call `sink((tap, tensor, layer), x)` with x (B, T, H, D) at every tap of `model`
    (or only the keys in `taps`); returns the handles to remove."""
    if is_hf(model):
        from .hf import attach_hf_taps

        return attach_hf_taps(model, sink, taps)
    return [module.register_forward_hook(lambda _m, _i, out, key=key: sink(key, out))
            for key, module in model.tap_modules().items() if taps is None or key in taps]


@torch.no_grad()
def feed(model, tokens: torch.Tensor, batch_size: int, sink: Sink, taps=None) -> None:
    """Run `tokens` (N, T) through `model` in eval mode with `sink` on the taps; restores the mode."""
    handles = attach_taps(model, sink, taps)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for i in range(0, tokens.size(0), batch_size):
            idx = tokens[i : i + batch_size].to(device)
            if is_hf(model):
                model(input_ids=idx, use_cache=False)
            else:
                model(idx)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)


def covariance_sink(stats: dict[Key, CovStats]) -> Sink:
    """A sink that accumulates each tap's activations into `stats[key]`, created on first sight."""
    def sink(key: Key, x: torch.Tensor) -> None:
        if key not in stats:
            stats[key] = CovStats(x.size(-2), x.size(-1), device=x.device)
        stats[key].add(x)
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


def stats_to_rows(stats: dict) -> list[dict]:
    """{(tap, tensor, layer): CovStats} -> metric rows, computed in float64, one device sync."""
    keys = sorted(stats, key=lambda k: (k[0], k[1], k[2]))
    if not keys:
        return []
    sizes = [stats[k].sum.size(0) for k in keys]  # heads differ between q and k under GQA
    prs = torch.cat([participation_ratio(stats[k].covariance()) for k in keys]).cpu().split(sizes)
    norms = torch.cat([stats[k].mean_norm() for k in keys]).cpu().split(sizes)
    rows = []
    for key, pr, norm in zip(keys, prs, norms):
        tap, tensor, layer = key
        pr, norm = pr.tolist(), norm.tolist()
        rows.append({
            "tap": tap, "tensor": tensor, "layer": layer,
            "pr": sum(pr) / len(pr), "pr_heads": pr, "mean_norm": norm,
            "n": stats[key].n, "dim": stats[key].sum.size(-1),
        })
    return rows

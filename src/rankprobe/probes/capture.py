"""Capture q/k/v at the model's taps on the fixed probe set and turn them into `probe` metric rows.

Forward hooks on the identity taps feed per-head sufficient statistics (CovStats) on the model's
device; the only host transfer is the final PR computation, once per checkpoint.
"""

from __future__ import annotations

import torch

from .spectra import CovStats, participation_ratio


@torch.no_grad()
def probe_model(model, tokens: torch.Tensor, batch_size: int, taps=None) -> list[dict]:
    """Feed `tokens` (N, T) through `model` in eval mode and return one row per (tap, tensor, layer).

    `taps` limits which (tap, tensor, layer) keys are captured (default: all the model has). Rows carry
    `tap`, `tensor`, `layer`, `pr`, `pr_heads`, `mean_norm`, `n`, `dim` (docs/metrics.md).
    """
    modules = model.tap_modules()
    keys = [k for k in modules if taps is None or k in taps]
    stats: dict = {}
    handles = []

    def make_hook(key):
        def hook(_module, _inputs, out):  # out: (B, T, H, D)
            if key not in stats:
                stats[key] = CovStats(out.size(-2), out.size(-1), device=out.device)
            stats[key].add(out)
        return hook

    for key in keys:
        handles.append(modules[key].register_forward_hook(make_hook(key)))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for i in range(0, tokens.size(0), batch_size):
            model(tokens[i : i + batch_size].to(device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
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

"""Normalised SGD: Muon's momentum and step size without its orthogonalisation (the `normsgd` arm).

Muon changes SGD with momentum in two ways at once: every matrix's step has a fixed size, and its
direction is orthogonalised (all singular values set to 1). NormSGD keeps the first and drops the
second, so an arm of it separates the two: if keys keep their rank under Muon but collapse under
NormSGD, the orthogonalisation is what matters, not the step size.

The step size. Muon steps W <- W - adjusted_lr(lr, (m, n)) * O, where O = U V^T is the orthogonal
factor of the momentum update M = U S V^T of an (m, n) matrix. O's min(m, n) singular values are all
1, so

    ||O||_F = sqrt(min(m, n)),   RMS(O) = sqrt(min(m, n) / (m n)) = 1 / sqrt(max(m, n)).

NormSGD rescales M itself to that Frobenius norm and steps with the same adjusted lr:

    D = sqrt(min(m, n)) * M / ||M||_F,   W <- W - adjusted_lr(lr, (m, n)) * D,

so ||D||_F = ||O||_F: at one lr the two arms take steps of equal Frobenius norm and equal RMS per
element; only the direction differs (M's own singular values against all ones). Muon's quintic
Newton-Schulz leaves singular values in about [0.68, 1.2] rather than at 1 (muon.py), so Muon's real
step is within about that factor of NormSGD's; a test measures it. Momentum (EMA, optional Nesterov),
the per-shape lr adjustment and decoupled weight decay are Muon's own functions (`muon_update`,
`adjusted_lr`), so nothing else differs.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from rankprobe.optim.muon import MatrixOptimizer, adjusted_lr

EPS = 1e-7
"""floor on ||M||_F, as Muon's Newton-Schulz floors its normalisation (a zero update stays zero)"""


def orthogonal_norm_scale(M: Tensor, eps: float = EPS) -> Tensor:
    """M rescaled to the Frobenius norm of an orthogonal matrix of its shape: sqrt(min(m, n)) * M / ||M||_F.

    M is a matrix (m, n) or a batch (..., m, n); each matrix is scaled on its own.
    """
    if M.ndim < 2:
        raise ValueError(f"orthogonal_norm_scale needs a matrix or a batch of matrices; got shape {tuple(M.shape)}")
    norm = torch.linalg.vector_norm(M, dim=(-2, -1), keepdim=True).clamp(min=eps)
    return M * (math.sqrt(min(M.shape[-2:])) / norm)


class NormSGD(MatrixOptimizer):
    """Momentum SGD whose every matrix step is rescaled to Muon's size (module docstring); 2-D parameters only.

    Same arguments and state ('momentum_buffer') as `Muon`, without ns_steps.
    """

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True,
                 weight_decay: float = 0.0) -> None:
        if lr < 0 or weight_decay < 0 or not 0 <= momentum < 1:
            raise ValueError(f"NormSGD needs lr >= 0, weight_decay >= 0, 0 <= momentum < 1; got lr={lr}, "
                             f"weight_decay={weight_decay}, momentum={momentum}")
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay))

    def _step_params(self, params: list[Tensor], group: dict) -> None:
        """One step for a group: the arithmetic of `orthogonal_norm_scale`, in one foreach kernel per op."""
        updates = self._momentum_updates(params, group)
        lr, wd = group["lr"], group["weight_decay"]
        # Per matrix: -adjusted_lr * sqrt(min(m, n)) / max(||M||_F, eps), kept on the device (no sync).
        scales = torch._foreach_clamp_min(torch._foreach_norm(updates), EPS)
        torch._foreach_reciprocal_(scales)
        torch._foreach_mul_(scales, [-adjusted_lr(lr, p.shape) * math.sqrt(min(p.shape)) for p in params])
        # Out of place: without Nesterov the update is the momentum buffer itself.
        steps = torch._foreach_mul(updates, scales)
        if wd:
            torch._foreach_mul_(params, 1 - lr * wd)  # decoupled, with the unadjusted lr, as Muon
        torch._foreach_add_(params, steps)

"""Muon: momentum, then a Newton-Schulz orthogonalisation of each 2-D update; batched by shape.

The math lives in pure tensor functions (`newton_schulz`, `muon_update`, `adjusted_lr`); `Muon` is a
thin `torch.optim.Optimizer` around them. The arithmetic follows `torch.optim.Muon` (torch >= 2.9,
default "original" lr adjustment) step for step. The difference is speed: `Muon.step` stacks every
parameter of one shape into a (k, m, n) tensor and runs Newton-Schulz once per shape with batched
matmuls, instead of once per parameter. A shape held by one parameter gives bit-identical results
to torch.optim.Muon; a shared shape can differ by a bf16 rounding flip now and then (batched and
plain matmul kernels sum in different orders), at most a few bf16 ulps of the update.

Sources: Keller Jordan, "Muon: An optimizer for hidden layers in neural networks" (2024),
https://kellerjordan.github.io/posts/muon/ ; Liu et al., "Muon is Scalable for LLM Training"
(Moonlight), arXiv 2502.16982.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

# Quintic coefficients from Keller's post: chosen to maximise the slope at zero (a = 3.4445), so small
# singular values grow fast, at the price of not converging to exactly 1. The polynomial
# p(x) = a x + b x^3 + c x^5 maps [0.211, 1.2024] into [0.6818, 1.2024] (local max at x = 0.5545,
# local min at x = 1.0501), so a singular value that has once reached 0.211 stays in that band; after
# 5 steps nearly all sit in [0.68, 1.20] rather than at 1 (Keller: "S' ~ Uniform(0.5, 1.5)"), which
# he reports does not hurt training. Tiny singular values (square Gaussian matrices) lag behind.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_EPS = 1e-7


def fast_ns_dtype(device: str | torch.device) -> torch.dtype:
    """The dtype Newton-Schulz runs fastest in on `device`: bf16 where the hardware multiplies bf16.

    bf16 on CUDA (tensor cores) and on CPUs with bf16 dot-product instructions (AVX512-BF16 or AMX)
    that oneDNN is allowed to use; float32 on every other CPU, where bf16 matmuls are emulated:
    five iterations on a (4, 384, 128) stack took 1.60 s in bf16 against 0.039 s in fp32 on a
    2-core CPU without them (issue 13), 0.113 s against 0.0044 s on our AVX512-BF16 CPU with oneDNN
    held to AVX2 (ONEDNN_MAX_CPU_ISA=AVX2), and 0.0021 s against 0.0042 s with it unrestricted.
    The iteration is self-correcting, so either dtype gives an orthogonal factor of the same quality;
    the two differ by about a bf16 ulp per entry (tests/test_optim.py).
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16
    if device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported() and (
            torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()):
        return torch.bfloat16
    return torch.float32


def newton_schulz(G: Tensor, steps: int = 5, eps: float = NS_EPS, dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """Approximate the orthogonal factor U V^T of G = U S V^T, for a matrix (m, n) or a batch (..., m, n).

    Runs in `dtype`, bfloat16 by default like torch.optim.Muon and Keller's reference: the iteration is
    self-correcting, so bf16 rounding does not accumulate, and bf16 matmuls are the fast path on GPUs.
    float32 is for CPUs without bf16 matrix instructions (`fast_ns_dtype`). Returns a tensor of G's
    shape in `dtype`. Each matrix is divided by its own Frobenius norm first, which bounds its
    spectral norm by 1, inside the region where the iteration converges.
    """
    if G.ndim < 2:
        raise ValueError(f"newton_schulz needs a matrix or a batch of matrices; got shape {tuple(G.shape)}")
    X = G.to(dtype)
    # Iterate on the wide orientation so the Gram matrix X X^T is the smaller (min(m, n))^2 one.
    tall = G.size(-2) > G.size(-1)
    if tall:
        X = X.mT
    X = X.reshape(-1, *X.shape[-2:])  # (k, m, n), m <= n
    if X.size(0) == 1:
        X = _newton_schulz_matrix(X[0], steps, eps).unsqueeze(0)
    else:
        X = _newton_schulz_batch(X, steps, eps)
    if tall:
        X = X.mT
    return X.reshape(G.shape)


def _newton_schulz_matrix(X: Tensor, steps: int, eps: float) -> Tensor:
    """Quintic Newton-Schulz on one matrix (m, n), m <= n.

    The same ops as torch.optim.Muon (full norm, mm, addmm), so the two agree bit for bit; batched
    matmuls may round differently (see `_newton_schulz_batch`).
    """
    a, b, c = NS_COEFFICIENTS
    X = X / X.norm().clamp(min=eps)
    for _ in range(steps):
        A = X @ X.T  # (m, m)
        B = torch.addmm(A, A, A, beta=b, alpha=c)  # b A + c A^2
        X = torch.addmm(X, B, X, beta=a)  # a X + B X
    return X


def _newton_schulz_batch(X: Tensor, steps: int, eps: float) -> Tensor:
    """Quintic Newton-Schulz on a batch (k, m, n), m <= n: one batched matmul per op for all k.

    Mathematically the matrix version. The bmm kernels accumulate in fp32 like mm but not always in
    the same order, so now and then an fp32 value that sits on a bf16 rounding boundary rounds the
    other way; measured on CPU (torch 2.13): 0.5% of calls differ, by at most 1.5 bf16 ulps
    (0.012) in the output.
    """
    a, b, c = NS_COEFFICIENTS
    X = X / torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True).clamp(min=eps)
    for _ in range(steps):
        A = X @ X.mT  # (k, m, m)
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)
        X = torch.baddbmm(X, B, X, beta=a)
    return X


def muon_update(grad, buf, momentum: float, nesterov: bool):
    """Fold `grad` into the momentum buffer `buf` (in place) and return the update to orthogonalise.

    buf <- momentum * buf + (1 - momentum) * grad, an EMA as in torch.optim.Muon and Keller's
    current reference (the early post used buf = momentum * buf + grad; that only rescales the
    update, which Newton-Schulz normalises away). With Nesterov the update looks one step ahead:
    (1 - momentum) * grad + momentum * buf. Without it, the update is `buf` itself (not a copy).

    `grad` and `buf` are tensors, or equal-length sequences of tensors; sequences take one foreach
    kernel per operation instead of one kernel per tensor, with the same arithmetic (lerp).
    """
    if isinstance(grad, Tensor):
        buf.lerp_(grad, 1 - momentum)
        return grad.lerp(buf, momentum) if nesterov else buf
    grad, buf = list(grad), list(buf)
    torch._foreach_lerp_(buf, grad, 1 - momentum)
    return torch._foreach_lerp(grad, buf, momentum) if nesterov else buf


def adjusted_lr(lr: float, shape: Sequence[int]) -> float:
    """Per-matrix lr: lr * sqrt(max(1, rows / cols)), torch.optim.Muon's "original" adjustment.

    An orthogonal (rows, cols) update has RMS ~ 1/sqrt(max(rows, cols)); the factor keeps the
    update RMS of tall matrices (rows > cols) from shrinking with rows (Keller's reference).
    """
    rows, cols = shape[0], shape[1]
    return lr * math.sqrt(max(1, rows / cols))


def require_matrices(opt: torch.optim.Optimizer) -> None:
    """ValueError unless every parameter of `opt` is 2-D: a matrix update rule has nothing to say about
    embeddings' rows or gains (those go to AdamW)."""
    for group in opt.param_groups:
        for p in group["params"]:
            if p.ndim != 2:
                raise ValueError(f"{type(opt).__name__} only takes 2-D parameters; got one of shape {tuple(p.shape)}")


class MatrixOptimizer(torch.optim.Optimizer):
    """What Muon and NormSGD share: 2-D parameters only, Muon's momentum buffer, and a step that hands
    each bucket of parameters with gradients (`bucket`: one per group unless a subclass splits it) to
    `_step_params`."""

    def __init__(self, params, defaults: dict) -> None:
        super().__init__(params, defaults)
        require_matrices(self)

    def bucket(self, p: Tensor) -> tuple:
        return ()

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            buckets: dict[tuple, list[Tensor]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                buckets.setdefault(self.bucket(p), []).append(p)
            for params in buckets.values():
                self._step_params(params, group)
        return loss

    def _step_params(self, params: list[Tensor], group: dict) -> None:
        raise NotImplementedError

    def _momentum_updates(self, params: list[Tensor], group: dict) -> list[Tensor]:
        """`muon_update` of `params`' gradients into their momentum buffers (made at the first step)."""
        bufs = []
        for p in params:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
            bufs.append(state["momentum_buffer"])
        return muon_update([p.grad for p in params], bufs, group["momentum"], group["nesterov"])


class Muon(MatrixOptimizer):
    """Muon for 2-D parameters (hidden matrices); use AdamW for embeddings, head and gains.

    Same algorithm and state ('momentum_buffer') as torch.optim.Muon(lr, weight_decay, momentum,
    nesterov, ns_steps) with its default coefficients, eps and "original" lr adjustment; see the
    module docstring for how exactly the two agree. Parameters of one shape, dtype and device share
    one batched Newton-Schulz per step, run in `ns_dtype` (bf16 like torch.optim.Muon by default;
    `fast_ns_dtype` picks float32 on CPUs that emulate bf16).
    """

    def __init__(
        self,
        params,
        lr: float = 0.02,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        weight_decay: float = 0.0,
        ns_dtype: torch.dtype = torch.bfloat16,
    ) -> None:
        if lr < 0 or weight_decay < 0 or not 0 <= momentum < 1 or ns_steps < 1:
            raise ValueError(
                f"Muon needs lr >= 0, weight_decay >= 0, 0 <= momentum < 1, ns_steps >= 1; got "
                f"lr={lr}, weight_decay={weight_decay}, momentum={momentum}, ns_steps={ns_steps}"
            )
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
                        weight_decay=weight_decay)
        super().__init__(params, defaults)
        self.ns_dtype = ns_dtype

    def bucket(self, p: Tensor) -> tuple:
        return p.shape, p.dtype, p.device  # one batched Newton-Schulz per bucket

    def _step_params(self, params: list[Tensor], group: dict) -> None:
        """One step for parameters that share shape, dtype and device: one batched Newton-Schulz."""
        updates = self._momentum_updates(params, group)
        # Stack straight into the Newton-Schulz dtype (one cast-copy pass over the updates) instead of
        # an fp32 stack and then a cast: the same bf16 values, 8 fewer bytes moved per parameter. With
        # the add below: 10.09 -> 9.95 ms per step on the seed-22l matrices, bit-identical (BENCHMARKS.md, H200).
        stacked = torch.empty((len(params), *params[0].shape), dtype=self.ns_dtype, device=params[0].device)
        torch._foreach_copy_(list(stacked.unbind(0)), updates)
        ortho = newton_schulz(stacked, steps=group["ns_steps"], dtype=self.ns_dtype).unbind(0)  # k x (m, n)
        lr, wd = group["lr"], group["weight_decay"]
        if wd:
            # Decoupled weight decay with the unadjusted lr, as torch.optim.Muon and Moonlight
            # (arXiv 2502.16982, Sec. 2.2) do.
            torch._foreach_mul_(params, 1 - lr * wd)
        # fp32 param += bf16 update, as torch.optim.Muon's add_ does (bf16 -> fp32 is exact). Mixed
        # dtypes take foreach's per-tensor path; that still reads 8 bytes per parameter fewer than
        # casting the whole stack up to fp32 first for the same-dtype fast path.
        torch._foreach_add_(params, ortho, alpha=-adjusted_lr(lr, params[0].shape))

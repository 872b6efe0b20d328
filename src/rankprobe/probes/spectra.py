"""Spectral metrics as pure functions of covariance matrices or sufficient statistics, in float64.

The Participation Ratio of a covariance C with eigenvalues λ is PR = (Σλ)² / Σλ² = tr(C)² / ‖C‖_F²
(C is symmetric, so Σλ² = ‖C‖_F²): no eigendecomposition is needed, which makes it exact and cheap.
PR = D when variance is spread evenly over all D dimensions, PR = k for k equal directions, 1 for
a single direction. For N isotropic Gaussian samples in D dimensions the sample PR is biased low,
≈ D·N / (N + D) (Marchenko–Pastur), which is why every probe row records N.

Beside PR: the effective rank and stable rank of the same spectrum, RankMe of the uncentered one,
the spectral norm / stable rank / effective rank of weight matrices, and `isotropic_null`, the value
each metric takes on isotropic Gaussian data of the same N and D (docs/lenses.md).
"""

from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from .moments import moment_sums


class CovStats:
    """Sufficient statistics of vectors in H groups of width D: the count, the sum, the sum of outer
    products, and for the mechanism lenses (probes/mechanism.py) per-coordinate sums of cubes and
    fourth powers and the sum of the unit vectors x/‖x‖ of each group.

    Accumulated in float64 so that summing many batches loses nothing; `add` takes (..., H, D) and
    computes every sum from one float64 copy of the batch (`moment_sums`).
    Two CovStats of the same shape merge exactly by adding their fields (`sums()` lists them: what a
    DDP all-reduce does).
    """

    def __init__(self, H: int, D: int, device=None):
        self.n = 0
        self.sum = torch.zeros(H, D, dtype=torch.float64, device=device)
        self.outer = torch.zeros(H, D, D, dtype=torch.float64, device=device)
        self.pow3 = torch.zeros(H, D, dtype=torch.float64, device=device)
        self.pow4 = torch.zeros(H, D, dtype=torch.float64, device=device)
        self.unit_sum = torch.zeros(H, D, dtype=torch.float64, device=device)

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        H, D = self.sum.shape
        x = x.detach().reshape(-1, H, D)
        self.add_sums(x.size(0), *moment_sums(x))

    def add_sums(self, n: int, g: torch.Tensor, pow3: torch.Tensor, pow4: torch.Tensor) -> None:
        """Add the sums `moment_sums` returned for a batch of n vectors."""
        D = self.sum.size(-1)
        self.n += n
        self.outer += g[:, :D, :D]
        self.sum += g[:, :D, D]
        self.unit_sum += g[:, :D, D + 1]
        self.pow3 += pow3
        self.pow4 += pow4

    def sums(self) -> list[torch.Tensor]:
        """Every summed field (all but `n`): merging two CovStats adds these and the counts."""
        return [self.sum, self.outer, self.pow3, self.pow4, self.unit_sum]

    def covariance(self) -> torch.Tensor:
        """Centered covariance (H, D, D), normalised by N (the maximum-likelihood estimate)."""
        if self.n == 0:
            raise ValueError("no samples accumulated")
        mu = self.sum / self.n
        return self.outer / self.n - torch.einsum("hd,he->hde", mu, mu)

    def moments(self) -> torch.Tensor:
        """(H, 5, D): per coordinate the raw moments E[x], E[x²], E[x³], E[x⁴], and E[x/‖x‖]."""
        if self.n == 0:
            raise ValueError("no samples accumulated")
        return torch.stack([self.sum, self.outer.diagonal(dim1=-2, dim2=-1), self.pow3, self.pow4,
                            self.unit_sum], 1) / self.n

    def mean_norm(self) -> torch.Tensor:
        return (self.sum / self.n).norm(dim=-1)


class HeadBatch:
    """The heads of several CovStats of one width D side by side, K = ΣH heads: per head the count
    `n` (K,), the covariance `cov` and uncentered second moment `second` (K, D, D), and `moments`
    (K, 5, D) as `CovStats.moments` gives them. A few batched ops for all the taps of a pass, where one
    call per CovStats launched ~8 small kernels per tap (154 taps at seed-22l)."""

    def __init__(self, stats: list[CovStats]):
        if any(st.n == 0 for st in stats):
            raise ValueError("no samples accumulated")
        dev = stats[0].sum.device
        heads = [st.sum.size(0) for st in stats]
        counts = torch.tensor([float(st.n) for st, h in zip(stats, heads) for _ in range(h)], dtype=torch.float64)
        self.n = counts.to(dev, non_blocking=True)
        total, outer = torch.cat([st.sum for st in stats]), torch.cat([st.outer for st in stats])
        self.second = outer / self.n[:, None, None]
        mu = total / self.n[:, None]
        self.cov = self.second - mu[:, :, None] * mu[:, None, :]
        raw = [total, outer.diagonal(dim1=-2, dim2=-1)] + [torch.cat([getattr(st, f) for st in stats])
                                                          for f in ("pow3", "pow4", "unit_sum")]
        self.moments = torch.stack(raw, 1) / self.n[:, None, None]


def participation_ratio(cov: torch.Tensor) -> torch.Tensor:
    """PR of each covariance in a batch (..., D, D) -> (...), in float64."""
    cov = cov.to(torch.float64)
    tr = cov.diagonal(dim1=-2, dim2=-1).sum(-1)
    fro2 = (cov * cov).sum((-2, -1))
    return tr * tr / fro2


def isotropic_pr(n: int, d: int) -> float:
    """The PR that n isotropic Gaussian vectors in d dimensions give after centering: the finite-sample ceiling.

    With m = n - 1 degrees of freedom the scatter matrix is Wishart W_d(I, m), for which
    E[tr W]² + Var[tr W] = m²d² + 2md and E[tr W²] = md(m + d + 1); their ratio is
    (md + 2) / (m + d + 1) ≈ d·n / (n + d). PR concentrates, so this is its value to O(1/n).
    """
    m = n - 1
    return (m * d + 2) / (m + d + 1)


# ---------------------------------------------------------------------------------------------
# Effective ranks of a spectrum. For activations the spectrum is the variance distribution
# p = λ / Σλ (λ: eigenvalues of the centered covariance), and three classic effective ranks are
# its Rényi entropies exponentiated: stable rank = exp H_∞ = 1 / max p, PR = exp H_2 = 1 / Σp²,
# effective rank = exp H_1 = exp(-Σ p log p). Hence stable_rank ≤ PR ≤ erank ≤ D, all three equal k
# for k equal directions. RankMe (Garrido et al., 2023) is Roy & Vetterli's definition on the
# singular values of the *uncentered* embedding matrix: p = σ / Σσ with σ² the eigenvalues of Σxxᵀ.


def entropy_rank(values: torch.Tensor) -> torch.Tensor:
    """exp of the Shannon entropy of `values` (..., K) normalised to sum 1 -> (...); 0·log 0 = 0.

    Roy & Vetterli (2007) effective rank when `values` are singular values. Negative entries (round-off
    in an eigendecomposition of a PSD matrix) count as 0. In float64.
    """
    v = values.to(torch.float64).clamp_min(0)
    p = v / v.sum(-1, keepdim=True)
    return torch.exp(-torch.special.xlogy(p, p).sum(-1))


HOST_EIG_MAX_DIM = 128  # symmetric matrices up to this size are decomposed on the CPU


def host_threads() -> int:
    """Threads for small CPU eigendecompositions: half the cores this process may use, at most 8 (a
    sweep runs one process per GPU on the same host)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(8, cores // 2))


def to_host(t: torch.Tensor, wait: bool = True) -> torch.Tensor:
    """`t` on the CPU. From CUDA through pinned memory: the 121 MB of a seed-22l checkpoint's tap
    covariances took 84 ms as a plain (pageable) copy on an H200. With `wait=False` the copy is only
    queued on the current stream: record a CUDA event after it and synchronize that before reading."""
    if t.device.type != "cuda":
        return t.cpu()
    return torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=not wait)


@functools.cache
def _pool(threads: int) -> ThreadPoolExecutor:
    """Threads for `eigvalsh_host`'s slices, each running torch on one intra-op thread (a setting of
    the calling thread, which also becomes the default of threads started later): otherwise every
    LAPACK call starts a team of all the cores, and 8 slices of 88 768×768 matrices took 3.4 s
    instead of 0.73 s on a 16-core host (BENCHMARKS.md)."""
    return ThreadPoolExecutor(threads, thread_name_prefix="rankprobe-eig", initializer=torch.set_num_threads,
                              initargs=(1,))


def eigvalsh_host(mats: torch.Tensor, threads: int | None = None) -> torch.Tensor:
    """Eigenvalues (..., D), ascending, of symmetric (..., D, D), in float64, returned on the CPU.

    Matrices up to HOST_EIG_MAX_DIM wide, and any matrices already on the CPU, are decomposed by LAPACK
    on the CPU, the batch split into one slice per thread (default `host_threads()`): torch decomposes a
    CPU batch one matrix after another on one core, and cuSOLVER decomposes a batch of 64×64 float64
    matrices one by one at ~0.25 ms each with a host sync per call. Larger ones on a GPU (weight Gram
    matrices, 768 wide at seed-22l) stay there, in one call; `lenses.weight_lenses_start` instead copies
    them to the host and decomposes them here, off the training loop's thread.
    """
    a = mats.detach().to(torch.float64)
    big = a.size(-1) > HOST_EIG_MAX_DIM
    if big and a.device.type != "cpu":
        return torch.linalg.eigvalsh(a).cpu()
    a = to_host(a)
    flat = a.reshape(-1, *a.shape[-2:])
    # slices of at least 16 small matrices; a large one (~50 ms at D = 768) is worth a thread by itself
    threads = min(threads or host_threads(), flat.size(0) // (1 if big else 16))
    if threads <= 1:
        return torch.linalg.eigvalsh(a)
    parts = _pool(threads).map(torch.linalg.eigvalsh, flat.tensor_split(threads))
    return torch.cat(list(parts)).reshape(a.shape[:-1])


def covariance_spectrum(cov: torch.Tensor) -> torch.Tensor:
    """Eigenvalues (..., D) of symmetric PSD (..., D, D) in float64, on the CPU, ascending; those below
    D·eps·λ_max (round-off, the tolerance of numpy's matrix_rank) are set to 0. Without that, RankMe's
    square root would lift round-off of order 1e-16·λ_max to 1e-8 and count it as directions."""
    cov = cov.detach().to(torch.float64)
    # A head whose activations overflowed (a diverging run) gets NaN eigenvalues, not an exception:
    # its metrics become NaN (null in metrics.jsonl) and the other heads are still measured.
    ok = torch.isfinite(cov).all(-1).all(-1)
    eye = torch.eye(cov.size(-1), dtype=cov.dtype, device=cov.device)
    lam = eigvalsh_host(torch.where(ok[..., None, None], cov, eye))
    ok = ok.cpu()
    tol = lam[..., -1:].clamp_min(0) * lam.size(-1) * torch.finfo(torch.float64).eps
    lam = torch.where(lam > tol, lam, torch.zeros_like(lam))
    return torch.where(ok[..., None], lam, torch.full_like(lam, float("nan")))


def effective_rank(cov: torch.Tensor) -> torch.Tensor:
    """exp H(λ/Σλ) of each covariance (..., D, D) -> (...): Rényi-1 partner of the PR (≥ PR)."""
    return entropy_rank(covariance_spectrum(cov))


def stable_rank(cov: torch.Tensor) -> torch.Tensor:
    """tr(C) / λ_max of each covariance -> (...): ‖X_c‖_F² / ‖X_c‖₂² of the centered data (≤ PR)."""
    lam = covariance_spectrum(cov)
    return lam.sum(-1) / lam[..., -1]


def rankme(second_moment: torch.Tensor) -> torch.Tensor:
    """RankMe of each uncentered second moment M = E[xxᵀ] (..., D, D) -> (...).

    The singular values of the N×D embedding matrix Z are sqrt(N·eig(M)), and RankMe = exp H(σ/Σσ)
    is scale free, so sqrt(eig M) suffices (Garrido et al., 2023, eq. 1, without their ε = 1e-7).
    """
    return entropy_rank(covariance_spectrum(second_moment).sqrt())


def matrix_metrics(w: torch.Tensor) -> dict[str, torch.Tensor]:
    """Spectral norm σ₁, stable rank Σσ²/σ₁² and effective rank exp H(σ/Σσ) of (..., m, n) -> (...).

    σ² are the eigenvalues of the smaller Gram matrix WWᵀ or WᵀW in float64 (formed on the weights'
    device by `gram`, decomposed by `gram_metrics`; results on the CPU). For weights the effective rank
    is Roy & Vetterli's, on σ; the stable rank is on σ² as for activations (both are the textbook forms).
    """
    return gram_metrics(gram(w), max(w.shape[-2:]))


def gram(w: torch.Tensor) -> torch.Tensor:
    """The smaller Gram matrix of (..., m, n): WWᵀ (m ≤ n) or WᵀW, in float64, on w's device."""
    w = w.detach().to(torch.float64)
    return w @ w.mT if w.size(-2) <= w.size(-1) else w.mT @ w


def gram_metrics(g: torch.Tensor, long_side: int) -> dict[str, torch.Tensor]:
    """`matrix_metrics` from Gram matrices (..., k, k) of matrices whose longer side is `long_side`;
    eigenvalues below long_side·eps·σ₁² are round-off and count as 0."""
    return gram_spectrum_metrics(gram_spectrum(g, long_side))


def gram_spectrum(g: torch.Tensor, long_side: int) -> torch.Tensor:
    """σ² (..., k), ascending, on the CPU: the eigenvalues of Gram matrices (..., k, k), those below
    long_side·eps·σ₁² set to 0."""
    lam = eigvalsh_host(g)
    return torch.where(lam > lam[..., -1:] * long_side * torch.finfo(torch.float64).eps, lam, 0)


def gram_spectrum_metrics(lam: torch.Tensor) -> dict[str, torch.Tensor]:
    """spectral_norm, stable_rank and erank from σ² (..., k) as `gram_spectrum` returns them."""
    top = lam[..., -1]
    return {"spectral_norm": top.sqrt(), "stable_rank": lam.sum(-1) / top, "erank": entropy_rank(lam.sqrt())}


def head_spectra(stats: CovStats) -> dict[str, torch.Tensor]:
    """Per-head pr, erank, stable_rank, rankme (H,) of one CovStats, in float64 on the CPU."""
    return spectra_of(stats.covariance(), stats.outer / stats.n)


def spectra_of(cov: torch.Tensor, second_moment: torch.Tensor) -> dict[str, torch.Tensor]:
    """pr, erank, stable_rank (of the centered covariances) and rankme (of the uncentered second
    moments), each (...,) for (..., D, D) inputs, in float64 on the CPU; every eigendecomposition in
    one `eigvalsh_host` call."""
    lam = covariance_spectrum(torch.stack([cov, second_moment]))
    return spectra_from(cov, lam[0], lam[1])


def spectra_from(cov: torch.Tensor, lam: torch.Tensor, lam_m: torch.Tensor) -> dict[str, torch.Tensor]:
    """`spectra_of` from the covariances (..., D, D) and the eigenvalues (..., D) of the covariances
    (`lam`) and of the second moments (`lam_m`), as `covariance_spectrum` returns them."""
    return {
        "pr": participation_ratio(cov).cpu(),
        "erank": entropy_rank(lam),
        "stable_rank": lam.sum(-1) / lam[..., -1],
        "rankme": entropy_rank(lam_m.sqrt()),
    }


# ---------------------------------------------------------------------------------------------
# Finite-sample nulls: the value each metric takes for N isotropic Gaussian vectors in D dimensions.

NULL_METRICS = ("pr", "erank", "stable_rank", "rankme")


def _wishart_spectra(m: int, d: int, reps: int, rng: np.random.Generator) -> np.ndarray:
    """Eigenvalues (reps, d) of W_d(I, m) scatter matrices, by Bartlett's decomposition W = AAᵀ."""
    if m < d:  # singular: sample the data itself (cheap, since there are fewer than d rows)
        x = rng.standard_normal((reps, m, d))
        return np.linalg.svd(x, compute_uv=False) ** 2
    a = np.tril(rng.standard_normal((reps, d, d)), -1)
    idx = np.arange(d)
    a[:, idx, idx] = np.sqrt(rng.chisquare(m - idx, size=(reps, d)))  # df m, m-1, ..., m-d+1
    return np.linalg.svd(a, compute_uv=False) ** 2


@functools.lru_cache(maxsize=256)
def isotropic_null(metric: str, n: int, d: int, reps: int = 32, seed: int = 0) -> float:
    """Expected `metric` for n isotropic Gaussian samples in d dimensions: the finite-sample ceiling.

    'pr' is the closed form `isotropic_pr`. 'erank' and 'stable_rank' (centered: Wishart with n-1
    degrees of freedom) and 'rankme' (uncentered, zero-mean data: n degrees of freedom) are the mean
    over `reps` seeded Monte-Carlo draws of the Wishart spectrum, O(reps·d³) whatever n is, and cached
    per (metric, n, d, reps, seed). The metrics concentrate: at n = 8192, d = 64 one draw's relative sd
    is ≤ 3e-4 for pr, erank and rankme and 6e-3 for stable_rank (it hangs on the largest eigenvalue).
    """
    if metric not in NULL_METRICS:
        raise ValueError(f"unknown metric {metric!r}; expected one of {', '.join(NULL_METRICS)}")
    if metric == "pr":
        return isotropic_pr(n, d)
    rng = np.random.default_rng([seed, n, d])
    lam = _wishart_spectra(n if metric == "rankme" else n - 1, d, reps, rng)
    if metric == "stable_rank":
        values = lam.sum(-1) / lam.max(-1)
    else:
        w = np.sqrt(lam) if metric == "rankme" else lam
        p = w / w.sum(-1, keepdims=True)
        values = np.exp(-(p * np.log(np.where(p > 0, p, 1))).sum(-1))
    return float(values.mean())

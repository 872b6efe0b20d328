"""Mechanism lenses: why keys collapse. Pure functions in float64 of the CovStats sums and weight Grams.

Three explanations of key-rank collapse, one family of lenses each (docs/lenses.md, section 6):

- **Axis alignment** (a coordinate-wise optimizer such as AdamW lines keys up with coordinate axes):
  `axis_alignment` compares the covariance's diagonal with its spectrum (Schur–Horn: the diagonal's
  PR is never below the eigenvalues' PR) and measures how close its eigenvectors lie to coordinate
  axes; `coordinate_kurtosis` finds heavy-tailed (outlier) coordinates. Each has the value a
  Haar-random rotation of the same spectrum gives (`haar_axis_null`, `kurtosis_null`).
- **The hypersphere** (QK-Norm puts keys on a sphere, where they may huddle in a cap):
  `resultant_length` of the unit-normalised vectors, and the PR of the uncentered second moment
  beside the centered one.
- **Orthogonality** (Muon's orthogonalised updates): `orthogonality` of a weight matrix or update
  from its Gram eigenvalues (distance of the Gram from the best multiple of the identity, condition
  number), `gram_orth_dev` the same distance without an eigendecomposition, `gaussian_orth_null` its
  value for a Gaussian matrix of the same shape.

`mechanism_of` gathers the activation lenses of a batch of heads for `lenses.spectral_rows`.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

from .spectra import _pool, host_threads, participation_ratio, to_host

# per-head activation lenses, in row order; each is recorded as `<key>_heads` and a layer value
MECHANISM_KEYS = ("diag_pr", "axis_ratio", "axis_ratio_null", "top_axis", "axis_overlap",
                  "kurtosis", "kurtosis_max", "sphere_r", "pr_uncentered")
LAYER_MAX_KEYS = ("kurtosis_max",)  # layer value = max over heads; every other key: mean over heads

# a coordinate whose variance is below this share of its raw second moment (|mean| > ~1000 sd) gets no
# kurtosis: the raw-to-central conversion would cancel more than 1e-3 of the fourth central moment
KURTOSIS_MIN_VAR_SHARE = 1e-6


# ---------------------------------------------------------------------------------------------
# eigenvectors of the tap covariances


def covariance_eigh(cov: torch.Tensor, threads: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (..., D), ascending, and eigenvectors (..., D, D) (columns) of symmetric PSD
    (..., D, D), in float64 on the CPU: `spectra.covariance_spectrum` with the vectors. Eigenvalues
    below D·eps·λ_max count as 0; a non-finite matrix gives NaN values and vectors. The batch is split
    over the host threads of `spectra.eigvalsh_host` (one intra-op thread each)."""
    a = to_host(cov.detach().to(torch.float64))
    ok = torch.isfinite(a).all(-1).all(-1)
    eye = torch.eye(a.size(-1), dtype=a.dtype)
    a = torch.where(ok[..., None, None], a, eye)
    flat = a.reshape(-1, *a.shape[-2:])
    # Always on the pool's threads, one intra-op thread each, even for one slice: a batched eigh on
    # the calling thread's 2 intra-op threads took 3.9 s instead of 0.1 s for 112 64×64 matrices on
    # a busy 2-core host.
    threads = max(1, min(threads or host_threads(), flat.size(0) // 16))
    parts = list(_pool(threads).map(torch.linalg.eigh, flat.tensor_split(threads)))
    lam = torch.cat([p[0] for p in parts]).reshape(a.shape[:-1])
    vec = torch.cat([p[1] for p in parts]).reshape(a.shape)
    tol = lam[..., -1:].clamp_min(0) * lam.size(-1) * torch.finfo(torch.float64).eps
    lam = torch.where(lam > tol, lam, torch.zeros_like(lam))
    nan = torch.tensor(float("nan"), dtype=torch.float64)
    return torch.where(ok[..., None], lam, nan), torch.where(ok[..., None, None], vec, nan)


# ---------------------------------------------------------------------------------------------
# axis alignment


def axis_alignment(cov: torch.Tensor, lam: torch.Tensor, vec: torch.Tensor) -> dict[str, torch.Tensor]:
    """Axis lenses of covariances C (..., D, D) with eigenvalues `lam` (..., D) and eigenvectors `vec`
    (columns, ascending order, as `covariance_eigh` returns them) -> each (...):

    - diag_pr: PR of the diagonal variances, (Σ C_ii)² / Σ C_ii² ≥ PR (Schur–Horn: the diagonal is
      majorised by the spectrum and Σx² is Schur-convex);
    - axis_ratio = PR / diag_pr = Σ C_ii² / ‖C‖_F², the share of C's squared Frobenius mass on its
      diagonal, in [PR/D, 1]: 1 when C is diagonal (its eigenvectors are coordinate axes);
    - axis_ratio_null = (PR + 2) / (D + 2): its exact expectation over Haar-random rotations QCQᵀ;
    - top_axis = max_i v_i² of the top eigenvector v (1 on an axis, 1/D spread evenly);
    - axis_overlap = Σ_k p_k max_i v_ki², p = λ/Σλ: the same for every eigenvector, weighted by its
      share of the variance. Both have the Haar null `haar_axis_null(D)`.
    """
    cov = cov.to(torch.float64)
    d = cov.size(-1)
    diag = cov.diagonal(dim1=-2, dim2=-1)
    pr = participation_ratio(cov)
    diag2 = (diag * diag).sum(-1)
    mass = vec * vec  # (..., D, D): squared component i of eigenvector k at [..., i, k]
    p = lam / lam.sum(-1, keepdim=True)
    return {
        "diag_pr": diag.sum(-1) ** 2 / diag2,
        "axis_ratio": diag2 / (cov * cov).sum((-2, -1)),
        "axis_ratio_null": (pr + 2) / (d + 2),
        "top_axis": mass[..., -1].amax(-1),
        "axis_overlap": (p * mass.amax(-2)).sum(-1),
    }


@functools.lru_cache(maxsize=64)
def haar_axis_null(d: int, reps: int = 20000, seed: int = 0) -> float:
    """E[max_i u_i²] for u uniform on the unit sphere in d dimensions: the value `top_axis` and
    `axis_overlap` take, in expectation, for a covariance of any spectrum rotated by a Haar-random
    rotation (every eigenvector of QCQᵀ is then uniform on the sphere, so the weights p_k do not
    matter). Seeded Monte-Carlo mean over `reps` draws (standard error ≈ 2e-4 at d = 64), cached."""
    g = np.random.default_rng([seed, d]).standard_normal((reps, d)) ** 2
    return float((g.max(-1) / g.sum(-1)).mean())


def coordinate_kurtosis(moments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, max) over coordinates of the Pearson kurtosis E[(x−μ)⁴]/E[(x−μ)²]² of each coordinate,
    from raw moments (..., ≥4, D) = E[x], E[x²], E[x³], E[x⁴] -> each (...). 3 for a Gaussian
    coordinate, 1.8 uniform, 6 Laplace; a heavy-tailed outlier coordinate gives tens or more.
    Coordinates with (nearly) no variance (`KURTOSIS_MIN_VAR_SHARE`) are left out; NaN if all are."""
    m1, m2, m3, m4 = moments.to(torch.float64).unbind(-2)[:4]
    c2 = m2 - m1 * m1
    c4 = m4 - 4 * m1 * m3 + 6 * m1 * m1 * m2 - 3 * m1**4
    ok = c2 > KURTOSIS_MIN_VAR_SHARE * m2
    kurt = torch.where(ok, c4 / torch.where(ok, c2, 1) ** 2, torch.nan)
    top = torch.where(ok, kurt, -math.inf).amax(-1)
    return kurt.nanmean(-1), torch.where(ok.any(-1), top, torch.nan)


def kurtosis_null(n: int) -> float:
    """E[b₂] = 3(n−1)/(n+1): the expected sample kurtosis m₄/m₂² of n independent Gaussian values."""
    return 3 * (n - 1) / (n + 1)


@functools.lru_cache(maxsize=256)
def kurtosis_max_null(n: int, d: int) -> float:
    """The expected max over d independent Gaussian coordinates of the sample kurtosis of n values, in
    the normal approximation: E[b₂] + sd(b₂)·E[max of d standard normals], with the exact Gaussian
    Var(b₂) = 24n(n−2)(n−3) / ((n+1)²(n+3)(n+5)) (D'Agostino & Pearson, 1973)."""
    var = 24 * n * (n - 2) * (n - 3) / ((n + 1) ** 2 * (n + 3) * (n + 5))
    return kurtosis_null(n) + math.sqrt(max(var, 0.0)) * expected_max_normal(d)


@functools.lru_cache(maxsize=64)
def expected_max_normal(d: int) -> float:
    """E[max of d iid N(0, 1)] = ∫ x · dφ(x)Φ(x)^(d−1) dx, by the trapezoid rule on [−12, 12]."""
    x = np.linspace(-12.0, 12.0, 24001)
    cdf = 0.5 * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))
    pdf = np.exp(-x * x / 2) / math.sqrt(2 * math.pi)
    return float(np.trapezoid(x * d * pdf * cdf ** (d - 1), x))


# ---------------------------------------------------------------------------------------------
# the hypersphere


def resultant_length(moments: torch.Tensor) -> torch.Tensor:
    """‖E[x/‖x‖]‖ from moments (..., 5, D) (row 4: the mean unit vector) -> (...): the mean resultant
    length of the directions, 0 for directions spread evenly, 1 when every vector points the same way.
    For n independent isotropic directions E[R²] = 1/n exactly, hence the null `sphere_null`."""
    return moments[..., 4, :].to(torch.float64).norm(dim=-1)


def sphere_null(n: int) -> float:
    """sqrt(E[R²]) = 1/√n for n independent directions drawn uniformly (any symmetric distribution)."""
    return 1 / math.sqrt(n)


def mechanism_of(cov: torch.Tensor, second_moment: torch.Tensor, moments: torch.Tensor, lam: torch.Tensor,
                 vec: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every per-head activation lens of MECHANISM_KEYS, each (...,) for covariances and uncentered
    second moments (..., D, D), moments (..., 5, D) (`CovStats.moments`), and the covariances'
    eigenvalues and eigenvectors (`covariance_eigh`). All inputs on one device; float64."""
    kurt, kurt_max = coordinate_kurtosis(moments)
    return axis_alignment(cov, lam, vec) | {
        "kurtosis": kurt, "kurtosis_max": kurt_max, "sphere_r": resultant_length(moments),
        "pr_uncentered": participation_ratio(second_moment),
    }


# ---------------------------------------------------------------------------------------------
# orthogonality of weights and updates


def orthogonality(lam: torch.Tensor) -> dict[str, torch.Tensor]:
    """From the eigenvalues λ = σ² (..., k) of the smaller Gram matrix G of (..., m, n) matrices
    (k = min(m, n)) -> each (...):

    - orth_dev = ‖G/c − I‖_F / √k with c = tr(G)/k, the multiple of I nearest G: the relative
      distance of G from cI, = sd(σ²)/mean(σ²) = sqrt(k/PR(σ²) − 1). 0 for a (semi-)orthogonal
      matrix of any scale; √(k−1) for rank one;
    - cond = σ_max/σ_min (∞ when σ_min counts as 0: written as null).
    """
    lam = lam.to(torch.float64)
    mean = lam.mean(-1, keepdim=True)
    return {"orth_dev": (lam / mean - 1).pow(2).mean(-1).sqrt(), "cond": (lam[..., -1] / lam[..., 0]).sqrt()}


def gram_orth_dev(g: torch.Tensor) -> torch.Tensor:
    """`orthogonality(...)["orth_dev"]` straight from Gram matrices (..., k, k), on their device and
    without an eigendecomposition: ‖G − cI‖_F / (c√k), c = tr(G)/k."""
    g = g.to(torch.float64)
    k = g.size(-1)
    c = g.diagonal(dim1=-2, dim2=-1).mean(-1)
    eye = torch.eye(k, dtype=g.dtype, device=g.device)
    return (g - c[..., None, None] * eye).norm(dim=(-2, -1)) / (c * math.sqrt(k))


def gaussian_orth_null(m: int, n: int) -> float:
    """orth_dev of an m×n matrix of iid Gaussian entries: with k = min(m, n), p = max(m, n) its Gram is
    Wishart W_k(I, p), whose PR(σ²) is (kp + 2)/(k + p + 1) (`spectra.isotropic_pr` with p + 1), so
    sqrt(k/PR − 1) = sqrt((k + 2)(k − 1) / (kp + 2)) ≈ sqrt(k/p). A ratio of expectations, within ~1%
    of the mean over Gaussian draws at the probe's shapes (tests/test_mechanism.py)."""
    k, p = min(m, n), max(m, n)
    return math.sqrt((k + 2) * (k - 1) / (k * p + 2))

"""Spectral metrics as pure functions of covariance matrices or sufficient statistics, in float64.

The Participation Ratio of a covariance C with eigenvalues λ is PR = (Σλ)² / Σλ² = tr(C)² / ‖C‖_F²
(C is symmetric, so Σλ² = ‖C‖_F²): no eigendecomposition is needed, which makes it exact and cheap.
PR = D when variance is spread evenly over all D dimensions, PR = k for k equal directions, 1 for
a single direction. For N isotropic Gaussian samples in D dimensions the sample PR is biased low,
≈ D·N / (N + D) (Marchenko–Pastur), which is why every probe row records N.
"""

from __future__ import annotations

import torch


class CovStats:
    """Sufficient statistics (count, sum, sum of outer products) of vectors in H groups of width D.

    Accumulated in float64 so that summing many batches loses nothing; `add` takes (..., H, D).
    Two CovStats of the same shape merge exactly by adding their fields (what a DDP all-reduce does).
    """

    def __init__(self, H: int, D: int, device=None):
        self.n = 0
        self.sum = torch.zeros(H, D, dtype=torch.float64, device=device)
        self.outer = torch.zeros(H, D, D, dtype=torch.float64, device=device)

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        H, D = self.sum.shape
        x = x.detach().reshape(-1, H, D).to(torch.float64)  # (N, H, D)
        self.n += x.size(0)
        self.sum += x.sum(0)
        self.outer += torch.einsum("nhd,nhe->hde", x, x)

    def covariance(self) -> torch.Tensor:
        """Centered covariance (H, D, D), normalised by N (the maximum-likelihood estimate)."""
        if self.n == 0:
            raise ValueError("no samples accumulated")
        mu = self.sum / self.n
        return self.outer / self.n - torch.einsum("hd,he->hde", mu, mu)

    def mean_norm(self) -> torch.Tensor:
        return (self.sum / self.n).norm(dim=-1)


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

"""Known-answer tests for the spectral metrics, against an independent float64 eigendecomposition."""

import numpy as np
import pytest
import torch

from rankprobe.probes.spectra import CovStats, isotropic_pr, participation_ratio


def pr_eig(x: np.ndarray) -> float:
    """Reference: PR from the eigenvalues of numpy's centered, 1/N-normalised covariance."""
    lam = np.linalg.eigvalsh(np.cov(x, rowvar=False, bias=True))
    return lam.sum() ** 2 / (lam**2).sum()


def stats_of(x: np.ndarray, chunks: int = 3) -> CovStats:
    s = CovStats(1, x.shape[1])
    for part in np.array_split(x, chunks):
        s.add(torch.from_numpy(part)[:, None, :])
    return s


def random_rotation(d: int, rng) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    return q * np.sign(np.diag(r))


@pytest.mark.parametrize("n,d", [(4096, 64), (512, 64), (2000, 16)])
def test_isotropic_matches_finite_sample_ceiling(n, d):
    rng = np.random.default_rng(n + d)
    x = rng.standard_normal((n, d))
    pr = participation_ratio(stats_of(x).covariance())[0].item()
    assert pr == pytest.approx(pr_eig(x), rel=1e-10)
    assert pr == pytest.approx(isotropic_pr(n, d), rel=0.03)
    assert pr < d  # finite samples never reach the ceiling


@pytest.mark.parametrize("k", [1, 2, 7, 32])
def test_rank_k_equal_variances_gives_k(k):
    rng = np.random.default_rng(k)
    d, n = 64, 4096
    basis = random_rotation(d, rng)[:, :k]  # k orthonormal directions
    # +-1 coefficients: exactly equal variance 1 along each direction after centering
    coef = rng.choice([-1.0, 1.0], size=(n, k))
    coef -= coef.mean(0)
    coef /= coef.std(0)
    coef = np.linalg.qr(coef)[0] * np.sqrt(n)  # exactly orthogonal columns: equal eigenvalues
    x = coef @ basis.T + 5.0  # an offset, removed by centering
    pr = participation_ratio(stats_of(x).covariance())[0].item()
    assert pr == pytest.approx(k, rel=1e-9)
    assert pr == pytest.approx(pr_eig(x), rel=1e-9)


def test_rotation_invariance_and_scale_invariance():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3000, 32)) * np.linspace(0.1, 3.0, 32)  # anisotropic
    pr = participation_ratio(stats_of(x).covariance())[0].item()
    rotated = x @ random_rotation(32, rng).T
    assert participation_ratio(stats_of(rotated).covariance())[0].item() == pytest.approx(pr, rel=1e-9)
    assert participation_ratio(stats_of(7.5 * x).covariance())[0].item() == pytest.approx(pr, rel=1e-9)
    assert pr == pytest.approx(pr_eig(x), rel=1e-10)
    assert 1 < pr < 32


def test_streaming_statistics_equal_direct_covariance_per_head():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 500, 3, 8)) @ rng.standard_normal((8, 8)) + rng.standard_normal(8)
    s = CovStats(3, 8)
    s.add(torch.from_numpy(x[0]))
    s.add(torch.from_numpy(x[1]))
    flat = x.reshape(-1, 3, 8)
    assert s.n == 1000
    for h in range(3):
        ref = np.cov(flat[:, h], rowvar=False, bias=True)
        np.testing.assert_allclose(s.covariance()[h].numpy(), ref, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(s.mean_norm()[h].item(), np.linalg.norm(flat[:, h].mean(0)), rtol=1e-12)


def test_merging_statistics_is_exact():
    """Adding fields of two CovStats (what a DDP all-reduce does) equals accumulating all samples."""
    rng = np.random.default_rng(2)
    x = torch.from_numpy(rng.standard_normal((900, 2, 16)))
    whole, a, b = CovStats(2, 16), CovStats(2, 16), CovStats(2, 16)
    whole.add(x)
    a.add(x[:400])
    b.add(x[400:])
    a.n, a.sum, a.outer = a.n + b.n, a.sum + b.sum, a.outer + b.outer
    torch.testing.assert_close(participation_ratio(a.covariance()), participation_ratio(whole.covariance()),
                               rtol=1e-12, atol=0)


def test_low_precision_input_is_accumulated_in_float64():
    x = torch.randn(1000, 1, 64, dtype=torch.bfloat16)
    s = CovStats(1, 64)
    s.add(x)
    assert s.outer.dtype == torch.float64
    assert participation_ratio(s.covariance()).item() == pytest.approx(pr_eig(x[:, 0].double().numpy()), rel=1e-10)


def test_eigvalsh_host_matches_numpy_for_batches_of_any_shape():
    from rankprobe.probes.spectra import eigvalsh_host

    g = np.random.default_rng(5)
    x = g.standard_normal((3, 20, 40, 16))
    mats = np.einsum("abnd,abne->abde", x, x)  # (3, 20, 16, 16) PSD
    got = eigvalsh_host(torch.from_numpy(mats))
    assert got.shape == (3, 20, 16) and got.dtype == torch.float64 and got.device.type == "cpu"
    np.testing.assert_allclose(got.numpy(), np.linalg.eigvalsh(mats), rtol=1e-10, atol=1e-10)
    threaded = eigvalsh_host(torch.from_numpy(mats), threads=3)  # 60 matrices in 3 slices on threads
    np.testing.assert_array_equal(threaded.numpy(), got.numpy())
    one = eigvalsh_host(torch.from_numpy(mats[0, 0]))
    np.testing.assert_allclose(one.numpy(), np.linalg.eigvalsh(mats[0, 0]), rtol=1e-10, atol=1e-10)


def test_eigvalsh_host_slices_large_cpu_matrices_over_one_thread_each():
    """Matrices wider than HOST_EIG_MAX_DIM already on the CPU are sliced over threads too, each LAPACK
    call on one intra-op thread, while the calling thread keeps its own count."""
    from rankprobe.probes.spectra import HOST_EIG_MAX_DIM, eigvalsh_host

    d = HOST_EIG_MAX_DIM + 2
    x = np.random.default_rng(6).standard_normal((5, d, d))
    mats = x @ x.transpose(0, 2, 1)
    from rankprobe.probes.spectra import _pool

    before = torch.get_num_threads()
    threaded = eigvalsh_host(torch.from_numpy(mats), threads=3)
    assert torch.get_num_threads() == before  # the caller's threads are its own
    assert {f.result() for f in [_pool(3).submit(torch.get_num_threads) for _ in range(6)]} == {1}
    np.testing.assert_allclose(threaded.numpy(), np.linalg.eigvalsh(mats), rtol=1e-9, atol=1e-9)
    serial = eigvalsh_host(torch.from_numpy(mats), threads=1)  # LAPACK's own threads: other rounding
    np.testing.assert_allclose(threaded.numpy(), serial.numpy(), rtol=1e-12, atol=1e-9)

"""Known answers for the mechanism lenses (probes/mechanism.py): axis alignment, coordinate kurtosis, the
hypersphere and orthogonality, each against an independent float64 numpy computation, on axis-aligned
and randomly rotated synthetic data, and their nulls against Monte-Carlo draws."""

import math

import numpy as np
import pytest
import torch

from rankprobe.config import ModelConfig
from rankprobe.model import Transformer
from rankprobe.probes.lenses import (Snapshot, probe_lenses, spectral_rows, update_rms, weight_lenses,
                                     weight_snapshot)
from rankprobe.probes.mechanism import (
    MECHANISM_KEYS, axis_alignment, covariance_eigh, expected_max_normal, gaussian_orth_null, gram_orth_dev,
    haar_axis_null, kurtosis_max_null, kurtosis_null, orthogonality, sphere_null)
from rankprobe.probes.spectra import CovStats, gram, isotropic_pr


def random_rotation(d: int, rng) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    return q * np.sign(np.diag(r))


def axis_of(cov: np.ndarray) -> dict[str, float]:
    c = torch.from_numpy(cov)[None]
    lam, vec = covariance_eigh(c)
    return {k: v.item() for k, v in axis_alignment(c, lam, vec).items()}


def axis_reference(cov: np.ndarray) -> dict[str, float]:
    """numpy: the diagonal, eigh, and the definitions written out."""
    d = cov.shape[0]
    lam, vec = np.linalg.eigh(cov)
    pr = lam.sum() ** 2 / (lam**2).sum()
    diag = np.diag(cov)
    p = lam / lam.sum()
    return {"diag_pr": diag.sum() ** 2 / (diag**2).sum(), "axis_ratio": (diag**2).sum() / (cov**2).sum(),
            "axis_ratio_null": (pr + 2) / (d + 2), "top_axis": (vec[:, -1] ** 2).max(),
            "axis_overlap": (p * (vec**2).max(0)).sum(), "pr": pr}


# ---------------------------------------------------------------------------------------------
# axis alignment


def test_axis_aligned_covariance_scores_one_and_a_rotation_does_not():
    rng = np.random.default_rng(0)
    lam = np.geomspace(0.01, 5.0, 16)
    aligned = axis_of(np.diag(lam))
    pr = lam.sum() ** 2 / (lam**2).sum()
    assert aligned["axis_ratio"] == pytest.approx(1.0, rel=1e-12)
    assert aligned["diag_pr"] == pytest.approx(pr, rel=1e-12)  # Schur–Horn with equality
    assert aligned["top_axis"] == pytest.approx(1.0, rel=1e-12)
    assert aligned["axis_overlap"] == pytest.approx(1.0, rel=1e-12)
    q = random_rotation(16, rng)
    cov = q @ np.diag(lam) @ q.T
    got, ref = axis_of(cov), axis_reference(cov)
    for key in ("diag_pr", "axis_ratio", "axis_ratio_null", "top_axis", "axis_overlap"):
        assert got[key] == pytest.approx(ref[key], rel=1e-9), key
    assert got["axis_ratio"] < 0.7 and got["top_axis"] < 0.6 and got["diag_pr"] > pr


def test_hadamard_rotation_flattens_the_diagonal():
    """A Hadamard rotation spreads every eigenvector evenly over the axes: equal variances on the
    diagonal, so diag_pr = D, axis_ratio = PR/D (its lower bound) and every max_i v_i² = 1/D."""
    h = np.array([[1.0]])
    for _ in range(4):
        h = np.block([[h, h], [h, -h]])
    h /= 4.0  # orthogonal 16×16
    lam = np.geomspace(0.1, 3.0, 16)
    got = axis_of(h @ np.diag(lam) @ h.T)
    pr = lam.sum() ** 2 / (lam**2).sum()
    assert got["diag_pr"] == pytest.approx(16, rel=1e-10)
    assert got["axis_ratio"] == pytest.approx(pr / 16, rel=1e-10)
    assert got["top_axis"] == pytest.approx(1 / 16, rel=1e-8)
    assert got["axis_overlap"] == pytest.approx(1 / 16, rel=1e-8)


def test_schur_horn_diagonal_pr_is_never_below_the_pr():
    rng = np.random.default_rng(1)
    for _ in range(50):
        d = int(rng.integers(2, 20))
        a = rng.standard_normal((d, int(rng.integers(1, 2 * d)))) * rng.exponential(size=(d, 1))
        got = axis_of(a @ a.T)
        assert got["diag_pr"] >= axis_reference(a @ a.T)["pr"] * (1 - 1e-12)
        assert got["axis_ratio"] <= 1 + 1e-12


def test_haar_nulls_match_random_rotations_of_a_fixed_spectrum():
    """axis_ratio's null (PR + 2)/(D + 2) is its exact mean over Haar rotations; top_axis and
    axis_overlap average to haar_axis_null(D) whatever the spectrum."""
    rng = np.random.default_rng(2)
    d, reps = 12, 600
    lam = np.r_[10.0, 4.0, np.linspace(0.1, 1.0, d - 2)]
    qs = [random_rotation(d, rng) for _ in range(reps)]
    covs = torch.from_numpy(np.stack([q @ np.diag(lam) @ q.T for q in qs]))
    ev, vec = covariance_eigh(covs)
    got = {k: v.numpy() for k, v in axis_alignment(covs, ev, vec).items()}
    pr = lam.sum() ** 2 / (lam**2).sum()
    se = got["axis_ratio"].std() / math.sqrt(reps)
    assert abs(got["axis_ratio"].mean() - (pr + 2) / (d + 2)) < 4 * se
    np.testing.assert_allclose(got["axis_ratio_null"], (pr + 2) / (d + 2), rtol=1e-10)
    null = haar_axis_null(d)
    for key in ("top_axis", "axis_overlap"):
        assert abs(got[key].mean() - null) < 4 * got[key].std() / math.sqrt(reps) + 1e-3, key
    # the Monte-Carlo null itself against the exact value for d = 2: E[max(cos², sin²)] = 1/2 + 1/π
    assert haar_axis_null(2) == pytest.approx(0.5 + 1 / math.pi, abs=2e-3)


# ---------------------------------------------------------------------------------------------
# the tap rows, from CovStats, against numpy on the raw data


def rows_of(x: np.ndarray) -> dict:
    """The probe row of (N, H, D) data fed to CovStats in three batches."""
    s = CovStats(x.shape[1], x.shape[2])
    for part in np.array_split(x, 3):
        s.add(torch.from_numpy(part))
    return spectral_rows({("proj", "k", 0): s})[0]


def head_reference(x: np.ndarray) -> dict[str, float]:
    """numpy, float64, straight from the samples of one head (N, D)."""
    n = len(x)
    c = x - x.mean(0)
    kurt = (c**4).mean(0) / (c**2).mean(0) ** 2
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    m2 = x.T @ x / n
    ref = axis_reference(np.cov(x, rowvar=False, bias=True))
    return ref | {"kurtosis": kurt.mean(), "kurtosis_max": kurt.max(), "sphere_r": np.linalg.norm(u.mean(0)),
                  "pr_uncentered": np.trace(m2) ** 2 / (m2**2).sum()}


def outlier_data(n: int, d: int, rng) -> np.ndarray:
    """Gaussian coordinates of unequal variance plus one heavy-tailed outlier coordinate (rare spikes of
    ±12, kurtosis ≈ 37) and an offset: the kind of key an axis-aligned mechanism would make."""
    x = rng.standard_normal((n, d)) * np.geomspace(0.2, 1.0, d)
    x[:, 0] = rng.standard_normal(n) + 12.0 * rng.choice([-1.0, 0.0, 1.0], size=n, p=[0.005, 0.99, 0.005])
    return x + rng.standard_normal(d) * 3


def test_tap_rows_match_numpy_on_axis_aligned_and_rotated_data():
    rng = np.random.default_rng(3)
    n, d = 6000, 16
    aligned = outlier_data(n, d, rng)
    rotated = aligned @ random_rotation(d, rng).T
    x = np.stack([aligned, rotated], 1)  # (N, 2 heads, D)
    row = rows_of(x)
    for h in range(2):
        ref = head_reference(x[:, h])
        for key in MECHANISM_KEYS:
            assert row[f"{key}_heads"][h] == pytest.approx(ref[key], rel=1e-8), (key, h)
    for key in MECHANISM_KEYS:
        layer = max(row[f"{key}_heads"]) if key == "kurtosis_max" else np.mean(row[f"{key}_heads"])
        assert row[key] == pytest.approx(layer, rel=1e-12), key
    # the outlier coordinate: kurtosis ≈ 37 on its axis, spread over every coordinate by the rotation
    assert row["kurtosis_max_heads"][0] > 30 and row["kurtosis_max_heads"][1] < 0.6 * row["kurtosis_max_heads"][0]
    assert row["top_axis_heads"][0] > 0.99 and row["top_axis_heads"][1] < 0.5
    assert row["axis_ratio_heads"][0] > 0.99 > 0.8 > row["axis_ratio_heads"][1]
    assert row["top_axis_null"] == haar_axis_null(d)
    assert row["kurtosis_null"] == kurtosis_null(n) and row["kurtosis_max_null"] == kurtosis_max_null(n, d)
    assert row["sphere_r_null"] == sphere_null(n) and row["pr_uncentered_null"] == isotropic_pr(n + 1, d)


def test_known_kurtoses_and_constant_coordinates():
    rng = np.random.default_rng(4)
    n = 200_000
    x = np.stack([rng.uniform(-1, 1, n), rng.standard_normal(n), rng.laplace(size=n)], 1)
    x = np.concatenate([x, np.full((n, 1), 7.0)], 1)  # a constant coordinate has no kurtosis: left out
    c = x[:, :3] - x[:, :3].mean(0)
    ref = (c**4).mean(0) / (c**2).mean(0) ** 2
    np.testing.assert_allclose(ref, [1.8, 3.0, 6.0], rtol=0.05)
    # raw moments lose ~1e-16·(mean/sd)⁴ to cancellation: the uniform coordinate's mean/sd is 17 and 87
    for offset, rel in ((10.0, 1e-9), (50.0, 1e-6)):
        row = rows_of(x[:, None, :] + offset)
        assert row["kurtosis_heads"][0] == pytest.approx(ref.mean(), rel=rel)
        assert row["kurtosis_max_heads"][0] == pytest.approx(ref.max(), rel=rel)
    const = rows_of(np.full((100, 1, 4), 2.5))
    assert math.isnan(const["kurtosis_heads"][0]) and math.isnan(const["kurtosis_max"])


def test_kurtosis_nulls_against_gaussian_draws():
    rng = np.random.default_rng(5)
    n, d, reps = 200, 8, 3000
    x = rng.standard_normal((reps, n, d))
    c = x - x.mean(1, keepdims=True)
    b2 = (c**4).mean(1) / (c**2).mean(1) ** 2  # (reps, d)
    assert b2.mean() == pytest.approx(kurtosis_null(n), abs=4 * b2.std() / math.sqrt(b2.size))
    assert b2.max(1).mean() == pytest.approx(kurtosis_max_null(n, d), rel=0.03)
    assert expected_max_normal(1) == pytest.approx(0.0, abs=1e-12)
    assert expected_max_normal(2) == pytest.approx(1 / math.sqrt(math.pi), rel=1e-9)
    assert expected_max_normal(64) == pytest.approx(rng.standard_normal((20000, 64)).max(1).mean(), abs=0.01)


# ---------------------------------------------------------------------------------------------
# the hypersphere


def test_resultant_length_known_answers_and_null():
    rng = np.random.default_rng(6)
    direction = rng.standard_normal(8)
    same = np.outer(rng.uniform(0.5, 3.0, 500), direction)  # every vector points the same way
    assert rows_of(same[:, None, :])["sphere_r"] == pytest.approx(1.0, rel=1e-12)
    opposite = np.concatenate([same, -same])  # a cap and its antipode cancel
    assert rows_of(opposite[:, None, :])["sphere_r"] == pytest.approx(0.0, abs=1e-12)
    with_zero = np.concatenate([same, np.zeros((500, 8))])  # a zero vector adds no direction
    assert rows_of(with_zero[:, None, :])["sphere_r"] == pytest.approx(0.5, rel=1e-12)
    n, reps = 60, 400  # 400 independent sets of n isotropic vectors, as 400 heads of one CovStats
    r2 = np.square(rows_of(rng.standard_normal((n, reps, 8)) * rng.exponential(size=(n, reps, 1)))["sphere_r_heads"])
    assert r2.mean() == pytest.approx(sphere_null(n) ** 2, abs=4 * r2.std() / math.sqrt(reps))


def test_uncentered_pr_sees_the_shared_mean():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((4000, 16))
    x -= x.mean(0)
    row = rows_of(x[:, None, :])
    assert row["pr_uncentered"] == pytest.approx(row["pr"], rel=1e-9)  # no mean: the same matrix
    shifted = rows_of((x + 5.0 * rng.standard_normal(16))[:, None, :])
    assert shifted["pr"] == pytest.approx(row["pr"], rel=1e-9) and shifted["pr_uncentered"] < 2.0
    nulls = rows_of(rng.standard_normal((300, 100, 16)))["pr_uncentered_heads"]  # 100 independent draws
    assert np.mean(nulls) == pytest.approx(isotropic_pr(301, 16), rel=5e-3)


def test_merging_mechanism_sums_is_exact():
    """Adding every field of `sums()` of two CovStats (what the DDP all-reduce does) equals
    accumulating all the samples in one."""
    x = torch.from_numpy(np.random.default_rng(8).standard_normal((900, 2, 16)) + 1.0)
    whole, a, b = CovStats(2, 16), CovStats(2, 16), CovStats(2, 16)
    whole.add(x)
    a.add(x[:400])
    b.add(x[400:])
    a.n += b.n
    for t, u in zip(a.sums(), b.sums()):
        t += u
    torch.testing.assert_close(a.moments(), whole.moments(), rtol=1e-12, atol=1e-14)
    assert len(a.sums()) == 5


# ---------------------------------------------------------------------------------------------
# orthogonality


def orth_reference(w: np.ndarray) -> tuple[float, float]:
    s2 = np.linalg.svd(w, compute_uv=False) ** 2
    return float(np.sqrt(((s2 / s2.mean() - 1) ** 2).mean())), float(np.sqrt(s2.max() / s2.min()))


def orth_of(w: np.ndarray) -> tuple[float, float, float]:
    from rankprobe.probes.spectra import gram_spectrum

    t = torch.from_numpy(w)
    got = orthogonality(gram_spectrum(gram(t), max(w.shape)))
    return got["orth_dev"].item(), got["cond"].item(), gram_orth_dev(gram(t)).item()


def test_orthogonality_known_answers():
    rng = np.random.default_rng(9)
    for w in (random_rotation(12, rng), 3.0 * random_rotation(20, rng)[:8]):  # orthogonal, semi-orthogonal
        dev, cond, fro = orth_of(w)
        assert dev == pytest.approx(0.0, abs=1e-7) and fro == pytest.approx(0.0, abs=1e-7)
        assert cond == pytest.approx(1.0, rel=1e-9)
    dev, cond, fro = orth_of(np.outer(rng.standard_normal(6), rng.standard_normal(9)))  # rank one
    assert dev == pytest.approx(math.sqrt(5), rel=1e-9) and fro == pytest.approx(math.sqrt(5), rel=1e-9)
    assert math.isinf(cond)
    w = random_rotation(10, rng) @ np.diag(np.geomspace(0.1, 2.0, 10)) @ random_rotation(10, rng)
    dev, cond, fro = orth_of(w)
    ref_dev, ref_cond = orth_reference(w)
    assert dev == pytest.approx(ref_dev, rel=1e-9) and fro == pytest.approx(ref_dev, rel=1e-9)
    assert cond == pytest.approx(ref_cond, rel=1e-8) and ref_cond == pytest.approx(20.0, rel=1e-9)


@pytest.mark.parametrize("shape", [(16, 48), (64, 768), (40, 40)])
def test_gaussian_orth_null_against_draws(shape):
    rng = np.random.default_rng(10)
    w = rng.standard_normal((40, *sorted(shape)))
    s2 = np.linalg.eigvalsh(w @ w.transpose(0, 2, 1))  # σ² of 40 Gaussian draws
    draws = np.sqrt(((s2 / s2.mean(-1, keepdims=True) - 1) ** 2).mean(-1))
    assert draws.mean() == pytest.approx(gaussian_orth_null(*shape), rel=0.02)
    assert gaussian_orth_null(*shape) == gaussian_orth_null(*shape[::-1])


def tiny(**kw) -> Transformer:
    torch.manual_seed(0)
    base = dict(n_layer=2, d_model=64, n_head=4, head_dim=16, seq_len=16, vocab_size=97)
    return Transformer(ModelConfig(**{**base, **kw}))


def test_weight_and_update_rows_match_numpy():
    model = tiny(n_kv_head=2)
    rows = {(r["layer"], r["matrix"]): r for r in weight_lenses(model)}
    wk = model.blocks[1].attn.wk.weight.detach().double().numpy()  # (Hkv·D, d) = (32, 64)
    row = rows[(1, "k")]
    assert (row["orth_dev"], row["cond"]) == pytest.approx(orth_reference(wk), rel=1e-8)
    assert (row["orth_dev_heads"][1], row["cond_heads"][1]) == pytest.approx(orth_reference(wk[16:]), rel=1e-8)
    assert row["orth_dev_null"] == gaussian_orth_null(32, 64)
    assert row["orth_dev_heads_null"] == gaussian_orth_null(16, 64)
    wo = model.blocks[0].attn.wo.weight.detach().double().numpy()  # head 2 = columns 32..47
    assert rows[(0, "o")]["orth_dev_heads"][2] == pytest.approx(orth_reference(wo[:, 32:48])[0], rel=1e-8)

    # an update whose every head block is orthogonal (what Muon's step is) against a Gaussian one
    before = weight_snapshot(model)
    rng = np.random.default_rng(11)
    orth = np.concatenate([random_rotation(64, rng)[:16] for _ in range(4)])  # (H·D, d), orthonormal head rows
    gauss = rng.standard_normal((64, 64))
    with torch.no_grad():
        model.blocks[0].attn.wq.weight.add_(torch.from_numpy(1e-3 * orth).float())
        model.blocks[1].attn.wq.weight.add_(torch.from_numpy(1e-3 * gauss).float())
    after = weight_snapshot(model)
    ups = {(r["layer"], r["matrix"]): r for r in update_rms(before, after)}
    for layer in (0, 1):
        dw = (after[(layer, "q")].double() - before[(layer, "q")].double()).numpy()
        up = ups[(layer, "q")]
        assert up["orth_dev"] == pytest.approx(orth_reference(dw)[0], rel=1e-8)
        for h in range(4):
            dev, cond = orth_reference(dw[16 * h : 16 * (h + 1)])
            assert up["orth_dev_heads"][h] == pytest.approx(dev, rel=1e-8)
            assert up["cond_heads"][h] == pytest.approx(cond, rel=1e-8)
    assert max(ups[(0, "q")]["orth_dev_heads"]) < 1e-3 < 0.3 < min(ups[(1, "q")]["orth_dev_heads"])
    assert math.isnan(ups[(1, "k")]["orth_dev"])  # no update: nothing to measure, written as null
    plain = update_rms(dict(before), dict(after))  # plain dicts: no head split, the whole-matrix keys only
    assert all("orth_dev_heads" not in r for r in plain)
    assert [r["update_rms"] for r in plain] == [ups[(r["layer"], r["matrix"])]["update_rms"] for r in plain]


def test_probe_rows_carry_every_mechanism_key():
    model = tiny(n_kv_head=2, qk_norm=True)
    rows, _ = probe_lenses(model, torch.randint(0, 97, (6, 16)), batch_size=4, attention=False)
    assert len(rows) == 14
    for row in rows:
        heads = len(row["pr_heads"])
        for key in MECHANISM_KEYS:
            assert len(row[f"{key}_heads"]) == heads and isinstance(row[key], float), key
        assert all(row["diag_pr_heads"][h] >= row["pr_heads"][h] * (1 - 1e-12) for h in range(heads))
        for key in ("top_axis_null", "kurtosis_null", "kurtosis_max_null", "sphere_r_null", "pr_uncentered_null"):
            assert isinstance(row[key], float), key



@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_mechanism_lenses_on_cuda_match_the_cpu():
    """On CUDA the sums accumulate on the device and reach the host through pinned memory; the
    update's Gram matrices are formed there too."""
    model = tiny(n_kv_head=2, qk_norm=True)
    tokens = torch.randint(0, 97, (6, 16))
    want, _ = probe_lenses(model, tokens, batch_size=4, attention=False)
    got, _ = probe_lenses(model.cuda(), tokens, batch_size=4, attention=False)
    for one, two in zip(want, got):
        for key in MECHANISM_KEYS:
            np.testing.assert_allclose(two[f"{key}_heads"], one[f"{key}_heads"], rtol=1e-4, err_msg=key)
    before = weight_snapshot(model)
    with torch.no_grad():
        model.blocks[0].attn.wq.weight.add_(1e-3 * torch.randn_like(model.blocks[0].attn.wq.weight))
    after = weight_snapshot(model)
    on_cpu = []
    for snap in (before, after):
        copy = Snapshot({k: v.cpu() for k, v in snap.items()})
        copy.heads = snap.heads
        on_cpu.append(copy)
    for one, two in zip(update_rms(*on_cpu), update_rms(before, after)):
        assert two["orth_dev"] == pytest.approx(one["orth_dev"], rel=1e-9, nan_ok=True)
        np.testing.assert_allclose(two["cond_heads"], one["cond_heads"], rtol=1e-9)

"""Known answers for the new lenses: effective / stable rank and RankMe against numpy, their isotropic
nulls, weight spectra, the extra probe-row keys, and attention entropy and max logit by hand."""

import math

import numpy as np
import pytest
import torch

from rankprobe.config import ModelConfig
from rankprobe.model import Transformer
from rankprobe.probes.capture import probe_model
from rankprobe.probes.attention import AttentionStats, attention_lenses
from rankprobe.probes.lenses import probe_lenses, update_rms, weight_lenses, weight_lenses_start, weight_snapshot
from rankprobe.probes.spectra import (
    CovStats, NULL_METRICS, effective_rank, head_spectra, isotropic_null, isotropic_pr, matrix_metrics, rankme,
    stable_rank)


def stats_of(x: np.ndarray) -> CovStats:
    s = CovStats(1, x.shape[1])
    for part in np.array_split(x, 3):
        s.add(torch.from_numpy(part)[:, None, :])
    return s


def metrics_of(x: np.ndarray) -> dict[str, float]:
    return {m: v.item() for m, v in head_spectra(stats_of(x)).items()}


def reference(x: np.ndarray) -> dict[str, float]:
    """Independent float64 answers: eigvalsh of numpy's covariance, SVDs of the data matrices."""
    lam = np.clip(np.linalg.eigvalsh(np.cov(x, rowvar=False, bias=True)), 0, None)
    p = lam / lam.sum()
    s_c = np.linalg.svd(x - x.mean(0), compute_uv=False)  # centered data: stable rank
    s = np.linalg.svd(x, compute_uv=False)  # uncentered embedding matrix: RankMe
    q = s / s.sum()
    return {"pr": 1 / (p**2).sum(), "erank": math.exp(-(p[p > 0] * np.log(p[p > 0])).sum()),
            "stable_rank": (s_c**2).sum() / s_c[0] ** 2, "rankme": math.exp(-(q[q > 0] * np.log(q[q > 0])).sum())}


def random_rotation(d: int, rng) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    return q * np.sign(np.diag(r))


def equal_directions(n: int, d: int, k: int, rng) -> np.ndarray:
    """n zero-mean samples with k exactly equal, orthogonal variance directions in d dimensions."""
    coef = rng.standard_normal((n, k))
    coef -= coef.mean(0)
    coef = np.linalg.qr(coef)[0] * math.sqrt(n)  # orthonormal columns, still orthogonal to the ones vector
    return coef @ random_rotation(d, rng)[:, :k].T


@pytest.mark.parametrize("k", [1, 3, 16])
def test_k_equal_directions_give_k_for_every_metric(k):
    x = equal_directions(2048, 32, k, np.random.default_rng(k))
    got = metrics_of(x)
    for m in NULL_METRICS:
        assert got[m] == pytest.approx(k, rel=1e-8), m
    ref = reference(x)
    for m in NULL_METRICS:
        assert got[m] == pytest.approx(ref[m], rel=1e-8), m


def test_anisotropic_matches_numpy_and_renyi_order():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3000, 24)) * np.geomspace(0.05, 4.0, 24) + rng.standard_normal(24)
    got, ref = metrics_of(x), reference(x)
    for m in NULL_METRICS:
        assert got[m] == pytest.approx(ref[m], rel=1e-9), m
    # exp H_inf <= exp H_2 <= exp H_1 of one distribution; all strictly between 1 and D here
    assert 1 < got["stable_rank"] < got["pr"] < got["erank"] < 24
    # the offset is one strong uncentered direction RankMe sees and the centered metrics do not
    assert metrics_of(x - x.mean(0))["rankme"] > got["rankme"]


def test_rotation_and_scale_invariance():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2000, 16)) * np.linspace(0.2, 2.0, 16)
    base = metrics_of(x)
    for y in (x @ random_rotation(16, rng).T, 3.7 * x):
        for m, v in metrics_of(y).items():
            assert v == pytest.approx(base[m], rel=1e-9), m


def test_pure_functions_on_batched_covariances():
    rng = np.random.default_rng(2)
    a = torch.from_numpy(rng.standard_normal((3, 8, 8)))
    cov = a @ a.transpose(1, 2)
    lam = np.linalg.eigvalsh(cov.numpy())
    p = lam / lam.sum(-1, keepdims=True)
    np.testing.assert_allclose(effective_rank(cov).numpy(), np.exp(-(p * np.log(p)).sum(-1)), rtol=1e-10)
    np.testing.assert_allclose(stable_rank(cov).numpy(), lam.sum(-1) / lam.max(-1), rtol=1e-10)
    q = np.sqrt(lam) / np.sqrt(lam).sum(-1, keepdims=True)
    np.testing.assert_allclose(rankme(cov).numpy(), np.exp(-(q * np.log(q)).sum(-1)), rtol=1e-10)


def test_isotropic_data_sits_at_its_null():
    n, d = 4096, 32
    x = np.random.default_rng(3).standard_normal((n, d))
    got = metrics_of(x)
    tol = {"pr": 0.01, "erank": 0.01, "stable_rank": 0.05, "rankme": 0.01}
    for m in NULL_METRICS:
        null = isotropic_null(m, n, d)
        assert null < d
        assert got[m] == pytest.approx(null, rel=tol[m]), m


def test_monte_carlo_null_against_closed_form_and_direct_sampling():
    from rankprobe.probes import spectra

    # the Wishart sampler reproduces the closed-form PR null
    lam = spectra._wishart_spectra(799, 16, 400, np.random.default_rng(0))
    pr = (lam.sum(-1) ** 2 / (lam**2).sum(-1)).mean()
    assert pr == pytest.approx(isotropic_pr(800, 16), rel=2e-3)
    # and the Monte-Carlo nulls match sampling the data itself (both for n < d and n > d)
    rng = np.random.default_rng(4)
    for n, d in ((300, 16), (12, 20)):
        draws = [metrics_of(rng.standard_normal((n, d))) for _ in range(40)]
        for m in ("erank", "stable_rank", "rankme"):
            vals = np.array([dr[m] for dr in draws])
            null = isotropic_null(m, n, d, reps=200)
            assert abs(vals.mean() - null) < 4 * vals.std() / math.sqrt(len(vals)) + 1e-3 * null, (m, n, d)
    assert isotropic_null("pr", 100, 8) == isotropic_pr(100, 8)
    with pytest.raises(ValueError, match="unknown metric"):
        isotropic_null("rank", 100, 8)


def test_matrix_metrics_known_answers():
    rng = np.random.default_rng(5)
    orth = torch.from_numpy(random_rotation(12, rng))
    got = matrix_metrics(orth)
    assert got["spectral_norm"].item() == pytest.approx(1.0, rel=1e-12)
    assert got["stable_rank"].item() == pytest.approx(12, rel=1e-12)
    assert got["erank"].item() == pytest.approx(12, rel=1e-12)
    u, v = rng.standard_normal(7), rng.standard_normal(5)
    got = matrix_metrics(torch.from_numpy(3.0 * np.outer(u, v)))
    assert got["spectral_norm"].item() == pytest.approx(3.0 * np.linalg.norm(u) * np.linalg.norm(v), rel=1e-12)
    assert got["stable_rank"].item() == pytest.approx(1.0, rel=1e-9)
    assert got["erank"].item() == pytest.approx(1.0, rel=1e-6)
    w = rng.standard_normal((4, 6, 9))  # batched
    s = np.linalg.svd(w, compute_uv=False)
    q = s / s.sum(-1, keepdims=True)
    got = matrix_metrics(torch.from_numpy(w))
    np.testing.assert_allclose(got["spectral_norm"].numpy(), s[:, 0], rtol=1e-12)
    np.testing.assert_allclose(got["stable_rank"].numpy(), (s**2).sum(-1) / s[:, 0] ** 2, rtol=1e-12)
    np.testing.assert_allclose(got["erank"].numpy(), np.exp(-(q * np.log(q)).sum(-1)), rtol=1e-12)


# ---------------------------------------------------------------------------------------------
# on a tiny model


def tiny(**kw) -> Transformer:
    torch.manual_seed(0)
    base = dict(n_layer=2, d_model=64, n_head=4, head_dim=16, seq_len=16, vocab_size=97)
    return Transformer(ModelConfig(**{**base, **kw}))


def capture(model, tokens, names=("q_rope", "k_rope", "k_norm")) -> dict:
    """Per layer and tap name, the concatenated activations (N, T, H, D) of a plain forward."""
    seen: dict = {}
    handles = [getattr(b.attn, f"hook_{n}").register_forward_hook(
        lambda m, i, o, key=(layer, n): seen.setdefault(key, []).append(o.detach()))
        for layer, b in enumerate(model.blocks) for n in names]
    with torch.no_grad():
        model.eval()
        model(tokens)
        model.train()
    for h in handles:
        h.remove()
    return {key: torch.cat(v) for key, v in seen.items()}


def test_spectral_rows_extend_probe_rows_and_match_numpy():
    model = tiny(n_kv_head=2, qk_norm=True)
    tokens = torch.randint(0, 97, (8, 16))
    rows, _ = probe_lenses(model, tokens, batch_size=3, attention=False)
    base = probe_model(model, tokens, batch_size=5)
    assert len(rows) == len(base) == 14
    for row, ref in zip(rows, base):
        for key, value in ref.items():
            assert row[key] == (value if isinstance(value, str) else pytest.approx(value, rel=1e-9)), key
        for m in ("erank", "stable_rank", "rankme"):
            assert len(row[f"{m}_heads"]) == len(row["pr_heads"])
            assert row[m] == pytest.approx(np.mean(row[f"{m}_heads"]), rel=1e-12)
        for m in NULL_METRICS:
            assert row[f"{m}_null"] == isotropic_null(m, row["n"], row["dim"])
    k = capture(model, tokens)[(1, "k_norm")].reshape(-1, 2, 16).double().numpy()
    row = next(r for r in rows if (r["tap"], r["tensor"], r["layer"]) == ("norm", "k", 1))
    for h in range(2):
        ref = reference(k[:, h])
        for m in ("erank", "stable_rank", "rankme"):
            assert row[f"{m}_heads"][h] == pytest.approx(ref[m], rel=1e-8), m


def attention_by_hand(q: torch.Tensor, k: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per head: mean entropy and normalised entropy over rows t >= 1, and the max visible logit."""
    q, k = q.double(), k.double()
    N, T, H, D = q.shape
    k = k.repeat_interleave(H // k.size(2), dim=2)
    ent, norm, mx = np.zeros(H), np.zeros(H), np.full(H, -np.inf)
    for h in range(H):
        for b in range(N):
            for t in range(T):
                logits = (k[b, : t + 1, h] @ q[b, t, h]).numpy() / math.sqrt(D)
                mx[h] = max(mx[h], logits.max())
                if t == 0:
                    continue
                p = np.exp(logits - logits.max())
                p /= p.sum()
                e = -(p * np.log(np.where(p > 0, p, 1))).sum()  # 0 log 0 = 0
                ent[h] += e / (N * (T - 1))
                norm[h] += e / math.log(t + 1) / (N * (T - 1))
    return ent, norm, mx


@pytest.mark.parametrize("kw", [dict(), dict(n_kv_head=2, qk_norm=True)])
def test_attention_lenses_match_a_hand_computation(kw):
    model = tiny(**kw)
    with torch.no_grad():  # larger q/k weights: peaked attention, so entropies differ between heads
        for b in model.blocks:
            b.attn.wq.weight.mul_(20)
    tokens = torch.randint(0, 97, (3, 16))
    rows = attention_lenses(model, tokens, batch_size=2)
    taps = capture(model, tokens)
    assert [r["layer"] for r in rows] == [0, 1]
    for row in rows:
        ent, norm, mx = attention_by_hand(taps[(row["layer"], "q_rope")], taps[(row["layer"], "k_rope")])
        np.testing.assert_allclose(row["entropy_heads"], ent, rtol=1e-5)
        np.testing.assert_allclose(row["entropy_norm_heads"], norm, rtol=1e-5)
        np.testing.assert_allclose(row["max_logit_heads"], mx, rtol=1e-5)
        assert row["entropy"] == pytest.approx(ent.mean(), rel=1e-5) and row["max_logit"] == pytest.approx(mx.max())
        assert row["entropy_max"] == pytest.approx(np.mean(np.log(np.arange(2, 17))), rel=1e-9)
        assert all(0 < e < 1 for e in row["entropy_norm_heads"])
        assert row["n_rows"] == 3 * 15 and row["seq_len"] == 16
    assert model.training


@pytest.mark.parametrize("fused", [True, False])
def test_attention_entropy_stays_accurate_when_logits_are_large(fused):
    """Entropy is logsumexp minus the expected logit: with logits in the hundreds (a collapsed AdamW
    arm reached ~500) both terms are large and nearly equal, and their float32 difference must still
    match the float64 hand computation of -Σ p log p; so must the fused kernel's sharpened max."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 24, 2, 8, generator=g) * 12, torch.randn(2, 24, 2, 8, generator=g) * 12
    stats = AttentionStats(fused=fused)
    stats.add(0, q, k, 8 ** -0.5)
    row = stats.rows()[0]
    ent, norm, mx = attention_by_hand(q, k)
    assert mx.max() > 200 and ent.min() < 0.5  # the regime under test: huge logits, near one-hot rows
    np.testing.assert_allclose(row["entropy_heads"], ent, atol=5e-5)
    np.testing.assert_allclose(row["entropy_norm_heads"], norm, atol=5e-5)
    np.testing.assert_allclose(row["max_logit_heads"], mx, rtol=1e-6)


def test_attention_stats_do_not_depend_on_the_memory_budget_or_the_fused_kernel():
    q, k = torch.randn(3, 16, 4, 8), torch.randn(3, 16, 2, 8)
    small, big, fused = AttentionStats(budget=1, fused=False), AttentionStats(fused=False), AttentionStats()
    for stats in (small, big, fused):
        stats.add(0, q, k, 0.5)
    for key in ("entropy_heads", "entropy_norm_heads", "max_logit_heads"):
        np.testing.assert_allclose(small.rows()[0][key], big.rows()[0][key], rtol=1e-6)
        np.testing.assert_allclose(fused.rows()[0][key], big.rows()[0][key], rtol=1e-5)


def test_fused_max_logit_stays_within_its_bound_when_logits_tie():
    """The sharpened log-sum-exp overshoots the max by log(#tied keys) / SHARPNESS at most: the worst
    case is a row whose visible logits are all equal (every key the same)."""
    T, D = 64, 8
    q = torch.randn(2, T, 1, D)
    k = torch.randn(1, 1, 1, D).expand(2, T, 1, D).contiguous()  # one key repeated: ties everywhere
    stats = AttentionStats()
    stats.add(0, q, k, D**-0.5)
    exact = (q[..., 0, :] @ k[0, 0, 0]).max().item() * D**-0.5
    excess = stats.rows()[0]["max_logit"] - exact
    assert -1e-5 <= excess <= math.log(T) / AttentionStats.SHARPNESS + 1e-5


def test_weight_lenses_and_update_rms():
    model = tiny(n_kv_head=2)
    rows = weight_lenses(model)
    assert [(r["layer"], r["matrix"]) for r in rows] == [(i, m) for i in range(2) for m in "qkvo"]
    wk = model.blocks[1].attn.wk.weight.detach().double().numpy()  # (Hkv·D, d) = (32, 64)
    row = next(r for r in rows if (r["layer"], r["matrix"]) == (1, "k"))
    assert row["shape"] == [32, 64]
    assert row["spectral_norm"] == pytest.approx(np.linalg.svd(wk, compute_uv=False)[0], rel=1e-10)
    s = np.linalg.svd(wk[16:], compute_uv=False)  # key head 1 = rows 16..31
    assert row["spectral_norm_heads"][1] == pytest.approx(s[0], rel=1e-10)
    assert row["stable_rank_heads"][1] == pytest.approx((s**2).sum() / s[0] ** 2, rel=1e-10)
    wo = model.blocks[0].attn.wo.weight.detach().double().numpy()  # (d, H·D); head 2 = columns 32..47
    row = next(r for r in rows if (r["layer"], r["matrix"]) == (0, "o"))
    assert row["spectral_norm_heads"][2] == pytest.approx(np.linalg.svd(wo[:, 32:48], compute_uv=False)[0], rel=1e-10)
    assert len(row["erank_heads"]) == 4

    before = weight_snapshot(model)
    with torch.no_grad():
        model.blocks[0].attn.wv.weight.add_(0.01)
    rows = update_rms(before, weight_snapshot(model))
    by = {(r["layer"], r["matrix"]): r for r in rows}
    assert by[(0, "v")]["update_rms"] == pytest.approx(0.01, rel=1e-5)
    norm = before[(0, "v")].double().norm().item()
    assert by[(0, "v")]["update_rel"] == pytest.approx(0.01 * math.sqrt(32 * 64) / norm, rel=1e-5)
    assert by[(1, "q")]["update_rms"] == 0.0 and len(rows) == 8


def test_non_finite_covariance_gives_nan_metrics_not_an_error():
    """A diverging run's overflowed keys must not crash the probe; only the broken head is NaN."""
    from rankprobe.probes.spectra import covariance_spectrum

    cov = torch.eye(4, dtype=torch.float64).repeat(2, 1, 1)
    cov[1, 0, 0] = float("inf")
    lam = covariance_spectrum(cov)
    assert torch.equal(lam[0], torch.ones(4, dtype=torch.float64)) and lam[1].isnan().all()


def cuda(test):
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")(test))


@cuda
@pytest.mark.parametrize("gain", [1.0, 4.0])
def test_fused_attention_on_cuda_matches_float64(gain):
    """The memory-efficient kernel's log-sum-exp (entropy, sharpened max) against float64 scores, at
    the probe's shapes and at logits in the hundreds (gain 4)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k = (torch.randn(2, 1024, 12, 64, device="cuda", generator=g).mul(3 * gain).bfloat16() for _ in range(2))
    scale = 64**-0.5
    fused, chunked = AttentionStats(), AttentionStats(fused=False)
    for stats in (fused, chunked):
        stats.add(0, q, k, scale)
    s = torch.einsum("bthd,bshd->bhts", q.double(), k.double()) * scale
    s = s.masked_fill(torch.ones(1024, 1024, dtype=torch.bool, device="cuda").triu(1), -math.inf)
    logp = s.log_softmax(-1)
    ent = -(logp.exp() * logp.nan_to_num(neginf=0.0)).sum(-1)[..., 1:].mean((0, 2)).cpu().numpy()
    mx = s.amax((0, 2, 3)).cpu().numpy()
    assert mx.max() > (200 if gain > 1 else 20)
    for stats in (fused, chunked):
        row = stats.rows()[0]
        np.testing.assert_allclose(row["entropy_heads"], ent, atol=2e-4)
        np.testing.assert_allclose(row["max_logit_heads"], mx, rtol=1e-5)


@cuda
def test_weight_lenses_on_cuda_match_the_cpu():
    """On CUDA the Gram matrices reach the host through pinned memory without blocking."""
    model = tiny(n_kv_head=2)
    cpu_rows = weight_lenses(model)
    finish = weight_lenses_start(model.cuda())
    with torch.no_grad():  # the weights change after the start: the rows must not
        for p in model.parameters():
            p.mul_(2)
    got = finish()
    assert [(r["layer"], r["matrix"]) for r in got] == [(r["layer"], r["matrix"]) for r in cpu_rows]
    for row, ref in zip(got, cpu_rows):
        for key in ("spectral_norm", "stable_rank", "erank"):
            assert row[key] == pytest.approx(ref[key], rel=1e-10)
            np.testing.assert_allclose(row[f"{key}_heads"], ref[f"{key}_heads"], rtol=1e-10)


@pytest.mark.parametrize("window, softcap", [(5, None), (None, 2.0), (4, 1.5), (64, None)])
def test_attention_stats_with_a_sliding_window_and_soft_cap_match_float64(window, softcap):
    """Windowed and soft-capped layers (Mistral, Gemma 2): entropy, its normalisation by the keys each
    row sees, the ceiling and the max logit against a float64 hand computation."""
    torch.manual_seed(0)
    B, T, H, D, scale = 2, 16, 4, 8, 0.7
    q, k = torch.randn(B, T, H, D) * 2, torch.randn(B, T, 2, D) * 2
    stats = AttentionStats()
    stats.add(0, q, k, scale, window=window, softcap=softcap)
    (row,) = stats.rows()
    s = torch.einsum("bthd,bshd->bhts", q.double(), k.double().repeat_interleave(2, dim=2)) * scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    t = torch.arange(T)
    visible = (t[None, :] <= t[:, None]) & (t[None, :] > t[:, None] - (window or T))
    s = s.masked_fill(~visible, -math.inf)
    p = s.softmax(-1)[:, :, 1:]
    ent = -(p * p.clamp_min(1e-300).log()).sum(-1)  # (B, H, T-1)
    n_keys = visible[1:].sum(-1).double()
    np.testing.assert_allclose(row["entropy_heads"], ent.mean((0, 2)).numpy(), rtol=1e-5)
    np.testing.assert_allclose(row["entropy_norm_heads"], (ent / n_keys.log()).mean((0, 2)).numpy(), rtol=1e-5)
    np.testing.assert_allclose(row["entropy_max"], n_keys.log().mean().item(), rtol=1e-12)
    np.testing.assert_allclose(row["max_logit_heads"], s.amax((0, 2, 3)).numpy(), rtol=1e-5)

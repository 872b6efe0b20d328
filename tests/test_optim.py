"""Tests for rankprobe.optim: Muon against torch.optim.Muon, Newton-Schulz spectra, groups, schedule."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rankprobe.config import OptimConfig
from rankprobe.optim import (
    Muon, adjusted_lr, apply_lr, build_optimizers, fast_ns_dtype, lr_scale, muon_update, newton_schulz,
    ns_dtype, param_groups,
)
from rankprobe.optim.muon import NS_COEFFICIENTS, NS_EPS

if not hasattr(torch.optim, "Muon"):
    pytest.skip("torch.optim.Muon (torch >= 2.9) is the reference", allow_module_level=True)

from torch.optim._muon import _zeropower_via_newtonschulz as torch_newton_schulz  # noqa: E402



@pytest.fixture(autouse=True)
def _one_cpu_thread():
    # These matrices are tiny, so intra-op threads buy nothing; on a busy 2-core machine oneDNN's
    # spin-waiting threads made each bf16 matmul ~50x slower (this file: 22 s instead of 3.7 s).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------------------------------------
# a small stand-in with the parameter names of rankprobe.model (no biases)


class Attention(nn.Module):
    def __init__(self, d: int, H: int, Hkv: int, D: int, qk_norm_gain: bool):
        super().__init__()
        self.H, self.Hkv, self.D = H, Hkv, D
        self.wq = nn.Linear(d, H * D, bias=False)
        self.wk = nn.Linear(d, Hkv * D, bias=False)
        self.wv = nn.Linear(d, Hkv * D, bias=False)
        self.wo = nn.Linear(H * D, d, bias=False)
        self.q_norm = nn.RMSNorm(D, elementwise_affine=qk_norm_gain)
        self.k_norm = nn.RMSNorm(D, elementwise_affine=qk_norm_gain)

    def forward(self, x):
        B, T, _ = x.shape
        q = self.q_norm(self.wq(x).view(B, T, self.H, self.D)).transpose(1, 2)  # (B, H, T, D)
        k = self.k_norm(self.wk(x).view(B, T, self.Hkv, self.D)).transpose(1, 2)  # (B, Hkv, T, D)
        v = self.wv(x).view(B, T, self.Hkv, self.D).transpose(1, 2)  # (B, Hkv, T, D)
        k, v = (t.repeat_interleave(self.H // self.Hkv, dim=1) for t in (k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, D)
        return self.wo(y.transpose(1, 2).reshape(B, T, self.H * self.D))


class MLP(nn.Module):
    def __init__(self, d: int, F_: int):
        super().__init__()
        self.w_gate = nn.Linear(d, F_, bias=False)
        self.w_up = nn.Linear(d, F_, bias=False)
        self.w_down = nn.Linear(F_, d, bias=False)

    def forward(self, x):
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


class Block(nn.Module):
    def __init__(self, d, H, Hkv, D, F_, qk_norm_gain):
        super().__init__()
        self.attn_norm = nn.RMSNorm(d)
        self.attn = Attention(d, H, Hkv, D, qk_norm_gain)
        self.mlp_norm = nn.RMSNorm(d)
        self.mlp = MLP(d, F_)

    def forward(self, x):
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class TinyLM(nn.Module):
    def __init__(self, V=50, d=32, n_layer=2, H=4, Hkv=2, D=8, F_=64, tied=False, qk_norm_gain=False):
        super().__init__()
        self.tok_emb = nn.Embedding(V, d)
        self.blocks = nn.ModuleList(Block(d, H, Hkv, D, F_, qk_norm_gain) for _ in range(n_layer))
        self.norm_f = nn.RMSNorm(d)
        self.lm_head = nn.Linear(d, V, bias=False)
        if tied:
            self.lm_head.weight = self.tok_emb.weight  # named_parameters() then lists it once, as tok_emb

    def forward(self, idx):
        x = self.tok_emb(idx)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.norm_f(x))


# ---------------------------------------------------------------------------------------------
# Newton-Schulz and Muon against torch.optim.Muon


# A batched Newton-Schulz output may differ from the per-matrix one by a bf16 rounding flip in an
# intermediate (bmm and mm accumulate fp32 in different orders; see muon._newton_schulz_batch).
# Measured on CPU: 0.5% of calls, at most 0.012 = 1.5 bf16 ulps near 1. Allow 4 ulps near 1.
NS_BATCH_ATOL = 2**-5


def test_newton_schulz_matches_torch_single_exactly_batched_within_bf16():
    for shape in [(24, 40), (40, 24), (32, 32)]:
        Gs = [torch.randn(shape) for _ in range(3)]
        ref = [torch_newton_schulz(G, NS_COEFFICIENTS, 5, NS_EPS) for G in Gs]
        single = [newton_schulz(G) for G in Gs]
        batched = newton_schulz(torch.stack(Gs)).unbind(0)
        assert all(r.dtype == torch.bfloat16 and r.shape == shape for r in single)
        assert all(torch.equal(r, s) for r, s in zip(ref, single)), shape
        for r, b in zip(ref, batched):
            torch.testing.assert_close(b.float(), r.float(), atol=NS_BATCH_ATOL, rtol=0)


def test_newton_schulz_leading_batch_dims_and_zero_matrix():
    G = torch.randn(2, 3, 16, 8)
    out = newton_schulz(G)
    assert out.shape == G.shape
    assert torch.equal(out[1, 2], newton_schulz(G[1, 2]))
    assert torch.equal(newton_schulz(torch.zeros(8, 4)), torch.zeros(8, 4, dtype=torch.bfloat16))
    with pytest.raises(ValueError):
        newton_schulz(torch.randn(5))


def test_newton_schulz_singular_values_in_band():
    # Band from the polynomial p(x) = 3.4445x - 4.7750x^3 + 2.0315x^5 (see muon.py): it maps
    # [0.211, 1.2024] into [0.6818, 1.2024], so singular values that have reached 0.211 end inside.
    # For Gaussian matrices of aspect >= 2 the smallest singular value relative to the Frobenius
    # norm is large enough that all of them get there in 5 steps (measured: 0.679..1.139 over
    # 64x256, 128x64, 512x128, 384x1024); a square Gaussian matrix has singular values near 0 that
    # lag (measured: 97-100% in band, 32..1024 square, max 1.2023). bf16 rounding adds < 1%, hence
    # the margins [0.66, 1.22]. Keller's "roughly Uniform(0.5, 1.5)" is the looser envelope.
    lo, hi = 0.66, 1.22
    for shape in [(128, 64), (64, 256), (96, 96)]:
        G = torch.randn(shape)
        S = torch.linalg.svdvals(newton_schulz(G).float())
        s = torch.linalg.svdvals(G)
        assert S.max() <= hi, shape
        if shape[0] == shape[1]:
            assert ((S >= lo).float().mean() >= 0.93).item(), shape
        else:
            assert S.min() >= lo, shape
            # The raw spread, max/min ~ (1 + sqrt(r)) / (1 - sqrt(r)) for aspect r = short/long side
            # (Marchenko-Pastur: 5.8 at r = 1/2, 3 at r = 1/4; 2.59 was the lowest of 400 draws of 64x256),
            # collapses to <= 1.2024 / 0.6818 = 1.76.
            assert (s.max() / s.min()) > 2.2 and (S.max() / S.min()) < 1.8, shape


def test_muon_update_matches_reference_formula():
    g, buf = torch.randn(6, 4), torch.randn(6, 4)
    old = buf.clone()
    nesterov = muon_update(g, buf, 0.9, nesterov=True)
    torch.testing.assert_close(buf, 0.9 * old + 0.1 * g)
    torch.testing.assert_close(nesterov, 0.1 * g + 0.9 * buf)
    assert muon_update(g, buf, 0.9, nesterov=False) is buf
    bufs = [old.clone(), old.clone()]
    out = muon_update([g, g], bufs, 0.9, nesterov=True)
    assert all(torch.equal(o, nesterov) for o in out)


def test_adjusted_lr_scales_tall_matrices_only():
    assert adjusted_lr(0.02, (64, 16)) == pytest.approx(0.04)
    assert adjusted_lr(0.02, (16, 64)) == 0.02
    assert adjusted_lr(0.02, (32, 32)) == 0.02


# (rows, cols): tall, wide and square. DISTINCT puts one matrix in each shape bucket (the per-matrix
# Newton-Schulz path, bit-exact); REPEATED puts several in some (the batched path).
DISTINCT = [(48, 16), (16, 48), (32, 32), (40, 24)]
REPEATED = [(48, 16), (48, 16), (16, 48), (32, 32), (32, 32), (32, 32), (40, 24)]


NO_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, NO_CUDA])


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("shapes", [DISTINCT, REPEATED], ids=["distinct", "repeated"])
@pytest.mark.parametrize("nesterov,weight_decay", [(True, 0.0), (False, 0.0), (True, 0.1)])
def test_muon_step_equals_torch_muon(shapes, nesterov, weight_decay, device):
    ps = [torch.randn(s, device=device) for s in shapes]
    mine = [nn.Parameter(p.clone()) for p in ps]
    ref = [nn.Parameter(p.clone()) for p in ps]
    kw = dict(lr=0.05, momentum=0.9, nesterov=nesterov, ns_steps=5, weight_decay=weight_decay)
    opt = Muon(mine, **kw)
    ref_opt = torch.optim.Muon(ref, adjust_lr_fn="original", **kw)
    drift = [0.0] * len(shapes)  # bound on |mine - ref| from batched rounding flips, summed over steps
    for step in range(4):
        grads = [torch.randn(s, device=device) for s in shapes]
        for a, b, g in zip(mine, ref, grads):
            a.grad, b.grad = g.clone(), g.clone()
        if step == 2:
            mine[0].grad = ref[0].grad = None  # a parameter without a gradient is skipped by both
        opt.step()
        ref_opt.step()
        for i, (a, b) in enumerate(zip(mine, ref)):
            if a.grad is not None and shapes.count(tuple(a.shape)) > 1:
                drift[i] += adjusted_lr(kw["lr"], a.shape) * NS_BATCH_ATOL
            if shapes is DISTINCT:
                assert torch.equal(a, b), f"step {step}, shape {tuple(a.shape)}"
            else:
                torch.testing.assert_close(a, b, atol=drift[i] + 1e-6, rtol=0)
        for a, b in zip(mine, ref):  # momentum buffers never see Newton-Schulz: always exact
            assert torch.equal(opt.state[a]["momentum_buffer"], ref_opt.state[b]["momentum_buffer"])


def _newton_schulz_float64(G: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """The quintic iteration written out in float64, on the wide orientation: the reference."""
    a, b, c = NS_COEFFICIENTS
    X = G.double().mT if G.size(0) > G.size(1) else G.double()
    X = X / X.norm().clamp(min=NS_EPS)
    for _ in range(steps):
        A = X @ X.mT
        X = a * X + (b * A + c * A @ A) @ X
    return X.mT if G.size(0) > G.size(1) else X


@pytest.mark.parametrize("shape", [(24, 40), (40, 24), (3, 32, 32)])
def test_newton_schulz_fp32_matches_float64_and_bf16_within_its_rounding(shape):
    # a fixed input: drawn from the global generator, the input depended on which tests ran before it in
    # the xdist worker, and bf16's mean deviation for a 3 × 32 × 32 stack exceeds 2^-9 for ~11% of draws
    G = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    fp32, bf16 = newton_schulz(G, dtype=torch.float32), newton_schulz(G)
    assert fp32.dtype == torch.float32 and fp32.shape == G.shape
    ref = torch.stack([_newton_schulz_float64(g) for g in G.reshape(-1, *shape[-2:])]).reshape(shape)
    torch.testing.assert_close(fp32.double(), ref, atol=2e-6, rtol=0)
    # bf16's self-correcting iteration lands within a few bf16 ulps (2^-8 near 1) of the fp32 one.
    torch.testing.assert_close(bf16.float(), fp32, atol=2**-5, rtol=0)
    assert (bf16.float() - fp32).abs().mean() < 2**-9


def test_fast_ns_dtype_is_bf16_only_where_bf16_matmuls_are_hardware(monkeypatch):
    assert fast_ns_dtype("cuda") is torch.bfloat16
    # (oneDNN may use bf16, AVX512-BF16, AMX) -> dtype; the hardware queries are replaced, the rule is real
    for onednn, avx512_bf16, amx, expected in [(True, False, False, torch.float32),
                                               (True, True, False, torch.bfloat16),
                                               (True, False, True, torch.bfloat16),
                                               (False, True, True, torch.float32)]:
        monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda v=onednn: v)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v)
        assert fast_ns_dtype("cpu") is expected
        assert ns_dtype(OptimConfig(name="muon"), "cpu") is expected  # optim.ns_dtype = "auto"
        opts, _ = build_optimizers(TinyLM(), OptimConfig(name="muon"), "cpu")
        assert opts[0].ns_dtype is expected
    assert ns_dtype(OptimConfig(ns_dtype="bf16"), "cpu") is torch.bfloat16
    assert ns_dtype(OptimConfig(ns_dtype="fp32"), "cuda") is torch.float32


def test_muon_fp32_step_is_the_update_rule_with_fp32_newton_schulz():
    shapes = [(48, 16), (48, 16), (16, 48)]
    ps = [nn.Parameter(torch.randn(s)) for s in shapes]
    before = [p.detach().clone() for p in ps]
    opt = Muon(ps, lr=0.05, momentum=0.9, nesterov=True, ns_dtype=torch.float32)
    grads = [torch.randn(s) for s in shapes]
    for p, g in zip(ps, grads):
        p.grad = g.clone()
    opt.step()
    for p, p0, g in zip(ps, before, grads):
        update = 0.1 * g + 0.9 * (0.1 * g)  # Nesterov on a fresh EMA buffer
        expected = p0.double() - adjusted_lr(0.05, p.shape) * _newton_schulz_float64(update)
        torch.testing.assert_close(p.detach().double(), expected, atol=1e-6, rtol=0)


def test_muon_rejects_non_matrices():
    with pytest.raises(ValueError, match="2-D"):
        Muon([nn.Parameter(torch.randn(4))])


# ---------------------------------------------------------------------------------------------
# parameter groups


def _trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("name", ["adamw", "muon"])
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("qk_norm_gain", [False, True])
def test_param_groups_cover_every_parameter_once(name, tied, qk_norm_gain):
    model = TinyLM(tied=tied, qk_norm_gain=qk_norm_gain)
    groups = param_groups(model, OptimConfig(name=name))
    names = [n for params in groups.values() for n, _ in params]
    assert len(names) == len(set(names))
    assert set(names) == _trainable(model)
    where = {n: g for g, params in groups.items() for n, _ in params}
    assert where["tok_emb.weight"] == "adamw_no_decay"
    assert where["blocks.1.attn_norm.weight"] == "adamw_no_decay"
    assert where["norm_f.weight"] == "adamw_no_decay"
    if qk_norm_gain:
        assert where["blocks.0.attn.k_norm.weight"] == "adamw_no_decay"
    assert ("lm_head.weight" in where) == (not tied)
    hidden = "muon" if name == "muon" else "adamw_decay"
    for n in ("attn.wq", "attn.wk", "attn.wv", "attn.wo", "mlp.w_gate", "mlp.w_up", "mlp.w_down"):
        assert where[f"blocks.0.{n}.weight"] == hidden
    if not tied:
        assert where["lm_head.weight"] == "adamw_decay"
    if name == "muon":
        assert all(p.ndim == 2 for _, p in groups["muon"])
        assert set(groups) == ({"muon", "adamw_no_decay"} | (set() if tied else {"adamw_decay"}))


def test_param_groups_fail_on_unclaimed_parameter_and_skip_frozen():
    model = TinyLM()
    model.blocks[0].attn.wq.bias = nn.Parameter(torch.zeros(32))  # 1-D, not a norm gain: no rule
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.wq\.bias"):
        param_groups(model, OptimConfig(name="muon"))
    model.blocks[0].attn.wq.bias.requires_grad_(False)
    grouped = {n for ps in param_groups(model, OptimConfig()).values() for n, _ in ps}
    assert "blocks.0.attn.wq.bias" not in grouped


def test_param_groups_fail_when_a_rule_matches_nothing():
    model = TinyLM()
    model.tok_emb.weight.requires_grad_(False)
    with pytest.raises(ValueError, match="token embedding"):
        param_groups(model, OptimConfig(name="adamw"))


# ---------------------------------------------------------------------------------------------
# optimizers, schedule


@pytest.mark.parametrize("name", ["adamw", "muon"])
def test_build_optimizers_groups_lrs_and_a_training_step(name):
    torch.manual_seed(0)
    model = TinyLM(qk_norm_gain=True)
    cfg = OptimConfig(name=name, lr=1e-3, muon_lr=0.03, weight_decay=0.1)
    opts, sizes = build_optimizers(model, cfg, "cpu")
    assert [type(o).__name__ for o in opts] == (["Muon", "AdamW"] if name == "muon" else ["AdamW"])
    groups = {g["name"]: g for o in opts for g in o.param_groups}
    assert set(groups) == set(sizes)
    assert sum(s["n_params"] for s in sizes.values()) == sum(p.numel() for p in model.parameters())
    assert sum(s["n_tensors"] for s in sizes.values()) == len(list(model.parameters()))
    assert groups["adamw_decay"]["weight_decay"] == 0.1 and groups["adamw_no_decay"]["weight_decay"] == 0.0
    assert groups["adamw_decay"]["peak_lr"] == 1e-3
    if name == "muon":
        assert groups["muon"]["peak_lr"] == 0.03 and groups["muon"]["weight_decay"] == 0.1
        assert sizes["muon"]["n_tensors"] == 2 * 7
    apply_lr(opts, 0.5)
    for g in groups.values():
        assert g["lr"] == pytest.approx(0.5 * g["peak_lr"])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    idx = torch.randint(0, 50, (2, 8))
    F.cross_entropy(model(idx).flatten(0, 1), idx.flatten()).backward()
    for o in opts:
        o.step()
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters())


def test_build_optimizers_rejects_params_on_another_device():
    with pytest.raises(ValueError, match="built for"):
        build_optimizers(TinyLM(), OptimConfig(), "meta")


def test_lr_scale_known_values():
    T, w, m = 1_000_000, 0.1, 0.1
    for decay in ("cosine", "linear"):
        assert lr_scale(0, T, w, decay, m) == 0.0
        assert lr_scale(50_000, T, w, decay, m) == pytest.approx(0.5)
        assert lr_scale(100_000, T, w, decay, m) == pytest.approx(1.0)
        assert lr_scale(T, T, w, decay, m) == pytest.approx(m)
        assert lr_scale(2 * T, T, w, decay, m) == pytest.approx(m)
        curve = [lr_scale(t, T, w, decay, m) for t in range(100_000, T + 1, 10_000)]
        assert all(a >= b for a, b in zip(curve, curve[1:])) and curve[0] > curve[-1]
    assert lr_scale(550_000, T, w, "cosine", m) == pytest.approx(m + (1 - m) * 0.5)  # halfway
    assert lr_scale(550_000, T, w, "linear", m) == pytest.approx(1 - (1 - m) * 0.5)
    assert lr_scale(900_000, T, w, "constant", m) == 1.0
    assert lr_scale(0, T, 0.0, "cosine", m) == 1.0  # no warmup
    third = m + (1 - m) * 0.5 * (1 + math.cos(math.pi / 3))
    assert lr_scale(T // 3, T, 0.0, "cosine", m) == pytest.approx(third)
    with pytest.raises(ValueError):
        lr_scale(0, T, w, "step", m)

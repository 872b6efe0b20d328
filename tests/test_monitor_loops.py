"""The Monitor inside users' own loops, on models it has no adapter for (`Patterns`): fused QKV
layouts, multi-query and grouped-query attention, QK-Norm and rotary modules, a custom logit scale,
gradient accumulation and autocast. Every number is checked against float64 by hand from what the
model itself recorded (numpy eigenvalues, an explicit causal softmax), and what the Monitor cannot
measure right is refused in one line."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rankprobe import AttentionSpec, Monitor, Patterns
from rankprobe.config import DataError, UserError

# the attention check (probes/agreement.py) must stay quiet wherever the lens is right
pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")
T, E = 12, 32


def _rotate(x):
    """A rotary embedding on (B, T, H, D): the model's own, which the Monitor never sees as a function."""
    D = x.size(-1)
    pos = torch.arange(x.size(1), dtype=torch.float32)[:, None] * (1.0 / 100 ** (torch.arange(0, D, 2) / D))
    cos, sin = pos.cos()[None, :, None, :], pos.sin()[None, :, None, :]
    a, b = x[..., ::2], x[..., 1::2]
    return torch.stack([a * cos - b * sin, a * sin + b * cos], -1).flatten(-2)


class Rope(nn.Module):
    def __init__(self, bhtd=False):
        super().__init__()
        self.bhtd = bhtd

    def forward(self, x, y=None):  # x (B, H, T, D) when bhtd, else (B, T, H, D); both of (q, k) when y is given
        one = (lambda t: _rotate(t.transpose(1, 2)).transpose(1, 2)) if self.bhtd else _rotate  # noqa: E731
        return one(x) if y is None else (one(x), one(y))


class Attn(nn.Module):
    """Causal attention with H query heads and Hkv key heads of width D, q/k/v from separate
    projections or one fused QKV in `layout`; optional QK-Norm and rotary modules. It records its own
    q, k, v (B, T, H, D) at every stage in `self.seen` when `record` is on."""

    def __init__(self, H, Hkv, D, layout=None, qk_norm=False, rope=False, bhtd=False, scale=None, dropout=0.0):
        super().__init__()
        self.H, self.Hkv, self.D, self.layout, self.bhtd, self.scale = H, Hkv, D, layout, bhtd, scale
        if layout is None:
            self.wq, self.wk, self.wv = nn.Linear(E, H * D), nn.Linear(E, Hkv * D), nn.Linear(E, Hkv * D)
        else:
            self.c_attn = nn.Linear(E, (H + 2 * Hkv) * D)
        self.q_norm = nn.RMSNorm(D) if qk_norm else None
        self.k_norm = nn.RMSNorm(D) if qk_norm else None
        # rope: True, a module each for q and k; "twice", one module called for q, then k; "pair", one module (q, k)
        self.rope = rope
        self.q_rope, self.k_rope = (Rope(bhtd), Rope(bhtd)) if rope is True else (None, None)
        self.rotary = Rope(bhtd) if rope in ("twice", "pair") else None
        self.wo = nn.Linear(H * D, E)
        self.attn_dropout = nn.Dropout(dropout)  # nanoGPT's: its p is SDPA's dropout_p in training
        self.record, self.seen = False, []

    def qkv(self, x):
        B, T_, _ = x.shape
        H, Hkv, D = self.H, self.Hkv, self.D
        if self.layout is None:
            q = self.wq(x)
            k = q if self.wk is self.wq else self.wk(x)  # shared-QK attention: one call
            return q.view(B, T_, H, D), k.view(B, T_, Hkv, D), self.wv(x).view(B, T_, Hkv, D)
        return self.split(self.c_attn(x))

    def split(self, y):
        """A fused QKV output (B, T, (H + 2·Hkv)·D) -> q, k, v (B, T, heads, D), as this model slices it."""
        B, T_, _ = y.shape
        H, Hkv, D = self.H, self.Hkv, self.D
        if self.layout == "blocks":
            q, k, v = y[..., : H * D], y[..., H * D : (H + Hkv) * D], y[..., (H + Hkv) * D :]
            return q.reshape(B, T_, H, D), k.reshape(B, T_, Hkv, D), v.reshape(B, T_, Hkv, D)
        if self.layout == "heads":  # per head [q k v]
            y = y.view(B, T_, H, 3, D)
            return y[:, :, :, 0], y[:, :, :, 1], y[:, :, :, 2]
        g = y.view(B, T_, Hkv, H // Hkv + 2, D)  # per key group [its queries | k | v]
        return g[:, :, :, : H // Hkv].reshape(B, T_, H, D), g[:, :, :, -2], g[:, :, :, -1]

    def forward(self, x):
        q, k, v = self.qkv(x)  # (B, T, H, D)
        rec = {"proj": (q, k, v)}
        if self.bhtd:
            q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, H, T, D)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        back = (lambda t: t.transpose(1, 2)) if self.bhtd else (lambda t: t)  # noqa: E731
        rec["norm"] = (back(q), back(k))
        if self.rope is True:
            q, k = self.q_rope(q), self.k_rope(k)
        elif self.rope == "inline":  # a function inside forward: no module to tap
            q, k = (_rotate(t.transpose(1, 2)).transpose(1, 2) if self.bhtd else _rotate(t) for t in (q, k))
        elif self.rope:
            q, k = (self.rotary(q), self.rotary(k)) if self.rope == "twice" else self.rotary(q, k)
        rec["rope"] = (back(q), back(k))
        if self.record:
            self.seen.append({s: tuple(t.detach().double().clone() for t in ts) for s, ts in rec.items()})
        q, k, v = back(q).transpose(1, 2), back(k).transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
        rep = self.H // self.Hkv
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        p = self.attn_dropout.p if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale, dropout_p=p)
        return self.wo(y.transpose(1, 2).flatten(2))


class Net(nn.Module):
    def __init__(self, n_layer=2, **kw):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(50, E)
        self.layers = nn.ModuleList(nn.ModuleDict({"attn": Attn(**kw), "ln": nn.LayerNorm(E)}) for _ in range(n_layer))

    def forward(self, idx):
        x = self.emb(idx)
        for blk in self.layers:
            x = x + blk["attn"](blk["ln"](x))
        return x.pow(2).mean()

    def recording(self, on=True):
        for blk in self.layers:
            blk["attn"].record = on
            if on:
                blk["attn"].seen.clear()
        return self


def _tokens(n=6, seed=1):
    return torch.randint(0, 50, (n, T), generator=torch.Generator().manual_seed(seed))


def _pr(xs):
    """Per head, the participation ratio (Σλ)²/Σλ² of the centred covariance of xs [(B, T, H, D)], float64."""
    x = np.concatenate([t.reshape(-1, *t.shape[2:]).numpy() for t in xs])  # (N, H, D)
    out = []
    for h in range(x.shape[1]):
        c = x[:, h] - x[:, h].mean(0)
        lam = np.linalg.eigvalsh(c.T @ c / len(c))
        out.append(lam.sum() ** 2 / (lam**2).sum())
    return np.array(out)


def _entropy(qs, ks, scale):
    """Per head, the mean causal attention entropy over rows t ≥ 1 and the max logit, by explicit softmax."""
    ent, mx, rows = 0.0, -np.inf, 0
    for q, k in zip(qs, ks):
        q, k = q.numpy(), k.numpy()
        k = np.repeat(k, q.shape[2] // k.shape[2], axis=2)  # query head h reads key head h // (H / Hkv)
        s = np.einsum("bthd,bjhd->bhtj", q, k) * scale
        s = np.where(np.tril(np.ones((q.shape[1],) * 2, bool)), s, -np.inf)
        mx = np.maximum(mx, s.max((0, 2, 3)))
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        h = -(np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0)).sum(-1)  # (B, H, T)
        ent, rows = ent + h[:, :, 1:].sum((0, 2)), rows + h.shape[0] * (h.shape[2] - 1)
    return ent / rows, mx


def _check(model, rows, spec_scale, taps=("proj", "norm", "rope")):
    """Every probe row of `rows` and every attn row against float64 by hand from the model's records."""
    probe = {(r["tap"], r["tensor"], r["layer"]): r for r in rows if r["kind"] == "probe"}
    attn = {r["layer"]: r for r in rows if r["kind"] == "attn"}
    for i, blk in enumerate(model.layers):
        seen = blk["attn"].seen
        assert seen, "the model ran no recorded forward"
        for tap in taps:
            for j, tensor in enumerate("qkv" if tap == "proj" else "qk"):
                got = probe[(tap, tensor, i)]
                want = _pr([s[tap][j] for s in seen])
                assert got["n"] == sum(s[tap][j].shape[0] * s[tap][j].shape[1] for s in seen)
                np.testing.assert_allclose(got["pr_heads"], want, rtol=1e-6, err_msg=f"{tap} {tensor} {i}")
        ent, mx = _entropy([s["rope"][0] for s in seen], [s["rope"][1] for s in seen], spec_scale)
        np.testing.assert_allclose(attn[i]["entropy_heads"], ent, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(attn[i]["max_logit_heads"], mx, rtol=1e-4, atol=1e-4)


def _measure(model, mon, batches=(_tokens(),), step=0):
    model.recording()
    with mon.watch(step):
        for x in batches:  # gradient accumulation: every micro-batch of the step
            model(x).backward()
    model.recording(False)
    return mon.last


LAYOUTS = [  # (fused layout or None, H, Hkv)
    (None, 4, 4), (None, 4, 2), (None, 4, 1),
    ("blocks", 4, 4), ("blocks", 4, 2), ("blocks", 4, 1),
    ("heads", 4, 4), ("groups", 4, 2), ("groups", 4, 1),
]


@pytest.mark.parametrize("layout,H,Hkv", LAYOUTS)
def test_fused_and_grouped_layouts_equal_float64_by_hand(layout, H, Hkv):
    model = Net(H=H, Hkv=Hkv, D=8, layout=layout)
    names = dict(qkv="c_attn", fused=layout) if layout else dict(q="wq", k="wk", v="wv")
    mon = Monitor(model, patterns=Patterns(layers="layers.*.attn", o="wo", **names), heads=H, kv_heads=Hkv,
                  every=1, weights=False)
    _check(model, _measure(model, mon), 8 ** -0.5)


NORMED = dict(q_norm="q_norm", k_norm="k_norm", q_rope="q_rope", k_rope="k_rope")


def test_qk_norm_rotary_modules_and_a_custom_scale_equal_float64_by_hand():
    model = Net(H=4, Hkv=2, D=8, qk_norm=True, rope=True, scale=0.5)
    mon = Monitor(model, patterns=Patterns(layers="layers.*.attn", q="wq", k="wk", v="wv", o="wo", **NORMED),
                  heads=4, kv_heads=2, attention_spec=AttentionSpec(scale=0.5), every=1, weights=False)
    rows = _measure(model, mon, batches=(_tokens(3, 1), _tokens(4, 2)))  # two micro-batches
    _check(model, rows, 0.5)


def test_norm_and_rotary_modules_on_heads_first_tensors():
    model = Net(H=4, Hkv=4, D=8, qk_norm=True, rope=True, bhtd=True)
    mon = Monitor(model, patterns=Patterns(layers="layers.*.attn", q="wq", k="wk", v="wv", o="wo", norm_layout="bhtd",
                                           rope_layout="bhtd", **NORMED), heads=4, every=1, weights=False)
    _check(model, _measure(model, mon), 8 ** -0.5)


def test_a_tap_in_another_layout_than_its_patterns_say_is_refused_not_measured():
    # rotary modules on (B, H, T, D) read as (B, T, H, D): 4 "tokens" of 12 "heads" were measured
    model = Net(H=4, Hkv=4, D=8, qk_norm=True, rope=True, bhtd=True)
    mon = Monitor(model, patterns=Patterns(layers="layers.*.attn", q="wq", k="wk", v="wv", o="wo", norm_layout="bhtd",
                                           **NORMED), heads=4, every=1, weights=False)
    with pytest.raises(DataError, match="q_rope.*12 heads.*4 heads of 8.*rope_layout"):
        _measure(model, mon)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("layout", ["blocks", "groups"])
def test_fused_qkv_with_qk_norm_and_rotary_modules_under_bf16_autocast(layout):
    # the fused hook read the layout variable the norm/rope loop rebinds: DataError mid-step
    model = Net(H=4, Hkv=2, D=8, layout=layout, qk_norm=True, rope=True)
    taps = Patterns(layers="layers.*.attn", qkv="c_attn", fused=layout, o="wo", **NORMED)
    mon = Monitor(model, patterns=taps, heads=4, kv_heads=2, every=1, weights=False)
    model.recording()
    with mon.watch(0), torch.autocast("cpu", dtype=torch.bfloat16):
        model(_tokens()).backward()
    model.recording(False)
    _check(model, mon.last, 8 ** -0.5)


class _Identity(nn.Module):
    def forward(self, x):
        return x


def test_head_width_is_read_through_w_for_identity_taps_and_a_wrong_one_is_refused_at_once():
    model = Net(H=4, Hkv=2, D=8)
    for blk in model.layers:  # identity taps after the projections, as RankProbe's own model has
        a = blk["attn"]
        a.hq, a.hk = _Identity(), _Identity()
        a.wq.register_forward_hook(lambda m, i, out, a=a: a.hq(out))
        a.wk.register_forward_hook(lambda m, i, out, a=a: a.hk(out))
    taps = Patterns(layers="layers.*.attn", q="hq", k="hk", v="wv", o="wo", w=("wq", "wk", "wv"))
    mon = Monitor(model, patterns=taps, heads=4, kv_heads=2, every=1, weights=False)  # was AttributeError: no weight
    assert mon.adapter.head_dim == 8
    _check(model, _measure(model, mon), 8 ** -0.5)
    with pytest.raises(UserError, match="'hq' has no .*give head_dim="):
        Monitor(model, patterns=Patterns(layers="layers.*.attn", q="hq", k="hk", v="wv", o="wo"), heads=4)
    for layout, names in ((None, dict(q="wq", k="wk", v="wv")), ("blocks", dict(qkv="c_attn"))):
        # a head_dim given that does not fit: 8 heads of 4 measured as if 4, or a split failing mid-step
        model = Net(H=4, Hkv=4, D=8, layout=layout)
        with pytest.raises(UserError, match="head_dim=4.* output features, not .* heads × 4"):
            Monitor(model, patterns=Patterns(layers="layers.*.attn", o="wo", **names), heads=4, head_dim=4)


def test_fused_heads_layout_under_grouped_query_attention_is_refused_at_once():
    with pytest.raises(DataError, match="fused='heads'.*kv_heads = heads"):
        Monitor(Net(H=4, Hkv=4, D=8, layout="heads"), patterns=Patterns(layers="layers.*.attn", qkv="c_attn",
                                                                         fused="heads"), heads=4, kv_heads=2)
    with pytest.raises(DataError, match="rope_layout='bhdt'"):
        Monitor(Net(H=4, Hkv=4, D=8), patterns=Patterns(layers="layers.*.attn", q="wq", k="wk", v="wv",
                                                        rope_layout="bhdt"), heads=4)


@pytest.mark.parametrize("n_layer,shared", [(2, 1), (3, 2)])
def test_layers_sharing_one_module_are_refused_not_merged_into_one(n_layer, shared):
    # named_modules lists a shared module once: layer 0 took every use's activations, the rest vanished
    model = Net(n_layer=n_layer, H=4, Hkv=4, D=8)
    model.layers[shared] = model.layers[0]
    with pytest.raises(DataError, match=f"layers 0 and {shared} are one module"):
        Monitor(model, patterns=Patterns(layers="layers.*.attn", q="wq", k="wk", v="wv", o="wo"), heads=4)


def test_one_rotary_module_returning_q_and_k_equals_float64_by_hand():
    model = Net(H=4, Hkv=2, D=8, rope="pair")
    mon = Monitor(model, patterns=Patterns(layers="layers.*.attn", q="wq", k="wk", v="wv", o="wo", q_rope="rotary",
                                           k_rope="rotary"), heads=4, every=1, weights=False)
    _check(model, _measure(model, mon), 8 ** -0.5)


def test_one_rotary_module_called_for_q_then_k_is_refused_not_measured():
    # both hooks fired on both calls: each rope tap got q and k, and attention paired q with q, k with k
    model = Net(H=4, Hkv=4, D=8, rope="twice")
    mon = Monitor(model, patterns=Patterns(layers="layers.*.attn", q="wq", k="wk", v="wv", o="wo", q_rope="rotary",
                                           k_rope="rotary"), heads=4, every=1, weights=False)
    with pytest.raises(DataError, match="one module 'rotary', which returned one tensor"):
        _measure(model, mon)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_a_module_shared_by_every_layer_is_refused_at_once():
    model = Net(H=4, Hkv=4, D=8, rope=True)
    for blk in model.layers[1:]:  # one rotary module for every layer, as a model-level rotary often is
        blk["attn"].q_rope, blk["attn"].k_rope = model.layers[0]["attn"].q_rope, model.layers[0]["attn"].k_rope
    with pytest.raises(DataError, match="layer 1's q_rope='q_rope' is the module already tapped as layer 0's"):
        Monitor(model, patterns=Patterns(layers="layers.*.attn", q="wq", k="wk", v="wv", q_rope="q_rope",
                                         k_rope="k_rope"), heads=4)


def test_key_heads_of_separate_projections_are_read_from_w_k():
    # without kv_heads, W_k and W_v of a grouped-query model were split into 4 heads of 4, not 2 of 8
    model = Net(H=4, Hkv=2, D=8)
    taps = Patterns(layers="layers.*.attn", q="wq", k="wk", v="wv", o="wo")
    rows = Monitor(model, patterns=taps, heads=4, every=1).probe(_tokens())
    w = {r["matrix"]: r for r in rows if r["kind"] == "weights" and r["layer"] == 1}
    wk = model.layers[1]["attn"].wk.weight.detach().double().numpy().reshape(2, 8, E)  # (heads, D, in)
    s = [np.linalg.svd(h, compute_uv=False) for h in wk]
    np.testing.assert_allclose(w["k"]["stable_rank_heads"], [(x**2).sum() / x[0] ** 2 for x in s], rtol=1e-6)
    assert len(w["q"]["stable_rank_heads"]) == 4 and len(w["v"]["stable_rank_heads"]) == 2
    with pytest.raises(UserError, match=r"kv_heads=4.*'wk' has 16 output features, 2 key heads"):
        Monitor(model, patterns=taps, heads=4, kv_heads=4)


@pytest.mark.parametrize("layout,H,Hkv", [("blocks", 4, 2), ("heads", 4, 4), ("groups", 4, 2), ("groups", 4, 1)])
def test_weight_heads_of_a_fused_qkv_are_the_heads_the_model_slices(layout, H, Hkv):
    model = Net(H=H, Hkv=Hkv, D=8, layout=layout)
    rows = Monitor(model, patterns=Patterns(layers="layers.*.attn", qkv="c_attn", fused=layout, o="wo"), heads=H,
                   kv_heads=Hkv).probe(_tokens(2))
    w = {r["matrix"]: r for r in rows if r["kind"] == "weights" and r["layer"] == 0}
    attn = model.layers[0]["attn"]
    # the model's own slicing applied to W^T as if it were (1, E, out) activations: head h's rows of W
    blocks = attn.split(attn.c_attn.weight.detach().double().t()[None])
    for name, x in zip("qkv", blocks):  # x (1, E, heads, D)
        s = [np.linalg.svd(x[0, :, h].t().numpy(), compute_uv=False) for h in range(x.size(2))]
        np.testing.assert_allclose(w[name]["stable_rank_heads"], [(v**2).sum() / v[0] ** 2 for v in s], rtol=1e-6)
        np.testing.assert_allclose(w[name]["spectral_norm_heads"], [v[0] for v in s], rtol=1e-6)


@pytest.mark.parametrize("layout,Hkv", [("blocks", 1), ("blocks", 2), ("groups", 1)])
def test_key_heads_of_a_fused_qkv_are_read_from_w_o(layout, Hkv):
    # without kv_heads, multi-query [q | k | v] of 4 heads of 8 (48 features) read as 4 + 2·4 heads of 4
    model = Net(H=4, Hkv=Hkv, D=8, layout=layout)
    taps = Patterns(layers="layers.*.attn", qkv="c_attn", fused=layout, o="wo")
    mon = Monitor(model, patterns=taps, heads=4, every=1, weights=False)
    assert (mon.adapter.head_dim, mon.adapter.kv_heads) == (8, Hkv)
    _check(model, _measure(model, mon), 8 ** -0.5)
    with pytest.raises(UserError, match=r"give the model's own head counts"):
        Monitor(model, patterns=taps, heads=4, kv_heads=Hkv + 1 if Hkv == 1 else 1)


def test_one_projection_for_q_and_k_called_once_is_measured_as_both():
    model = Net(H=4, Hkv=4, D=8)
    for blk in model.layers:  # shared-QK attention: k is q
        blk["attn"].wk = blk["attn"].wq
    mon = Monitor(model, patterns=Patterns(layers="layers.*.attn", q="wq", k="wk", v="wv", o="wo"), heads=4,
                  every=1, weights=False)
    _check(model, _measure(model, mon), 8 ** -0.5)


def _hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_every_forward_of_a_measured_step_counts_and_the_step_survives_errors_and_dtype_moves():
    model = Net(H=4, Hkv=2, D=8, layout="groups", rope="pair")
    taps = Patterns(layers="layers.*.attn", qkv="c_attn", fused="groups", o="wo", q_rope="rotary", k_rope="rotary")
    mon = Monitor(model, patterns=taps, heads=4, every=2, weights=False)
    assert mon.finish() == [] and _hooks(model) == 0  # finish without start: nothing
    with pytest.raises(ValueError, match="boom"), mon.watch(0):
        model(_tokens())
        raise ValueError("boom")  # the user's step fails half-way: no hook is left behind
    assert _hooks(model) == 0 and not mon._eager
    assert mon.start(1) is False and _hooks(model) == 0  # not due: nothing attached
    mon.start(2)
    with pytest.raises(RuntimeError, match="still open"):
        mon.start(2)
    mon.finish()
    model.double()  # moved after the Monitor was made: the same modules, measured in their new dtype
    model.recording()
    with mon.watch(4):
        model(_tokens(3, 1)).backward()
        with torch.no_grad():
            model(_tokens(2, 2))  # an extra forward inside the measured step counts like a micro-batch
    model.recording(False)
    _check(model, mon.last, 8 ** -0.5)
    assert {r["n"] for r in mon.last if r["kind"] == "probe"} == {5 * T}


@pytest.mark.parametrize("what", ["rotary inside forward", "another logit scale"])
def test_an_attention_lens_that_is_not_the_models_attention_is_warned_about(what):
    # the lens measured pre-rotary logits, or logits at 1/sqrt(D), and said nothing
    rope, scale = ("inline", None) if what.startswith("rotary") else (False, 1.0)
    model = Net(H=4, Hkv=2, D=8, layout="blocks", rope=rope, scale=scale)
    taps = Patterns(layers="layers.*.attn", qkv="c_attn", o="wo")
    mon = Monitor(model, patterns=taps, heads=4, kv_heads=2, every=1, weights=False)
    with pytest.warns(RuntimeWarning, match=r"layer \d's attention output .* differs by .* attn rows do not"):
        _measure(model, mon)
    assert mon._check.warned == {0, 1}


def test_the_attention_check_stays_quiet_under_attention_dropout_and_speaks_in_eval():
    model = Net(H=4, Hkv=4, D=8, layout="blocks", dropout=0.5)
    mon = Monitor(model, patterns=Patterns(layers="layers.*.attn", qkv="c_attn", o="wo"), heads=4, every=1,
                  weights=False)
    _measure(model, mon)  # training mode: the output is dropped out, not comparable, so not compared
    assert mon._check.compared == set()
    model.eval()
    _check(model, _measure(model, mon), 8 ** -0.5)  # eval mode: compared, and equal
    assert mon._check.compared == {0, 1} and not mon._check.warned
    model.layers[0]["attn"].scale = 0.9  # the lens still assumes 1/sqrt(8); a new Monitor's check shows it
    mon = Monitor(model, patterns=Patterns(layers="layers.*.attn", qkv="c_attn", o="wo"), heads=4, every=1,
                  weights=False)
    with pytest.warns(RuntimeWarning, match="layer 0's attention output"):
        _measure(model, mon)
    _measure(model, mon)  # each layer is compared once: no second comparison, no second warning


def test_the_attention_check_holds_no_activations_between_steps():
    """Without `o` nothing compares (and frees) the taps the check collects, and a layer compared once
    is not compared again: neither may keep a batch's q, k, v alive after the step."""
    for o in (None, "wo"):
        model = Net(H=4, Hkv=2, D=8, layout="blocks")
        mon = Monitor(model, patterns=Patterns(layers="layers.*.attn", qkv="c_attn", o=o), heads=4, kv_heads=2,
                      every=1, weights=False)
        for step in (0, 1):
            _measure(model, mon, step=step)
            assert mon._check.got == {}, (o, step)

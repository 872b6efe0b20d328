"""The decoder: shapes, causality, RoPE properties, QK-Norm, GQA, and taps that see what attention sees."""

import math

import pytest
import torch

from rankprobe.config import ModelConfig
from rankprobe.model import Transformer, apply_rope, rope_tables
from rankprobe.probes.capture import probe_model


def tiny(**kw) -> ModelConfig:
    base = dict(n_layer=2, d_model=64, n_head=4, head_dim=16, seq_len=32, vocab_size=97)
    return ModelConfig(**{**base, **kw})


def test_loss_at_init_is_near_uniform_and_logits_shape():
    torch.manual_seed(0)
    model = Transformer(tiny())
    idx = torch.randint(0, 97, (3, 32))
    assert model(idx).shape == (3, 32, 97)
    assert model(idx, idx).item() == pytest.approx(math.log(97), rel=0.05)


def test_causal_future_tokens_do_not_change_past_logits():
    torch.manual_seed(0)
    model = Transformer(tiny(n_kv_head=2, qk_norm=True))
    a = torch.randint(0, 97, (1, 32))
    b = a.clone()
    b[0, 20:] = torch.randint(0, 97, (12,))
    torch.testing.assert_close(model(a)[0, :20], model(b)[0, :20])
    assert not torch.allclose(model(a)[0, 20:], model(b)[0, 20:])


def test_rope_preserves_norm_and_depends_only_on_relative_position():
    cos, sin = rope_tables(64, 16, 10000.0)
    q = torch.randn(1, 1, 1, 16).expand(1, 64, 1, 16)
    k = torch.randn(1, 1, 1, 16).expand(1, 64, 1, 16)
    rq, rk = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    torch.testing.assert_close(rq.norm(dim=-1), q.norm(dim=-1))
    dots = torch.einsum("d,d->", rq[0, 10, 0], rk[0, 7, 0]), torch.einsum("d,d->", rq[0, 40, 0], rk[0, 37, 0])
    torch.testing.assert_close(dots[0], dots[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rq[:, 0], q[:, 0])  # position 0 is not rotated


def test_taps_are_what_attention_consumes():
    """Recompute attention by hand from the rope taps; it must equal the layer's SDPA output."""
    torch.manual_seed(0)
    model = Transformer(tiny(n_kv_head=2, qk_norm=True)).eval()
    attn = model.blocks[1].attn
    seen = {}
    for name in ("q_proj", "k_proj", "v_proj", "q_norm", "k_norm", "q_rope", "k_rope"):
        getattr(attn, f"hook_{name}").register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, o))
    outputs = {}
    attn.register_forward_hook(lambda m, i, o: outputs.__setitem__("y", o))
    model(torch.randint(0, 97, (2, 32)))
    q, k, v = seen["q_rope"], seen["k_rope"], seen["v_proj"]  # (B, T, H, D), k and v with 2 heads
    k, v = k.repeat_interleave(2, dim=2), v.repeat_interleave(2, dim=2)
    scores = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(16)
    scores = scores.masked_fill(torch.ones(32, 32, dtype=torch.bool).triu(1), float("-inf"))
    y = torch.einsum("bhts,bshd->bthd", scores.softmax(-1), v).reshape(2, 32, 64)
    torch.testing.assert_close(attn.wo(y), outputs["y"], rtol=1e-4, atol=1e-5)
    # QK-Norm: unit RMS per head (gain is 1 at init); and the norm tap differs from the proj tap
    torch.testing.assert_close(seen["k_norm"].pow(2).mean(-1), torch.ones(2, 32, 2), rtol=1e-4, atol=1e-4)
    cos, sin = model.rope_cos, model.rope_sin
    torch.testing.assert_close(seen["k_rope"], apply_rope(seen["k_norm"], cos, sin))


def test_without_qk_norm_the_norm_tap_equals_the_projection():
    model = Transformer(tiny())
    seen = {}
    a = model.blocks[0].attn
    a.hook_k_proj.register_forward_hook(lambda m, i, o: seen.__setitem__("proj", o))
    a.hook_k_norm.register_forward_hook(lambda m, i, o: seen.__setitem__("norm", o))
    model(torch.randint(0, 97, (1, 32)))
    assert torch.equal(seen["proj"], seen["norm"])
    assert not any("q_norm" in n or "k_norm" in n for n, _ in model.named_parameters())


def test_qk_norm_gain_switch_and_tied_head():
    names = dict(Transformer(tiny(qk_norm=True)).named_parameters())
    assert "blocks.0.attn.k_norm.weight" in names and "lm_head.weight" in names
    names = dict(Transformer(tiny(qk_norm=True, qk_norm_gain=False, tie_embeddings=True)).named_parameters())
    assert "blocks.0.attn.k_norm.weight" not in names and "lm_head.weight" not in names


def test_probe_rows_match_an_independent_eigendecomposition():
    torch.manual_seed(0)
    model = Transformer(tiny(n_kv_head=2))
    tokens = torch.randint(0, 97, (6, 32))
    captured = []
    model.blocks[1].attn.hook_k_rope.register_forward_hook(lambda m, i, o: captured.append(o.detach()))
    rows = probe_model(model, tokens, batch_size=4)
    k = torch.cat(captured).reshape(-1, 2, 16).double()  # (N, Hkv, D)
    row = next(r for r in rows if (r["tap"], r["tensor"], r["layer"]) == ("rope", "k", 1))
    assert row["n"] == 6 * 32 and row["dim"] == 16 and len(row["pr_heads"]) == 2
    for h in range(2):
        lam = torch.linalg.eigvalsh(torch.cov(k[:, h].T, correction=0))
        assert row["pr_heads"][h] == pytest.approx((lam.sum() ** 2 / (lam**2).sum()).item(), rel=1e-9)
    assert row["pr"] == pytest.approx(sum(row["pr_heads"]) / 2)
    # every tap of every layer: q/k at three points, v after projection
    assert {(r["tap"], r["tensor"]) for r in rows} == {
        ("proj", "q"), ("proj", "k"), ("proj", "v"), ("norm", "q"), ("norm", "k"), ("rope", "q"), ("rope", "k")}
    assert len(rows) == 7 * 2
    assert model.training  # probing restores the mode


def test_flops_per_token_counts_6n_plus_attention():
    cfg = tiny()
    model = Transformer(cfg)
    n = model.num_params() - model.tok_emb.weight.numel()
    assert model.flops_per_token() == 6 * n + 12 * 2 * 4 * 16 * 32


@pytest.mark.slow
def test_regional_compile_matches_eager_and_leaves_the_module_eager():
    """train.compile = "regional": each block and the loss head compiled on their own (Inductor on the
    CPU here) give the eager loss and gradients, one compiled block serves every layer, and the module
    itself stays eager, so probe hooks never enter a compiled graph."""
    import torch._dynamo

    from rankprobe.loop import compile_regions

    torch.manual_seed(0)
    model = Transformer(tiny(n_layer=3, qk_norm=True))
    x, y = torch.randint(0, 97, (2, 32)), torch.randint(0, 97, (2, 32))
    model(x, y).backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    step = compile_regions(model, model)
    loss = step(x, y)
    loss.backward()
    assert loss.item() == pytest.approx(model(x, y).item(), rel=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], rtol=1e-5, atol=1e-6, msg=n)
    assert counters["stats"]["unique_graphs"] == 2  # one block graph for 3 layers, one for the head
    assert type(model.blocks[0]) is not torch._dynamo.eval_frame.OptimizedModule

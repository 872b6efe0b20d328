"""QK-Clip: the tracked max logit is the true one, clipping bounds it at tau on the same inputs, and
heads (with QK-Norm: layers) under tau are left bit-identical."""

import math

import pytest
import torch

from rankprobe.config import ModelConfig, OptimConfig
from rankprobe.model import Transformer
from rankprobe.optim.build import build_optimizers
from rankprobe.optim.qkclip import MaxLogitTracker, QKClip, max_logits, qk_clip_


def tiny(**kw) -> Transformer:
    torch.manual_seed(0)
    base = dict(n_layer=2, d_model=64, n_head=4, head_dim=16, seq_len=16, vocab_size=97)
    model = Transformer(ModelConfig(**{**base, **kw}))
    with torch.no_grad():  # logits of order 10-100 instead of 0.1, spread over heads
        for i, b in enumerate(model.blocks):
            b.attn.wq.weight.mul_(torch.linspace(10, 60, b.attn.n_head).repeat_interleave(16)[:, None] * (i + 1))
            b.attn.wk.weight.mul_(15)
    return model


def test_max_logits_by_hand_with_gqa_and_any_budget():
    q, k = torch.randn(2, 12, 4, 8), torch.randn(2, 12, 2, 8)
    want = torch.full((4,), -math.inf)
    for h in range(4):
        for b in range(2):
            for t in range(12):
                want[h] = max(want[h], (k[b, : t + 1, h // 2] @ q[b, t, h]).max() * 0.3)
    torch.testing.assert_close(max_logits(q, k, 0.3), want)
    torch.testing.assert_close(max_logits(q, k, 0.3, budget=1), want)


def replay(model, tokens) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Run a training-mode forward with a tracker; return each layer's attention input and S_max."""
    inputs = []
    hooks = [b.attn.register_forward_pre_hook(lambda m, args: inputs.append(args[0].detach())) for b in model.blocks]
    tracker = MaxLogitTracker(model)
    model.train()
    with torch.no_grad():
        model(tokens)
    for h in hooks:
        h.remove()
    tracker.remove()
    return inputs, tracker.max.clone()


def layer_max(model, inputs) -> torch.Tensor:
    """S_max (L, H) of each layer recomputed on the attention inputs it saw before the clip."""
    tracker = MaxLogitTracker(model)
    with torch.no_grad():
        for b, x in zip(model.blocks, inputs):
            b.attn(x, model.rope_cos, model.rope_sin)
    tracker.remove()
    return tracker.max


def test_tracker_can_score_only_the_first_sequences():
    model = tiny(n_kv_head=2)
    tokens = torch.randint(0, 97, (3, 16))
    _, full = replay(model, tokens)
    _, first = replay(model, tokens[:1])
    tracker = MaxLogitTracker(model, sequences=1)
    with torch.no_grad():
        model(tokens)
    tracker.remove()
    assert torch.equal(tracker.max, first) and (first <= full).all() and (first < full).any()


def split_tau(s_max: torch.Tensor) -> float:
    return s_max.flatten().median().item()


@pytest.mark.parametrize("kw", [dict(), dict(n_kv_head=2)])
def test_clip_bounds_the_logit_and_leaves_heads_under_tau_untouched(kw):
    model = tiny(**kw)
    tokens = torch.randint(0, 97, (3, 16))
    inputs, s_max = replay(model, tokens)
    tau = split_tau(s_max)
    over = s_max > tau
    assert over.any() and (~over).any()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    gamma = qk_clip_(model, s_max, tau)
    torch.testing.assert_close(gamma, torch.where(over, tau / s_max, torch.ones_like(s_max)))
    after = layer_max(model, inputs)
    assert (after[over] <= tau * (1 + 1e-5)).all() and (after[over] >= tau * (1 - 1e-4)).all()
    assert torch.equal(after[~over], s_max[~over])  # same weights, same inputs: bit-identical logits
    gqa = model.cfg.n_kv_head not in (0, model.cfg.n_head)
    for layer, b in enumerate(model.blocks):
        q_new = b.attn.wq.weight.view(4, 16, 64)
        q_old = before[f"blocks.{layer}.attn.wq.weight"].view(4, 16, 64)
        k_new, k_old = b.attn.wk.weight, before[f"blocks.{layer}.attn.wk.weight"]
        for h in range(4):
            assert torch.equal(q_new[h], q_old[h]) == (not over[layer, h])
        if gqa:  # shared key heads are never touched
            assert torch.equal(k_new, k_old)
        else:
            for h in range(4):
                assert torch.equal(k_new.view(4, 16, 64)[h], k_old.view(4, 16, 64)[h]) == (not over[layer, h])
    for name, p in model.named_parameters():
        if ".wq." not in name and ".wk." not in name:
            assert torch.equal(p, before[name]), name


def test_with_qk_norm_the_gains_are_clipped_per_layer():
    model = tiny(qk_norm=True)
    with torch.no_grad():  # gains large enough for logits over tau; layer 1 larger than layer 0
        for i, b in enumerate(model.blocks):
            b.attn.q_norm.weight.fill_(3.0 * (i + 1))
            b.attn.k_norm.weight.uniform_(1.0, 3.0)
    tokens = torch.randint(0, 97, (3, 16))
    inputs, s_max = replay(model, tokens)
    layer_top = s_max.amax(1)
    assert layer_top[1] > layer_top[0]
    tau = (layer_top[0] + layer_top[1]).item() / 2
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    qk_clip_(model, s_max, tau)
    after = layer_max(model, inputs)
    assert after[1].max() <= tau * (1 + 1e-5) and after[1].max() >= tau * (1 - 1e-4)
    torch.testing.assert_close(after[1], s_max[1] * tau / layer_top[1])  # the whole layer scales
    assert torch.equal(after[0], s_max[0])
    for name, p in model.named_parameters():
        changed = name in ("blocks.1.attn.q_norm.weight", "blocks.1.attn.k_norm.weight")
        assert torch.equal(p, before[name]) != changed, name
    # without gains the logit is bounded by sqrt(D) and nothing can be clipped
    plain = tiny(qk_norm=True, qk_norm_gain=False)
    _, s = replay(plain, tokens)
    assert (s <= math.sqrt(16) * (1 + 1e-5)).all()
    assert torch.equal(qk_clip_(plain, s, tau=0.5), torch.ones_like(s))


def test_training_loop_use_resets_and_skips_eval_forwards():
    model = tiny()
    clip = QKClip(model, tau=50.0)
    (opt,), _ = build_optimizers(model, OptimConfig(name="adamw", lr=1e-3), "cpu")
    tokens = torch.randint(0, 97, (2, 16))
    model.eval()
    with torch.no_grad():
        model(tokens)
    assert torch.isinf(clip.tracker.max).all()  # eval forwards are not recorded
    model.train()
    for _ in range(2):
        model(tokens, tokens).backward()
        opt.step()
        opt.zero_grad()
        observed = clip.tracker.max.clone()
        gamma = clip.step()
        assert torch.isinf(clip.tracker.max).all()
        assert (gamma <= 1).all() and ((gamma < 1) == (observed > 50.0)).all()
    _, s = replay(model, tokens)  # the last clip holds on the batch it saw (up to this step's update)
    assert s.max() < 50.0 * 1.5
    clip.close()
    assert not model.blocks[0].attn.hook_k_rope._forward_hooks
    with pytest.raises(RuntimeError, match="recorded no logits"):  # e.g. hooks lost to torch.compile
        QKClip(model).step()

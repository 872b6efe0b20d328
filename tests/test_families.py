"""Every supported Hugging Face family, probed on a tiny random model built here (nothing downloaded).

Known answers come from the model's own modules, not from the adapter: key PR from hooks on the
key projection (sliced here by hand where it is fused) and the key norm, in float64; attention
entropy from the model's own eager attention probabilities (`output_attentions`), and the max logit
from the pre-softmax logits its eager attention forms, so scales, soft-caps and masks (causal,
sliding window, per-layer attention types) are the model's, not assumed."""

import math

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from rankprobe.probes.capture import adapter_for  # noqa: E402
from rankprobe.probes.families import SUPPORTED  # noqa: E402
from rankprobe.probes.lenses import probe_lenses  # noqa: E402

V, B, T = 128, 2, 20
WINDOW = 6  # shorter than T, so a lens that ignored the window would be far off
LLAMA = dict(hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
             num_hidden_layers=2, vocab_size=V, max_position_embeddings=64)


def config(name: str):
    import transformers as tf

    two = ["sliding_attention", "full_attention"]
    return {
        "llama": lambda: tf.LlamaConfig(**LLAMA),
        "mistral": lambda: tf.MistralConfig(**LLAMA, sliding_window=WINDOW),
        "mixtral": lambda: tf.MixtralConfig(**LLAMA, num_local_experts=2, num_experts_per_tok=1, sliding_window=WINDOW),
        "qwen2": lambda: tf.Qwen2Config(**LLAMA, use_sliding_window=True, sliding_window=WINDOW, layer_types=two),
        "qwen2_moe": lambda: tf.Qwen2MoeConfig(**LLAMA, num_experts=2, num_experts_per_tok=1, moe_intermediate_size=16,
                                               shared_expert_intermediate_size=16),
        "qwen3": lambda: tf.Qwen3Config(**LLAMA, head_dim=16),
        "qwen3_moe": lambda: tf.Qwen3MoeConfig(**LLAMA, head_dim=16, num_experts=2, num_experts_per_tok=1,
                                               moe_intermediate_size=16),
        "gemma": lambda: tf.GemmaConfig(**LLAMA, head_dim=8),
        "gemma2": lambda: tf.Gemma2Config(**LLAMA, head_dim=8, sliding_window=WINDOW, query_pre_attn_scalar=24,
                                          attn_logit_softcapping=3.0, layer_types=two),
        "gemma3_text": lambda: tf.Gemma3TextConfig(**LLAMA, head_dim=8, sliding_window=WINDOW, query_pre_attn_scalar=24,
                                                   layer_types=two),
        "phi": lambda: tf.PhiConfig(**LLAMA, partial_rotary_factor=0.5, qk_layernorm=True),
        "phi3": lambda: tf.Phi3Config(**LLAMA, pad_token_id=0, partial_rotary_factor=0.5),
        "olmo": lambda: tf.OlmoConfig(**LLAMA, pad_token_id=0),
        "olmo2": lambda: tf.Olmo2Config(**LLAMA, pad_token_id=0),
        "falcon": lambda: tf.FalconConfig(hidden_size=32, num_attention_heads=4, num_kv_heads=2, num_hidden_layers=2,
                                          vocab_size=V, new_decoder_architecture=True, max_position_embeddings=64),
        "gpt_neox": lambda: tf.GPTNeoXConfig(hidden_size=32, intermediate_size=48, num_attention_heads=4,
                                             num_hidden_layers=2, vocab_size=V, rotary_pct=0.5,
                                             max_position_embeddings=64),
        "gpt2": lambda: tf.GPT2Config(n_embd=32, n_head=4, n_layer=2, vocab_size=V, n_positions=64,
                                      scale_attn_by_inverse_layer_idx=True),
        "stablelm": lambda: tf.StableLmConfig(**LLAMA, partial_rotary_factor=0.25, qk_layernorm=True,
                                              use_qkv_bias=True),
        "granite": lambda: tf.GraniteConfig(**LLAMA, attention_multiplier=0.5),
        "granitemoe": lambda: tf.GraniteMoeConfig(**LLAMA, attention_multiplier=0.5, num_local_experts=2,
                                                  num_experts_per_tok=1),
        "smollm3": lambda: tf.SmolLM3Config(**LLAMA, pad_token_id=0, no_rope_layers=[1, 0]),
        "cohere": lambda: tf.CohereConfig(**LLAMA, use_qk_norm=True, head_dim=8),
        "starcoder2": lambda: tf.Starcoder2Config(**LLAMA, sliding_window=WINDOW),
    }[name]()


def independent_keys(name, attn, out):
    """The keys (B, T, Hkv, D) in a projection's output, sliced as the family's forward slices them."""
    H, Hkv, D = 4, 4 if name in ("gpt2", "gpt_neox") else 2, getattr(attn, "head_dim", None) or attn.head_size
    if name == "gpt2":
        return out.split(32, -1)[1].unflatten(-1, (H, -1))
    if name == "gpt_neox":
        return out.view(B, T, H, 3 * D)[..., D : 2 * D]
    if name == "falcon":
        return out.view(B, T, Hkv, H // Hkv + 2, D)[:, :, :, -2]
    if name == "phi3":
        return out[..., H * D : (H + Hkv) * D].unflatten(-1, (Hkv, D))
    return out.unflatten(-1, (Hkv, D)) if out.ndim == 3 else out


def key_modules(name, attn):
    """(tap, module, to (B, T, Hkv, D)) for the key projection and the key norm of a layer."""
    fused = {"gpt2": "c_attn", "gpt_neox": "query_key_value", "falcon": "query_key_value", "phi3": "qkv_proj"}
    found = [("proj", attn.get_submodule(fused.get(name, "k_proj")), lambda out: independent_keys(name, attn, out))]
    for norm in ("k_norm", "k_layernorm"):
        if getattr(attn, norm, None) is not None:
            layout = {"gemma3_text": "bhtd", "phi": "bhtd", "stablelm": "bhtd"}.get(name)
            found.append(("norm", getattr(attn, norm), (lambda out: out.transpose(1, 2)) if layout else
                          (lambda out: independent_keys(name, attn, out))))
    return found


def pr64(x: torch.Tensor) -> float:
    """Mean over heads of the PR of the centered covariance, in float64 with numpy."""
    x = x.detach().double().reshape(-1, x.size(-2), x.size(-1)).numpy()
    prs = []
    for h in range(x.shape[1]):
        c = np.cov(x[:, h].T, bias=True)
        prs.append(np.trace(c) ** 2 / (c * c).sum())
    return float(np.mean(prs))


@pytest.mark.parametrize("name", SUPPORTED)
def test_family_key_pr_and_attention_match_the_models_own_computation(name, monkeypatch):
    torch.manual_seed(0)
    cfg = config(name)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()  # SDPA where the family has it
    with torch.no_grad():  # sharper attention than at init, so entropies and max logits tell layers apart
        for n, p in model.named_parameters():
            if p.ndim == 2 and any(s in n for s in ("q_proj", "k_proj", "qkv", "c_attn", "query_key_value")):
                p.mul_(4.0)
    tokens = torch.randint(0, V, (B, T))
    adapter = adapter_for(model)
    layers = adapter.layers
    assert adapter.n_layer == 2 and len(adapter.weights()) == 2

    rows, attn_rows = probe_lenses(model, tokens, batch_size=1)
    seen, handles = {}, []
    for i, attn in enumerate(layers):
        for tap, module, to_keys in key_modules(name, attn):
            handles.append(module.register_forward_hook(
                lambda _m, _i, out, key=(tap, i), f=to_keys: seen.__setitem__(key, f(out))))
    with torch.no_grad():  # the whole probe set in one batch, through the model's own modules
        model(input_ids=tokens, use_cache=False)
    for h in handles:
        h.remove()
    got = {(r["tap"], r["layer"]): r["pr"] for r in rows if r["tensor"] == "k"}
    assert {(r["tap"], r["tensor"]) for r in rows} == {(t, x) for t in ("proj", "norm", "rope") for x in "qk"} | {
        ("proj", "v")}
    for (tap, i), keys in seen.items():
        assert keys.shape[-2:] == (adapter.kv_heads, adapter.head_dim)
        assert math.isclose(got[(tap, i)], pr64(keys), rel_tol=1e-6), (tap, i)
    if not any(tap == "norm" for tap, _ in seen):  # no QK-Norm: the norm tap is the projection
        assert all(got[("norm", i)] == got[("proj", i)] for i in range(2))

    logits = []  # the model's own pre-softmax logits, as its eager attention forms them
    softmax = torch.nn.functional.softmax

    def spy(x, *args, **kwargs):
        if x.ndim == 4 and x.shape[-2:] == (T, T):
            logits.append(x.detach().double())
        return softmax(x, *args, **kwargs)

    eager = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    eager.load_state_dict(model.state_dict())
    monkeypatch.setattr(torch.nn.functional, "softmax", spy)
    with torch.no_grad():
        probs = eager(input_ids=tokens, output_attentions=True, use_cache=False).attentions  # (B, H, T, T) a layer
    monkeypatch.undo()
    assert len(attn_rows) == len(probs) == len(logits) == 2
    for row, p, s in zip(attn_rows, probs, logits):
        p = p.double()[:, :, 1:]  # rows t >= 1
        ent = -(p * p.clamp_min(1e-300).log()).sum(-1).mean((0, 2))  # (H,)
        np.testing.assert_allclose(row["entropy_heads"], ent.numpy(), rtol=2e-5, atol=1e-6)
        visible = s > -1e30  # the additive mask puts the dtype's minimum on hidden pairs
        want = s.masked_fill(~visible, -math.inf).amax((0, 2, 3))
        np.testing.assert_allclose(row["max_logit_heads"], want.numpy(), rtol=1e-4, atol=1e-4)
        n_keys = visible[0, 0, 1:].sum(-1).double()
        np.testing.assert_allclose(row["entropy_max"], n_keys.log().mean().item(), rtol=1e-9)


def test_a_mask_the_lens_does_not_assume_is_refused_not_measured():
    """Mistral slides a window; an adapter that claimed plain causal attention is stopped by the check
    on the kernel call instead of reporting the entropy of attention the model does not compute."""
    from rankprobe.config import DataError
    from rankprobe.probes.adapters import AttentionSpec

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config("mistral")).eval()
    adapter = adapter_for(model)
    assert [s.window for s in adapter.specs] == [WINDOW, WINDOW]
    adapter.specs[1] = AttentionSpec(scale=adapter.specs[1].scale)
    with pytest.raises(DataError, match="layer 1: attention slides a window of 6, expected None"):
        probe_lenses(model, torch.randint(0, V, (B, T)), batch_size=2)
    assert model.config._attn_implementation == "sdpa"  # the interception is undone after the error


class NanoAttention(torch.nn.Module):
    """nanoGPT's CausalSelfAttention: one fused c_attn, q | k | v blocks, SDPA."""

    def __init__(self, d: int, H: int):
        super().__init__()
        self.H, self.c_attn, self.c_proj = H, torch.nn.Linear(d, 3 * d), torch.nn.Linear(d, d)

    def forward(self, x):
        Bx, Tx, d = x.shape
        q, k, v = (t.view(Bx, Tx, self.H, -1).transpose(1, 2) for t in self.c_attn(x).split(d, dim=2))
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(Bx, Tx, d))


def test_any_module_is_probed_from_module_name_patterns():
    from rankprobe.probes.adapters import ModuleAdapter, Patterns

    torch.manual_seed(0)
    d, H = 32, 4
    emb = torch.nn.Embedding(V, d)
    h = torch.nn.ModuleList(torch.nn.ModuleDict({"attn": NanoAttention(d, H)}) for _ in range(2))
    model = torch.nn.ModuleDict({"emb": emb, "h": h})

    def forward(m, idx):
        x = m["emb"](idx) * 4
        for block in m["h"]:
            x = x + block["attn"](x)
        return x

    adapter = ModuleAdapter(model, Patterns(layers="h.*.attn", qkv="c_attn", o="c_proj"), heads=H, head_dim=d // H,
                            forward=forward)
    tokens = torch.randint(0, V, (B, T))
    rows, attn_rows = probe_lenses(adapter, tokens, batch_size=1)
    x, want_pr, want_ent = emb(tokens) * 4, [], []
    with torch.no_grad():
        for block in h:
            a = block["attn"]
            q, k, _ = (t.unflatten(-1, (H, -1)) for t in a.c_attn(x).split(d, -1))  # (B, T, H, D)
            want_pr.append(pr64(k))
            s = torch.einsum("bthd,bshd->bhts", q.double(), k.double()) / math.sqrt(d // H)
            p = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), -math.inf).softmax(-1)[:, :, 1:]
            want_ent.append(-(p * p.clamp_min(1e-300).log()).sum(-1).mean((0, 2)))
            x = x + a(x)
    got = {(r["tap"], r["layer"]): r["pr"] for r in rows if r["tensor"] == "k"}
    for i in range(2):
        assert all(math.isclose(got[(tap, i)], want_pr[i], rel_tol=1e-6) for tap in ("proj", "norm", "rope"))
        np.testing.assert_allclose(attn_rows[i]["entropy_heads"], want_ent[i].numpy(), rtol=1e-5)
    assert [w["q"][0].shape for w in adapter.weights()] == [(d, d)] * 2

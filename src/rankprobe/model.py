"""The LLaMA-style decoder RankProbe trains: pre-norm RMSNorm, RoPE, SwiGLU, grouped-query attention.

Read top to bottom: RMSNorm and RoPE helpers, Attention (with the probe taps), MLP, Block, Transformer.

Probe taps are `nn.Identity` modules, so probes attach forward hooks and `forward` never changes
(the TransformerLens idea). Each attention layer has, for q and k:
  hook_{q,k}_proj  after the W_q / W_k projection, shape (B, T, H, D)
  hook_{q,k}_norm  after QK-Norm (the same values as *_proj when QK-Norm is off)
  hook_{q,k}_rope  after RoPE: exactly what scaled-dot-product attention consumes
and hook_v_proj for values (never normed or rotated). The headline key PR reads `hook_k_norm`
(`probe.tap = "norm"`): see docs/probes.md for why.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import Config, ModelConfig, parse_arm

TAPS = ("proj", "norm", "rope")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, gain: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if gain else None

    def forward(self, x):
        # Under bf16 autocast q and k arrive in bf16: a gain of the same dtype keeps the fused kernel
        # (a float32 gain makes PyTorch fall back to the unfused path, seen on H100 with torch 2.11).
        weight = None if self.weight is None else self.weight.to(x.dtype)
        return F.rms_norm(x, (x.size(-1),), weight, self.eps)


def rope_tables(seq_len: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (T, D/2): pair i rotates at frequency theta^(-2i/D) (Su et al., 2021)."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, T, H, D) by position, half-split pairing (dims i and i + D/2) as in HF Llama."""
    T = x.size(1)
    cos, sin = cos[:T, None, :].to(x.dtype), sin[:T, None, :].to(x.dtype)  # (T, 1, D/2)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.head_dim
        self.n_kv_head = cfg.n_kv_head or cfg.n_head
        D = cfg.head_dim
        self.wq = nn.Linear(cfg.d_model, self.n_head * D, bias=False)
        self.wk = nn.Linear(cfg.d_model, self.n_kv_head * D, bias=False)
        self.wv = nn.Linear(cfg.d_model, self.n_kv_head * D, bias=False)
        self.wo = nn.Linear(self.n_head * D, cfg.d_model, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(D, cfg.norm_eps, cfg.qk_norm_gain)
            self.k_norm = RMSNorm(D, cfg.norm_eps, cfg.qk_norm_gain)
        else:
            self.q_norm, self.k_norm = nn.Identity(), nn.Identity()
        for name in ("q_proj", "k_proj", "v_proj", "q_norm", "k_norm", "q_rope", "k_rope"):
            setattr(self, f"hook_{name}", nn.Identity())

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        H, Hkv, D = self.n_head, self.n_kv_head, self.head_dim
        q = self.hook_q_proj(self.wq(x).view(B, T, H, D))
        k = self.hook_k_proj(self.wk(x).view(B, T, Hkv, D))
        v = self.hook_v_proj(self.wv(x).view(B, T, Hkv, D))
        q = self.hook_q_norm(self.q_norm(q))
        k = self.hook_k_norm(self.k_norm(k))
        q = self.hook_q_rope(apply_rope(q, cos, sin))
        k = self.hook_k_rope(apply_rope(k, cos, sin))
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=Hkv != H)
        return self.wo(y.transpose(1, 2).reshape(B, T, H * D))


class MLP(nn.Module):
    """SwiGLU (Shazeer, 2020): w_down(silu(w_gate x) * w_up x)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden = cfg.mlp_hidden or 64 * math.ceil(8 * cfg.d_model / 3 / 64)
        self.w_gate = nn.Linear(cfg.d_model, hidden, bias=False)
        self.w_up = nn.Linear(cfg.d_model, hidden, bias=False)
        self.w_down = nn.Linear(hidden, cfg.d_model, bias=False)

    def forward(self, x):
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin):
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError("model.vocab_size must be resolved from the tokenizer before building")
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm_f = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        cos, sin = rope_tables(cfg.seq_len, cfg.head_dim, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if p.ndim == 2:
                nn.init.normal_(p, std=std)
            else:
                nn.init.ones_(p)
        # GPT-2 / nanoGPT: scale residual-branch outputs by 1/sqrt(2L) so the stream does not grow with depth.
        for block in self.blocks:
            nn.init.normal_(block.attn.wo.weight, std=std / math.sqrt(2 * self.cfg.n_layer))
            nn.init.normal_(block.mlp.w_down.weight, std=std / math.sqrt(2 * self.cfg.n_layer))

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, regions=None):
        """idx (B, T) token ids -> logits (B, T, V), or the mean cross-entropy when targets are given.

        `regions` = (blocks, head) stands in for `self.blocks` and `self.head`: compiled wrappers of
        them (train.py, `train.compile = "regional"`), so the module itself stays eager for probes."""
        blocks, head = (self.blocks, self.head) if regions is None else regions
        x = self.tok_emb(idx)  # (B, T, d)
        for block in blocks:
            x = block(x, self.rope_cos, self.rope_sin)
        return head(x, targets)

    def head(self, x: torch.Tensor, targets: torch.Tensor | None = None):
        """Final norm and unembedding of the residual stream x (B, T, d): logits, or the mean cross-entropy."""
        x = self.norm_f(x)
        weight = self.tok_emb.weight if self.lm_head is None else self.lm_head.weight
        logits = F.linear(x, weight)  # (B, T, V)
        if targets is None:
            return logits
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1))

    def tap_modules(self) -> dict[tuple[str, str, int], nn.Module]:
        """(tap, tensor, layer) -> the identity module to hook, for every tap the model has."""
        out = {}
        for i, block in enumerate(self.blocks):
            a = block.attn
            for tap in TAPS:
                out[(tap, "q", i)] = getattr(a, f"hook_q_{tap}")
                out[(tap, "k", i)] = getattr(a, f"hook_k_{tap}")
            out[("proj", "v", i)] = a.hook_v_proj
        return out

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self) -> float:
        """6N + 12·L·d_attn·T training FLOPs per token (PaLM appendix B), N without the embedding."""
        c = self.cfg
        n = self.num_params() - self.tok_emb.weight.numel()
        if self.lm_head is None:
            n += self.tok_emb.weight.numel()  # tied: the head matmul still costs 6·V·d
        return 6 * n + 12 * c.n_layer * c.n_head * c.head_dim * c.seq_len


# ---------------------------------------------------------------------------------------------
# sizes before anything is built


def param_count(m: ModelConfig, vocab_size: int) -> tuple[int, int]:
    """(all parameters, those in the blocks' 2-D matrices) of the decoder rankprobe.model builds from `m`
    with `vocab_size` tokens: arithmetic only, so a size is judged before anything is allocated."""
    hidden = m.mlp_hidden or 64 * math.ceil(8 * m.d_model / 3 / 64)
    kv = m.n_kv_head or m.n_head
    attn = m.d_model * m.head_dim * (2 * m.n_head + 2 * kv)
    matrices = m.n_layer * (attn + 3 * m.d_model * hidden)
    norms = m.n_layer * (2 * m.d_model + (2 * m.head_dim if m.qk_norm and m.qk_norm_gain else 0)) + m.d_model
    embeddings = vocab_size * m.d_model * (1 if m.tie_embeddings else 2)
    return matrices + norms + embeddings, matrices


def state_bytes(cfg: Config) -> int:
    """Bytes of fp32 weights, gradients and optimizer state of `cfg`'s run: 4 + 4 + 8 per parameter under
    AdamW (two moments); Muon keeps one momentum buffer for the hidden matrices. Every other optimizer is
    counted like AdamW; so are RoPE's tables. Activations are left out: they depend on batch, compile and
    kernels."""
    vocab = cfg.model.vocab_size or cfg.data.vocab_size  # a .tiktoken tokenizer's size is unknown here
    total, matrices = param_count(cfg.model, vocab)
    names = {cfg.optim.name, *cfg.sweep.optimizers, *(parse_arm(a)[0] for a in cfg.sweep.arms)}
    moments = 1 if names == {"muon"} else 2
    rope = 2 * 4 * cfg.model.seq_len * (cfg.model.head_dim // 2)  # the cos and sin tables, fp32
    return 16 * total - (2 - moments) * 4 * matrices + rope

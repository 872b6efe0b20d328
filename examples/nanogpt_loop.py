"""RankProbe in a plain nanoGPT-style training loop: the five lines marked `# RankProbe`.

The model is nanoGPT's (a fused `c_attn` projection, `c_proj`, causal SDPA, learned positions), small
enough for a CPU, trained on the bytes of RankProbe's embedded corpus. Nothing in the model knows about
RankProbe: the Monitor finds its attention layers from module names (`Patterns`), splits the fused
QKV into heads, and at every `--every`-th step folds the training forward's own q, k, v into float64
statistics (no extra forward). Rows land in OUT/metrics.jsonl (and TensorBoard with --tensorboard);
read them back with `rankprobe.load(OUT)`. On a GPU the Monitor's host work runs in the background, so
a measured step hands back the rows of the measurement before it (each row carries its own `step`)
and `flush` the last ones; on the CPU each step's rows come at once. This loop prints them either way.

    python examples/nanogpt_loop.py --steps 200 --every 50 --out nanogpt-rankprobe
"""

from __future__ import annotations

import argparse
import copy
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from rankprobe import Monitor, Patterns  # RankProbe
from rankprobe.monitor import scalars_by_step


@dataclass
class GPTConfig:
    block_size: int = 64
    vocab_size: int = 256  # bytes
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 64


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)  # q, k, v of every head in one matmul
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.c_fc, self.c_proj = nn.Linear(cfg.n_embd, 4 * cfg.n_embd), nn.Linear(4 * cfg.n_embd, cfg.n_embd)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1, self.attn = nn.LayerNorm(cfg.n_embd), CausalSelfAttention(cfg)
        self.ln_2, self.mlp = nn.LayerNorm(cfg.n_embd), MLP(cfg)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(cfg.vocab_size, cfg.n_embd), wpe=nn.Embedding(cfg.block_size, cfg.n_embd),
            h=nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer)), ln_f=nn.LayerNorm(cfg.n_embd)))
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)

    def forward(self, idx, targets=None):
        pos = torch.arange(idx.size(1), device=idx.device)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))
        loss = None if targets is None else F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return logits, loss


# where the monitor finds the attention of this model: nanoGPT's fused QKV, [q | k | v] blocks
TAPS = dict(patterns=Patterns(layers="transformer.h.*.attn", qkv="c_attn", o="c_proj"), heads=GPTConfig.n_head)
LAST: dict = {}  # what the test of this example inspects


def batches(cfg: GPTConfig, batch_size: int, seed: int = 0):
    from rankprobe.data.corpus import load_corpus

    data = torch.frombuffer(bytearray(load_corpus("embedded").text[:200_000].encode()), dtype=torch.uint8).long()
    g = torch.Generator().manual_seed(seed)
    while True:
        i = torch.randint(0, data.numel() - cfg.block_size - 1, (batch_size,), generator=g)
        x = torch.stack([data[j : j + cfg.block_size] for j in i.tolist()])
        yield x, torch.stack([data[j + 1 : j + 1 + cfg.block_size] for j in i.tolist()])


def show(rows: list[dict], losses: dict[int, float], head_dim: int) -> None:
    """Print the key PR per layer of each step in `rows` (the rows a measurement or `flush` emitted)."""
    for step, k in scalars_by_step(rows).items():
        pr = [v for name, v in sorted(k.items()) if name.startswith("rankprobe/k_pr/")]
        print(f"step {step:4d}  loss {losses[step]:.3f}  key PR per layer {[round(v, 2) for v in pr]}"
              f"  (head dim {head_dim})")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--every", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--out", default="nanogpt-rankprobe")
    p.add_argument("--tensorboard", action="store_true")
    p.add_argument("--background", action="store_true", help="host work on a worker thread on the CPU too")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    cfg = GPTConfig()
    model = GPT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    monitor = Monitor(model, **TAPS, every=args.every, out=args.out,  # RankProbe
                      sinks=("tensorboard",) if args.tensorboard else (), background=args.background or None)
    rows, losses = [], {}
    for step, (x, y) in zip(range(args.steps), batches(cfg, args.batch_size)):
        tokens_seen = step * x.numel()
        LAST.update(model_at=copy.deepcopy(model) if monitor.due(step) else None, batch=x)
        with monitor.watch(step, tokens_seen):  # RankProbe: hooks on the forward of every `every`-th step
            _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses[step] = loss.item()
        monitor.log("train", step + 1, tokens_seen + x.numel(), loss=losses[step])  # RankProbe (optional)
        if monitor.due(step):
            rows += monitor.last  # what this measured step emitted (its own rows, or the previous one's)
            show(monitor.last, losses, cfg.n_embd // cfg.n_head)
            LAST[f"model_at_{step}"], LAST[f"batch_at_{step}"] = LAST["model_at"], x
    last = monitor.flush()  # the last measurement's rows, when they were made in the background
    rows += last
    show(last, losses, cfg.n_embd // cfg.n_head)
    monitor.close()  # RankProbe
    LAST["rows"] = rows
    assert all(math.isfinite(r.get("pr", 0.0)) for r in rows)


if __name__ == "__main__":
    main()

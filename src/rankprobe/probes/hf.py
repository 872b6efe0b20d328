"""Probe a pretrained checkpoint with RankProbe's taps and write a run folder `rankprobe report` reads.

Hugging Face causal LMs (Llama family incl. TinyLlama and Mistral, Qwen2, Qwen3, GPT-2) are loaded
from a local folder with `transformers`, never from a hub. Their forward has no identity taps, so
hooks rebuild the same three points per attention layer, (B, T, H, D) per head:
  proj  the q_proj / k_proj / v_proj output (GPT-2: the split of the fused c_attn output)
  norm  after QK-Norm (Qwen3's q_norm / k_norm); equal to proj for models without QK-Norm
  rope  the norm tap rotated by the model's own apply_rotary_pos_emb with the (cos, sin) the
        attention layer received; GPT-2 has no RoPE, so rope equals proj
RankProbe's own run folders (config.json + model.safetensors) load into `Transformer` too, so old
runs can be probed with new lenses. `probe_checkpoint_to_dir` writes run, probe, attn, weights and
end rows (docs/metrics.md, docs/lenses.md).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import torch

from ..config import DataConfig, DataError, ModelConfig, ProbeConfig, UserError, arm_label
from ..runlog import SCHEMA_VERSION, MetricsWriter, ensure_writable, env_info
from .capture import adapter_for
from .families import SUPPORTED, max_positions, text_config
from .lenses import probe_lenses, weight_lenses


def load_hf(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """A Hugging Face causal LM from the local folder `path` (no download), in eval mode.

    Raises DataError for a missing folder or a model_type outside SUPPORTED."""
    try:
        from transformers import AutoConfig, AutoModelForCausalLM
    except ImportError:
        raise UserError("probing Hugging Face checkpoints needs `transformers` (pip install transformers)") from None
    path = Path(path)
    if not (path / "config.json").is_file():
        raise DataError(f"{path} is not a checkpoint folder (no config.json)")
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    if text_config(config).model_type not in SUPPORTED:
        raise DataError(f"{path}: model_type {text_config(config).model_type!r} is not supported "
                        f"(supported: {', '.join(SUPPORTED)})")
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype)
    return model.to(device).eval()


def load_run_checkpoint(run_dir: str | Path, device: str | torch.device = "cpu"):
    """RankProbe's Transformer from a run folder's config.json and model.safetensors (safetensors
    only: nothing is unpickled), in eval mode."""
    from safetensors.torch import load_model

    from ..model import Transformer

    run_dir = Path(run_dir)
    cfg = json.loads((run_dir / "config.json").read_text())
    weights = run_dir / "model.safetensors"
    if not weights.is_file():
        raise DataError(f"{run_dir} has no model.safetensors (a run that did not finish?)")
    model = Transformer(ModelConfig(**cfg["model"]))
    try:
        load_model(model, str(weights), strict=True, device=str(device))
    except Exception as e:  # safetensors raises its own error type for a corrupt or truncated file
        raise DataError(f"cannot load {weights}: {str(e).splitlines()[0]}") from None
    return model.to(device).eval()


def is_run_folder(path: str | Path) -> bool:
    """True for a RankProbe run folder (its config.json has a `model` table), False for HF folders."""
    try:
        cfg = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(cfg.get("model"), dict) and "n_layer" in cfg["model"]


# ---------------------------------------------------------------------------------------------
# a run folder for `rankprobe report`


def hf_model_config(model) -> dict:
    """RankProbe's `model` table filled from an HF model (what the report reads: head_dim, n_layer)."""
    c, adapter = text_config(model.config), adapter_for(model)
    get = lambda *names, default=None: next((getattr(c, n) for n in names if getattr(c, n, None) is not None),  # noqa: E731
                                             default)
    rope = get("rope_parameters", default={}) or {}
    d = get("hidden_size", "n_embd")
    return asdict(ModelConfig(
        n_layer=adapter.n_layer, d_model=d, n_head=adapter.heads, n_kv_head=adapter.kv_heads,
        head_dim=adapter.head_dim, mlp_hidden=get("intermediate_size", "n_inner", "ffn_hidden_size", default=4 * d),
        seq_len=max_positions(c) or 0, vocab_size=c.vocab_size, qk_norm=adapter.has_qk_norm,
        tie_embeddings=bool(get("tie_word_embeddings", default=False)),
        rope_theta=float(rope.get("rope_theta", get("rope_theta", default=0.0))),
        norm_eps=float(get("rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon", default=1e-5)),
        init_std=float(get("initializer_range", default=0.02))))


def probe_checkpoint_to_dir(path: str | Path, tokens: torch.Tensor, out_dir: str | Path, batch_size: int = 8,
                            name: str | None = None, arm: str | None = None, force: bool = False,
                            device: str | torch.device = "cpu") -> Path:
    """Probe the checkpoint at `path` (an HF folder or a RankProbe run folder) on `tokens` (N, T) of
    its own vocabulary and write `out_dir/metrics.jsonl` (plus config.json, env.json): a `run` row
    (arm "hf:<model_type>" or "rankprobe:<arm>", optimizer "pretrained" for HF, probe_checkpoints
    [0]), then `probe`, `attn` and `weights` rows at step 0 / tokens 0, and a finished `end` row.
    Returns the metrics path. Refuses to replace an existing metrics.jsonl unless `force`."""
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    if (out_dir / "metrics.jsonl").exists() and not force:
        raise UserError(f"{out_dir} already holds a run (metrics.jsonl); pass --force to replace it")
    ensure_writable(out_dir)
    if is_run_folder(path):
        model = load_run_checkpoint(path, device)
        cfg = json.loads((Path(path) / "config.json").read_text())
        qk_norm, seed = bool(cfg["model"]["qk_norm"]), cfg["train"]["seed"]
        arm = arm or f"rankprobe:{arm_label(cfg['optim']['name'], qk_norm, cfg['optim'].get('qk_clip', False))}"
        optimizer = "pretrained"  # a finished checkpoint, drawn as a reference like any pretrained model
        source = {"path": str(path), "kind": "rankprobe"}
    else:
        model = load_hf(path, device=device)
        mt = model.config.model_type
        # only the tables that mean something for a model RankProbe did not train
        cfg = {"name": name or f"hf-{mt}", "model": hf_model_config(model),
               "probe": asdict(ProbeConfig(checkpoints=[0], n_checkpoints=1, tokens=int(tokens.numel())))}
        optimizer, qk_norm, seed, arm = "pretrained", cfg["model"]["qk_norm"], 0, arm or f"hf:{mt}"
        source = {"path": str(path), "kind": "hf", "model_type": mt,
                  "architectures": list(getattr(model.config, "architectures", None) or [])}
    vocab = cfg["model"]["vocab_size"]
    if tokens.ndim != 2 or tokens.numel() == 0 or int(tokens.max()) >= vocab or int(tokens.min()) < 0:
        raise DataError(f"tokens must be a non-empty (N, T) tensor of ids in [0, {vocab}); "
                        f"tokenize the probe text with the checkpoint's own tokenizer")
    name = name or cfg.get("name") or out_dir.name
    probe_rows, attn_rows = probe_lenses(model, tokens, batch_size)
    weight_rows = weight_lenses(model)
    env = env_info(next(model.parameters()).device)
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (out_dir / "env.json").write_text(json.dumps(env, indent=2) + "\n")
    m = cfg["model"]
    rows = [("run", {"schema": SCHEMA_VERSION, "run": name, "arm": arm, "optimizer": optimizer, "qk_norm": qk_norm,
                     "seed": seed, "config": cfg, "env": env, "n_params": sum(p.numel() for p in model.parameters()),
                     "param_groups": {}, "head_dim": m["head_dim"], "n_layer": m["n_layer"],
                     "probe_checkpoints": [0], "data": {"probe_tokens": int(tokens.numel())}, "source": source})]
    rows += [("probe", r) for r in probe_rows] + [("attn", r) for r in attn_rows]
    rows += [("weights", r) for r in weight_rows]
    rows.append(("end", {"step": 0, "tokens": 0, "wall_s": time.perf_counter() - t0, "status": "finished"}))
    metrics = out_dir / "metrics.jsonl"
    tmp = metrics.with_suffix(".tmp")  # written whole, then renamed: no half-written probe is ever read
    tmp.unlink(missing_ok=True)
    out = MetricsWriter(tmp)
    for kind, row in rows:
        at = {"step": 0, "tokens": 0} if kind in ("probe", "attn", "weights") else {}
        out.write(kind, **at, **row)
    out.close()
    tmp.replace(metrics)
    return metrics


def probe_tokens_from_text(path: str | Path, text: str, seq_len: int, max_tokens: int) -> torch.Tensor:
    """Tokenize `text` with the checkpoint's own tokenizer (local files only) into (N, seq_len) ids,
    N = min(all tokens, max_tokens) // seq_len: the probe set for an HF model."""
    from transformers import AutoTokenizer

    text = text[: 16 * max_tokens]  # English BPE averages ~4 characters a token: plenty, without encoding a book
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise DataError(f"no usable tokenizer in {path}: {str(e).splitlines()[0]}") from None
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    n = min(len(ids), max_tokens) // seq_len
    if n == 0:
        raise DataError(f"the probe text gives {len(ids)} tokens, fewer than one sequence of {seq_len}")
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def probe_checkpoint(path: Path, out: str | None, corpus: str = "embedded", n_tokens: int = 16384,
                     seq_len: int = 512, batch_size: int = 8, device: str = "auto", force: bool = False) -> Path:
    """`rankprobe probe`: every lens on a checkpoint, into a metrics folder `rankprobe report` reads.

    A RankProbe run folder is probed on its own fixed probe set (the tokens its checkpoints were
    probed on during training); an HF model on `corpus`, tokenized with the model's own tokenizer.
    """
    from ..data.corpus import load_corpus
    from ..data.tokens import prepare

    path = Path(path)
    if not path.is_dir():
        raise DataError(f"checkpoint {path} is not a folder (a Hugging Face model folder or a RankProbe run)")
    out_dir = Path(out) if out else path.parent / f"{path.name}-probe"
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if n_tokens <= 0 or seq_len <= 0 or batch_size <= 0:
        raise UserError("--tokens, --seq-len and --batch-size must be positive")
    if is_run_folder(path):
        cfg = json.loads((path / "config.json").read_text())
        data_cfg, T = DataConfig(**cfg["data"]), cfg["model"]["seq_len"]
        tokens = prepare(data_cfg, T, cfg["train"]["batch_size"]).probe_tokens(cfg["probe"]["tokens"], T)
    else:
        tokens = probe_tokens_from_text(path, load_corpus(corpus).text, seq_len, n_tokens)
    return probe_checkpoint_to_dir(path, tokens, out_dir, batch_size=batch_size, force=force, device=device)

"""`rankprobe probe`: checkpoints RankProbe did not train, probed into a run folder `rankprobe report` reads.

Hugging Face causal LMs of every family in probes/families.py are loaded from local folders with
`transformers`, never from a hub; their taps are the family's adapter (docs/probes.md lists where
each sits). RankProbe's own run folders (config.json + model.safetensors) load into `Transformer`,
so old runs can be probed with new lenses. One checkpoint becomes a pretrained reference; a series
(probes/series.py) becomes one run whose rows sit at each checkpoint's step and token count, drawn as
a trajectory. `probe_series_to_dir` writes run, probe, attn, weights and end rows (docs/metrics.md,
docs/lenses.md); the run row records the corpus, tokenizer and weights hashes, seq_len and dtype.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import time
from dataclasses import asdict
from pathlib import Path

import torch

from ..config import DataConfig, DataError, ModelConfig, ProbeConfig, UserError, arm_label
from ..errors import FolderError
from ..runfolder import (MetricsWriter, RunHeader, ensure_writable, first_missing, folder_lock, is_run,
                         remove_unused, write_json)
from ..runlog import env_info
from .capture import adapter_for
from .families import FAMILIES, SUPPORTED, max_positions, text_config
from .lenses import probe_lenses, weight_lenses
from .partial import Kept, probe_key
from .probe_checks import check_finite, holds_a_probe, same_shape, say_copies
from .series import Checkpoint, default_out, find_checkpoints, sha256_files, stored_dtype, weight_files

log = logging.getLogger(__name__)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt",
                   "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")


def load_hf(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """A Hugging Face causal LM from the local folder `path` (no download), in eval mode.

    Raises DataError for a missing folder or a model_type outside SUPPORTED."""
    path = Path(path)
    config = hf_config(path)
    files = weight_files(path)
    if not files:
        raise DataError(f"{path} holds a model config but no weights (*.safetensors or *.bin)")
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    quiet, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    if quiet:  # one bar of our own over the probe, not one per checkpoint's shards
        hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()  # its table of missing and unexpected tensors: said below in one line
    try:
        model, info = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype, config=config,
                                                           output_loading_info=True)
    except Exception as e:  # transformers, safetensors and the unpickler each raise their own types
        names = ", ".join(f.name for f in files[:3])
        pickled = " (pickle weights are read with weights_only: save them as safetensors)" \
            if all(f.suffix == ".bin" for f in files) else ""
        raise DataError(f"cannot load the model in {path} from {names}: {_one_line(e)}{pickled}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        if quiet:
            hf_logging.enable_progress_bar()
    missing, unexpected = sorted(info.get("missing_keys") or ()), sorted(info.get("unexpected_keys") or ())
    if missing:  # transformers fills them at random: the probe would measure an untrained model as this one
        raise DataError(f"the weights in {path} lack {len(missing)} tensor(s) of the model its config.json "
                        f"describes ({', '.join(missing[:2])}{', ...' if len(missing) > 2 else ''})")
    if unexpected:
        more = ", ..." if len(unexpected) > 2 else ""
        log.warning("%s: %d tensor(s) of the weights are not in the model its config.json describes, and are "
                    "ignored (%s%s)", path, len(unexpected), ", ".join(unexpected[:2]), more)
    return model.to(device).eval()


def hf_config(path: Path):
    """The checked config of the HF model folder `path`: DataError for a folder that is not one or a
    model_type outside SUPPORTED."""
    try:
        from transformers import AutoConfig
    except ImportError:
        raise UserError("probing Hugging Face checkpoints needs `transformers` (pip install transformers)") from None

    if not (path / "config.json").is_file():
        raise DataError(f"{path} is not a Hugging Face model folder (no config.json) nor a RankProbe run folder")
    try:
        raw = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        raise DataError(f"{path}/config.json cannot be read as JSON: {_one_line(e)}") from None
    if not isinstance(raw, dict):
        raise DataError(f"{path}/config.json is not a Hugging Face model config (a {type(raw).__name__}, not a table)")
    if raw.get("model_type") not in SUPPORTED and "text_config" not in raw:  # before transformers looks for code
        raise DataError(f"{path}: model_type {raw.get('model_type')!r} is not supported "
                        f"(supported: {', '.join(SUPPORTED)}; auto_map code is never run)")
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as e:  # a config transformers cannot build, whatever it raises
        raise DataError(f"{path}/config.json is not a Hugging Face model config: {_one_line(e)}") from None
    if text_config(config).model_type not in SUPPORTED:
        raise DataError(f"{path}: model_type {text_config(config).model_type!r} is not supported "
                        f"(supported: {', '.join(SUPPORTED)})")
    _check_size(path, text_config(config))
    return config


def _check_size(path: Path, c) -> None:
    """Refuse, before anything is allocated, a config whose parameters could not fit in this machine's
    memory even at 2 bytes each (the weights are loaded on the CPU first): 100k layers would
    otherwise be built for minutes, then fail."""
    def number(*names):
        value = next((getattr(c, n) for n in names if getattr(c, n, None) is not None), None)
        return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None

    L, d = number("num_hidden_layers", "n_layer", "num_layers"), number("hidden_size", "n_embd", "d_model")
    if L == 0:
        raise DataError(f"{path}/config.json describes a model of no layers (num_hidden_layers 0): nothing to probe")
    if L is None or d is None:
        return
    ff, vocab = number("intermediate_size", "n_inner", "ffn_hidden_size") or 4 * d, number("vocab_size") or 0
    n_params = L * (4 * d * d + 3 * d * ff) + 2 * vocab * d
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if 2 * n_params > ram:
        raise DataError(f"{path}/config.json describes about {n_params / 1e9:,.1f}B parameters ({L} layers of width "
                        f"{d}), more than this machine's {ram / 2**30:.0f} GiB of memory can hold")


def _one_line(e: Exception) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= 200 else text[:197] + "..."


def load_run_checkpoint(run_dir: str | Path, device: str | torch.device = "cpu"):
    """RankProbe's Transformer from a run folder's config.json and model.safetensors (safetensors
    only: nothing is unpickled), in eval mode."""
    from safetensors.torch import load_model

    from ..model import Transformer

    run_dir = Path(run_dir)
    cfg = run_config(run_dir)
    weights = run_dir / "model.safetensors"
    if not weights.is_file():
        raise DataError(f"{run_dir} has no model.safetensors (a run that did not finish?)")
    model = Transformer(ModelConfig(**cfg["model"]))
    try:
        load_model(model, str(weights), strict=True, device=str(device))
    except Exception as e:  # safetensors raises its own error type for a corrupt or truncated file
        raise DataError(f"cannot load {weights}: {str(e).splitlines()[0]}") from None
    return model.to(device).eval()


def run_config(run_dir: Path) -> dict:
    """A RankProbe run folder's config.json, checked like any config (DataError naming the file)."""
    from ..config import from_dict, to_dict
    from ..model import param_count

    path = Path(run_dir) / "config.json"
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(cfg, dict):
            raise ValueError(f"a {type(cfg).__name__}, not a table")
        checked = from_dict(cfg)
    except (OSError, ValueError, RecursionError, UserError) as e:
        raise DataError(f"{path} is not a usable RankProbe run config: {_one_line(e)}") from None
    n_params, _ = param_count(checked.model, checked.model.vocab_size)
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if 4 * n_params > ram:
        raise DataError(f"{path} describes a model of {n_params / 1e9:,.1f}B parameters, more than this machine's "
                        f"{ram / 2**30:.0f} GiB of memory can hold")
    return to_dict(checked)  # every table, a run made before some keys existed at their defaults


def is_run_folder(path: str | Path) -> bool:
    """True for a RankProbe run folder (its config.json has a `model` table), False for HF folders."""
    if not (Path(path) / "config.json").is_file():  # a FIFO under the name would block the read for ever
        return False
    try:
        cfg = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(cfg, dict) and isinstance(cfg.get("model"), dict) and "n_layer" in cfg["model"]


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
    """One checkpoint at step 0 / tokens 0, a pretrained reference: `probe_series_to_dir` of one."""
    return probe_series_to_dir([Checkpoint(Path(path), 0, 0)], tokens, out_dir, batch_size=batch_size, name=name,
                               arm=arm, force=force, device=device)


def _load(ckpt: Checkpoint, run_folder: bool, device, dtype: torch.dtype):
    if run_folder:
        return load_run_checkpoint(ckpt.path, device).to(dtype)
    return load_hf(ckpt.path, dtype=dtype, device=device)


def _identity(path: Path, model, tokens: torch.Tensor, name: str | None, arm: str | None, series: bool) -> dict:
    """The run row's cfg, arm, optimizer, qk_norm, seed, source, n_params and env, from the first
    checkpoint probed (kept with its rows, so a resumed probe need not load it again)."""
    found = {"n_params": sum(p.numel() for p in model.parameters()), "env": env_info(next(model.parameters()).device)}
    keys = ("cfg", "arm", "optimizer", "qk_norm", "seed", "source")
    return found | dict(zip(keys, _described(path, model, tokens, name, arm, series)))


def _described(path: Path, model, tokens: torch.Tensor, name: str | None, arm: str | None, series: bool) -> tuple:
    """(config, arm, optimizer, qk_norm, seed, source) of the run row."""
    if is_run_folder(path):
        cfg = run_config(path)
        qk_norm = bool(cfg["model"]["qk_norm"])
        arm = arm or f"rankprobe:{arm_label(cfg['optim']['name'], qk_norm, cfg['optim'].get('qk_clip', False))}"
        return cfg, arm, "pretrained", qk_norm, cfg["train"]["seed"], {"path": str(path), "kind": "rankprobe"}
    mt = text_config(model.config).model_type
    # only the tables that mean something for a model RankProbe did not train
    cfg = {"name": name or f"hf-{mt}", "model": hf_model_config(model),
           "probe": asdict(ProbeConfig(checkpoints=[0], n_checkpoints=1, tokens=int(tokens.numel())))}
    source = {"path": str(path), "kind": "hf", "model_type": mt,
              "architectures": list(getattr(model.config, "architectures", None) or [])}
    # a series is a trajectory (the report draws it against tokens); one checkpoint is a reference line
    return cfg, arm or f"hf:{mt}", "checkpoints" if series else "pretrained", cfg["model"]["qk_norm"], 0, source


def probe_series_to_dir(checkpoints: list[Checkpoint], tokens: torch.Tensor, out_dir: str | Path,
                        batch_size: int = 8, name: str | None = None, arm: str | None = None, force: bool = False,
                        device: str | torch.device = "cpu", dtype: str = "fp32", data: dict | None = None,
                        progress: bool = False) -> Path:
    """Probe each checkpoint (HF folders, or one RankProbe run folder) on `tokens` (N, T) of its own
    vocabulary and write `out_dir/metrics.jsonl` (plus config.json, env.json): a `run` row, then per
    checkpoint `probe`, `attn` and `weights` rows at its step and token count, and a finished `end`
    row. One checkpoint is a reference (optimizer "pretrained", a `source`); several are one run of
    optimizer "checkpoints" whose rows form a trajectory. The model is loaded in `dtype`; statistics
    are float64 either way. Refuses to replace an existing metrics.jsonl unless `force`."""
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    if (out_dir / "metrics.jsonl").exists() and not force:
        raise UserError(f"{out_dir} already holds a run (metrics.jsonl); pass --force to replace it")
    if (out_dir / "metrics.jsonl").exists() and not holds_a_probe(out_dir / "metrics.jsonl"):
        raise FolderError(f"{out_dir} holds a run that `rankprobe probe` did not write (training metrics); --force "
                          "replaces only an earlier probe: give --out a folder of its own")
    mine = [n for n in ("config.json", "env.json") if (out_dir / n).exists()]
    if mine and not is_run(out_dir):  # --out MODEL_FOLDER would overwrite the model's own config.json
        raise FolderError(f"{out_dir} holds {', '.join(mine)} but no RankProbe run, and a probe writes files of those "
                          "names; give --out a folder of its own")
    if tokens.ndim != 2 or tokens.numel() == 0:
        raise DataError("tokens must be a non-empty (N, T) tensor of token ids")
    run_folder = is_run_folder(checkpoints[0].path)
    if run_folder and len(checkpoints) > 1:
        raise DataError("a RankProbe run folder is probed on its own; a series must be Hugging Face folders")
    ensure_writable(out_dir)
    with folder_lock(out_dir):  # a second probe into this folder would share its kept rows and temporary file
        return _probe_locked(checkpoints, tokens, out_dir, batch_size, name, arm, device, dtype, data, progress,
                             run_folder, t0)


def _probe_locked(checkpoints: list[Checkpoint], tokens: torch.Tensor, out_dir: Path, batch_size: int,
                  name: str | None, arm: str | None, device, dtype: str, data: dict | None, progress: bool,
                  run_folder: bool, t0: float) -> Path:
    """`probe_series_to_dir` once its inputs are checked and its folder is locked."""
    rows, seen = [], []
    kept = Kept(out_dir, probe_key(tokens, dtype, batch_size, device, name, arm)) if len(checkpoints) > 1 else None
    who = kept.identity if kept is not None else None
    bar = _bar(len(checkpoints) * tokens.size(0), progress)
    for ckpt in checkpoints:
        files = weight_files(ckpt.path)
        record = {"path": str(ckpt.path), "step": ckpt.step, "tokens": ckpt.tokens,
                  "weights_sha256": sha256_files(files), "weights_dtype": stored_dtype(files)}
        done = kept.get(ckpt.path, record["weights_sha256"]) if kept is not None else None
        if done is not None and done["seen"] == record:  # probed before this probe was interrupted
            rows += [tuple(r) for r in done["rows"]]
            seen.append(record)
            bar.update(tokens.size(0))
            continue
        model = _load(ckpt, run_folder, device, DTYPES[dtype])
        if who is None:
            who = _identity(ckpt.path, model, tokens, name, arm, len(checkpoints) > 1)
            vocab = who["cfg"]["model"]["vocab_size"]
            if int(tokens.max()) >= vocab or int(tokens.min()) < 0:
                raise DataError(f"tokens must be ids in [0, {vocab}); tokenize the probe text with the "
                                "checkpoint's own tokenizer")
        elif not run_folder and hf_model_config(model) != who["cfg"]["model"]:
            raise DataError(f"{ckpt.path} is another model than {checkpoints[0].path}: a series is one model")
        probe_rows, attn_rows = probe_lenses(model, tokens, batch_size, progress=bar.update)
        check_finite(ckpt.path, probe_rows, dtype)
        at = {"step": ckpt.step, "tokens": ckpt.tokens}
        mine = [("probe", at | r) for r in probe_rows] + [("attn", at | r) for r in attn_rows]
        mine += [("weights", at | r) for r in weight_lenses(model)]
        rows += mine
        seen.append(record)
        if kept is not None:
            kept.add(who, record, mine)
        del model  # one checkpoint in memory at a time
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    bar.close()
    say_copies(seen)
    cfg, arm, optimizer, qk_norm, seed, source, n_params, env = (
        who[k] for k in ("cfg", "arm", "optimizer", "qk_norm", "seed", "source", "n_params", "env"))
    if not run_folder:
        cfg["probe"].update(checkpoints=[c["tokens"] for c in seen], n_checkpoints=len(seen))
    name = name or cfg.get("name") or out_dir.name
    m = cfg["model"]
    extra = {"seq_len": int(tokens.size(1)), "max_positions": m["seq_len"], "dtype": dtype, "checkpoints": seen}
    if len(checkpoints) > 1:
        extra["series"] = source | {"path": str(Path(seen[0]["path"]).parent)}
    run = RunHeader(run=name, arm=arm, optimizer=optimizer, qk_norm=qk_norm, seed=seed, config=cfg, env=env,
                    n_params=n_params, head_dim=m["head_dim"], n_layer=m["n_layer"],
                    probe_checkpoints=[c["tokens"] for c in seen],
                    data={"probe_tokens": int(tokens.numel())} | (data or {}),
                    source=source if len(checkpoints) == 1 else None, extra=extra).row()
    write_json(out_dir / "config.json", cfg)  # atomic: never through a link planted under the name
    write_json(out_dir / "env.json", env)
    end = {"step": seen[-1]["step"], "tokens": seen[-1]["tokens"], "wall_s": time.perf_counter() - t0,
           "status": "finished"}
    _write(out_dir / "metrics.jsonl", [("run", run)] + rows + [("end", end)])
    if kept is not None:
        kept.close()
    return out_dir / "metrics.jsonl"


def _write(metrics: Path, rows: list[tuple[str, dict]]) -> None:
    tmp = metrics.with_suffix(".tmp")  # written whole, then renamed: no half-written probe is ever read
    tmp.unlink(missing_ok=True)
    out = MetricsWriter(tmp)
    for kind, row in rows:
        out.write(kind, **row)
    out.close()
    tmp.replace(metrics)


def _bar(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="probe", unit="seq", disable=None if enabled else True)  # None: off without a tty


# ---------------------------------------------------------------------------------------------
# probe tokens


def load_tokenizer(path: Path):
    """(tokenizer, record for the run row) from the local folder `path`; DataError without one."""
    from transformers import AutoTokenizer

    files = tokenizer_files(path)
    if not files:
        raise DataError(f"{path} has no tokenizer (tokenizer.json, tokenizer.model or vocab.json); save the "
                        "model's tokenizer beside it (tokenizer.save_pretrained)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:  # transformers raises many types for a tokenizer it cannot build
        raise DataError(f"no usable tokenizer in {path}: {_one_line(e)}") from None
    record = {"class": type(tokenizer).__name__, "name": tokenizer.name_or_path, "sha256": sha256_files(files)}
    return tokenizer, record


def tokenizer_files(path: Path) -> list[Path]:
    """The tokenizer files in `path`; none unless a vocabulary is among them (a config alone is no tokenizer)."""
    files = [path / f for f in TOKENIZER_FILES if (path / f).is_file()]
    return files if any(f.name not in ("tokenizer_config.json", "special_tokens_map.json") for f in files) else []


def _check_tokenizers(series: list[Checkpoint], holder: Path, record: dict, text: str, tokens: torch.Tensor,
                      seq_len: int, max_tokens: int) -> None:
    """The probe text is tokenized once, by `holder`'s tokenizer; a checkpoint saved with a tokenizer of
    its own that encodes that text otherwise would read the ids as other words: DataError. Identical
    files (Pythia and the Trainer save the same tokenizer into every checkpoint) are not even loaded."""
    for ckpt in series:
        files = tokenizer_files(ckpt.path)
        if ckpt.path == holder or not files or sha256_files(files) == record["sha256"]:
            continue
        own, _ = load_tokenizer(ckpt.path)
        if not torch.equal(_tokenize(own, text, seq_len, max_tokens), tokens):
            raise DataError(f"the tokenizer saved in {ckpt.path} encodes the probe text differently from the one in "
                            f"{holder}: a series is probed on one tokenization; probe them as separate runs")


def probe_tokens_from_text(path: str | Path, text: str, seq_len: int, max_tokens: int) -> torch.Tensor:
    """Tokenize `text` with the checkpoint's own tokenizer (local files only) into (N, seq_len) ids,
    N = min(all tokens, max_tokens) // seq_len: the probe set for an HF model."""
    tokenizer, _ = load_tokenizer(Path(path))
    return _tokenize(tokenizer, text, seq_len, max_tokens)


def _tokenize(tokenizer, text: str, seq_len: int, max_tokens: int) -> torch.Tensor:
    text = text[: 16 * max_tokens]  # English BPE averages ~4 characters a token: plenty, without encoding a book
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    n = min(len(ids), max_tokens) // seq_len
    if n == 0:
        raise DataError(f"the probe text gives {len(ids)} tokens, fewer than one sequence of {seq_len}")
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def resolve_device(name: str) -> torch.device:
    """--device as `rankprobe train` checks it: auto, cpu, cuda, cuda:N; one line when absent."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name} is not a device (auto, cpu, cuda, cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} but CUDA is not available on this machine")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"--device {name} but this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {name}: only cpu and cuda are supported")
    return device


def probe_checkpoint(checkpoints: list[str] | str | Path, out: str | None, corpus: str = "embedded",
                     n_tokens: int = 16384, seq_len: int = 512, batch_size: int = 8, device: str = "auto",
                     force: bool = False, dtype: str = "fp32", arm: str | None = None,
                     tokens_per_step: int | None = None, allow_long_context: bool = False,
                     progress: bool = True) -> Path:
    """`rankprobe probe`: every lens on a checkpoint or a series of them, into one metrics folder
    `rankprobe report` reads.

    A RankProbe run folder is probed on its own fixed probe set (the tokens its checkpoints were
    probed on during training); HF models on `corpus`, tokenized with the first checkpoint's own
    tokenizer, in sequences of `seq_len` no longer than the model's positions (unless
    `allow_long_context`, which the run row records)."""
    from ..data.corpus import load_corpus
    from ..data.tokens import prepare

    if n_tokens <= 0 or seq_len <= 0 or batch_size <= 0:
        raise UserError("--tokens, --seq-len and --batch-size must be positive")
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype}: one of {', '.join(DTYPES)}")
    dev = resolve_device(device)
    specs = [checkpoints] if isinstance(checkpoints, (str, Path)) else list(checkpoints)
    series = find_checkpoints([str(s) for s in specs], tokens_per_step)
    first = series[0].path
    out_dir = Path(out) if out else default_out(series)
    if is_run_folder(first):
        cfg = run_config(first)
        data_cfg, T = DataConfig(**cfg["data"]), cfg["model"]["seq_len"]
        tokens = prepare(data_cfg, T, cfg["train"]["batch_size"]).probe_tokens(cfg["probe"]["tokens"], T)
        data = {"corpus": data_cfg.corpus}
    else:
        config = hf_config(first)
        for ckpt in series[1:]:
            same_shape(first, config, ckpt.path, hf_config(ckpt.path))
        limit = max_positions(config)
        if limit is not None and seq_len > limit:
            if FAMILIES[text_config(config).model_type].learned_positions:
                raise UserError(f"--seq-len {seq_len} is longer than the {limit} learned positions of {first.name}; "
                                f"use --seq-len {limit} or less")
            if not allow_long_context:
                raise UserError(f"--seq-len {seq_len} is longer than the {limit} positions {first.name} was built "
                                "for; lower --seq-len, or pass --allow-long-context to probe past them")
        # HF Trainer saves the tokenizer into each checkpoint, or only beside them in the output folder; a
        # checkpoint's own vocabulary wins over the folder above (tokenizer.json may come without a config)
        holder = next((p for p in [c.path for c in series] + [first.parent] if tokenizer_files(p)), first)
        tokenizer, tok_record = load_tokenizer(holder)
        text = load_corpus(corpus)
        tokens = _tokenize(tokenizer, text.text, seq_len, n_tokens)
        _check_tokenizers(series, holder, tok_record, text.text, tokens, seq_len, n_tokens)
        data = {"corpus": text.source, "corpus_sha256": text.sha256, "tokenizer": tok_record,
                "long_context": bool(limit is not None and seq_len > limit)}
    created = first_missing(out_dir)
    try:
        return probe_series_to_dir(series, tokens, out_dir, batch_size=batch_size, arm=arm, force=force, device=dev,
                                   dtype=dtype, data=data, progress=progress)
    except BaseException:
        if created is not None:  # a probe that failed leaves no empty folder of its own making
            remove_unused(out_dir, created)
        raise

"""Token ids of a corpus, cached on disk, and the fixed train / val / probe split over them.

`prepare(data, seq_len, batch_size)` loads the corpus and tokenizer, encodes the corpus once (ids kept
as a raw uint16/uint32 memmap under `cache_dir/tokens/`, with a JSON sidecar) and returns `TokenData`:
- `train_batch(step, seed)`: random windows from the train region, a pure function of (seed, step), so a
  resumed run sees exactly the batches it would have seen and no sampler state needs checkpointing;
- `val_batches(n_tokens)` and `probe_tokens(n_tokens)`: the same fixed windows on every call.

The split cuts the stream into blocks of BLOCK_SEQS * seq_len tokens and spaces the val and probe blocks
evenly along it: the embedded corpus is Austen then Melville, so a tail split would validate on Melville
alone. Windows never cross from one region into another.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from rankprobe.config import DataConfig, DataError
from rankprobe.data.corpus import Corpus, load_corpus
from rankprobe.data.tokenizer import Tokenizer, get_tokenizer
from rankprobe.runfolder import check_writable, write_atomic

BLOCK_SEQS = 8  # block length in sequences: small enough to spread val/probe, big enough to waste little
TOKENS_FORMAT = 1  # part of the token-cache key: bump it when the stream layout (eot placement) changes
TRAIN, VAL, PROBE = 0, 1, 2
REGIONS = {"train": TRAIN, "val": VAL, "probe": PROBE}


def resolve_cache_dir(setting: str | Path = "") -> Path:
    """`setting` if given, else $RANKPROBE_CACHE, else ~/.cache/rankprobe; created, and checked writable."""
    path = Path(setting or os.environ.get("RANKPROBE_CACHE") or "~/.cache/rankprobe").expanduser()
    try:
        check_writable(path)
    except OSError as e:
        raise DataError(
            f"cache directory {path} is not writable ({e.strerror or e}); set data.cache_dir or $RANKPROBE_CACHE"
        ) from None
    return path


# ---------------------------------------------------------------------------------------------
# the split: pure functions of the stream length


def _evenly_spaced(n: int, k: int) -> np.ndarray:
    """k distinct indices in [0, n): the centres of k equal strides (k <= n)."""
    return ((np.arange(k) + 0.5) * n / k).astype(np.int64)


def assign_blocks(n_blocks: int, val_frac: float, probe_frac: float) -> np.ndarray:
    """Role (TRAIN, VAL, PROBE) of each block: round(n * frac) val and probe blocks, at least one each.

    Val blocks sit at the centres of equal strides over all blocks, probe blocks likewise over the
    blocks left, so both regions sample the whole stream and never collide.
    """
    roles = np.full(n_blocks, TRAIN, dtype=np.int8)
    if n_blocks == 0:
        return roles
    n_val = max(1, round(n_blocks * val_frac))
    roles[_evenly_spaced(n_blocks, n_val)] = VAL
    rest = np.flatnonzero(roles == TRAIN)
    n_probe = min(len(rest), max(1, round(n_blocks * probe_frac)))
    if n_probe:
        roles[rest[_evenly_spaced(len(rest), n_probe)]] = PROBE
    return roles


def split_segments(n_tokens: int, block_len: int, val_frac: float, probe_frac: float) -> dict[str, np.ndarray]:
    """Per region, its [start, end) token ranges as an (S, 2) int64 array; together they tile the stream.

    Blocks are n_tokens // block_len near-equal slices (no leftover tail); adjacent blocks of one role
    merge into one segment, so windows may run across their shared edge.
    """
    n_blocks = max(1, n_tokens // block_len)
    bounds = np.arange(n_blocks + 1, dtype=np.int64) * n_tokens // n_blocks
    roles = assign_blocks(n_blocks, val_frac, probe_frac)
    edges = np.flatnonzero(np.diff(roles)) + 1
    run_start = np.concatenate([[0], edges])
    run_end = np.concatenate([edges, [n_blocks]])
    segments = {}
    for name, role in REGIONS.items():
        sel = roles[run_start] == role
        segments[name] = np.stack([bounds[run_start[sel]], bounds[run_end[sel]]], axis=1)
    return segments


def window_starts(segments: np.ndarray, span: int, stride: int) -> np.ndarray:
    """Starts of windows of `span` tokens, every `stride` tokens inside each segment, in stream order."""
    starts = [np.arange(a, b - span + 1, stride, dtype=np.int64) for a, b in segments]
    return np.concatenate(starts) if starts else np.zeros(0, dtype=np.int64)


def batch_seed(seed: int, step: int) -> int:
    """A 63-bit generator seed from (seed, step); hashed so nearby pairs give unrelated streams."""
    digest = hashlib.sha256(f"rankprobe-batch:{seed}:{step}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


# ---------------------------------------------------------------------------------------------
# the token stream and its batches


class TokenData:
    """A tokenized corpus split into train / val / probe regions; hands out (B, T) int64 batches."""

    def __init__(self, ids: np.ndarray, tokenizer: Tokenizer, corpus_source: str, corpus_sha256: str,
                 seq_len: int, batch_size: int, val_frac: float, probe_frac: float, cache_path: Path | None = None):
        self.ids = ids  # (N,) uint16/uint32, usually a read-only memmap
        self.tokenizer = tokenizer
        self.tokenizer_name = tokenizer.name
        self.vocab_size = tokenizer.vocab_size
        self.eot_id = tokenizer.eot_id
        self.corpus_source = corpus_source
        self.corpus_sha256 = corpus_sha256
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.cache_path = cache_path
        self.block_len = BLOCK_SEQS * seq_len
        self.segments = split_segments(len(ids), self.block_len, val_frac, probe_frac)
        size = {name: int((seg[:, 1] - seg[:, 0]).sum()) for name, seg in self.segments.items()}
        self.n_tokens = len(ids)
        self.n_train_tokens, self.n_val_tokens, self.n_probe_tokens = size["train"], size["val"], size["probe"]
        self._train_index_cache: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self._check_sizes()

    def _check_sizes(self) -> None:
        B, T, src = self.batch_size, self.seq_len, self.corpus_source
        if self.n_train_tokens < B * (T + 1):
            raise DataError(
                f"corpus {src} has {self.n_train_tokens} training tokens (of {self.n_tokens}); one batch needs "
                f"{B * (T + 1)} (train.batch_size {B} x (model.seq_len {T} + 1)); use a bigger corpus or smaller batch"
            )
        if self.n_val_tokens < T + 1:
            raise DataError(
                f"corpus {src} has {self.n_val_tokens} validation tokens; one sequence needs {T + 1} "
                f"(model.seq_len {T} + 1); raise data.val_frac or use a bigger corpus"
            )
        if self.n_probe_tokens < T:
            raise DataError(
                f"corpus {src} has {self.n_probe_tokens} probe tokens; one sequence needs {T} "
                f"(model.seq_len); raise data.probe_frac or use a bigger corpus"
            )

    def _windows(self, starts: np.ndarray, span: int) -> torch.Tensor:
        idx = starts[:, None] + np.arange(span)  # (N, span)
        return torch.from_numpy(self.ids[idx].astype(np.int64))

    def _train_index(self, T: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(segment starts, window counts, cumulative counts) over train segments for windows of T + 1."""
        if T not in self._train_index_cache:
            seg = self.segments["train"]
            counts = np.maximum(seg[:, 1] - seg[:, 0] - T, 0)  # starts s with s + T + 1 <= end
            if counts.sum() == 0:
                raise DataError(f"no training segment of corpus {self.corpus_source} holds a window of {T + 1} tokens")
            self._train_index_cache[T] = (seg[:, 0], counts, np.cumsum(counts))
        return self._train_index_cache[T]

    def train_batch(self, step: int, seed: int, batch_size: int | None = None, seq_len: int | None = None,
                    device: str | torch.device = "cpu", shard: tuple[int, int] = (0, 1)
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and next-token targets, each (B, T) int64: B windows drawn uniformly (with replacement)
        from every window inside the train region, by a generator seeded from (seed, step) alone.

        `shard` = (rank, world_size): this rank's contiguous B / world_size rows of that same global
        batch (B must divide), so the ranks of a DDP run together see exactly the single-process batch."""
        B, T = batch_size or self.batch_size, seq_len or self.seq_len
        seg_start, counts, cum = self._train_index(T)
        g = torch.Generator().manual_seed(batch_seed(seed, step))
        r = torch.randint(int(cum[-1]), (B,), generator=g).numpy()
        s = np.searchsorted(cum, r, side="right")  # which segment each draw falls in
        starts = seg_start[s] + r - (cum[s] - counts[s])
        rank, world = shard
        if world > 1:
            starts = starts[rank * B // world : (rank + 1) * B // world]
        w = self._windows(starts, T + 1)  # (B / world, T + 1)
        return _to(w[:, :-1].contiguous(), device), _to(w[:, 1:].contiguous(), device)

    def _fixed_starts(self, region: str, n_seqs: int, span: int, T: int) -> np.ndarray:
        """n_seqs of the region's non-overlapping windows, spread evenly over it so that a small eval or
        probe budget still samples the whole corpus rather than its first blocks."""
        cand = window_starts(self.segments[region], span, T)
        return cand[_evenly_spaced(len(cand), min(n_seqs, len(cand)))]

    def val_batches(self, n_tokens: int, batch_size: int | None = None, seq_len: int | None = None,
                    device: str | torch.device = "cpu") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(x, y) batches over ceil(n_tokens / T) fixed val windows (all of them if the region is smaller);
        the last batch may be short. The same windows on every call."""
        B, T = batch_size or self.batch_size, seq_len or self.seq_len
        starts = self._fixed_starts("val", math.ceil(n_tokens / T), T + 1, T)
        for i in range(0, len(starts), B):
            w = self._windows(starts[i : i + B], T + 1)
            yield _to(w[:, :-1].contiguous(), device), _to(w[:, 1:].contiguous(), device)

    def n_val_windows(self, n_tokens: int, seq_len: int | None = None) -> int:
        """How many windows val_batches(n_tokens) yields in all (fewer than asked if the region is small)."""
        T = seq_len or self.seq_len
        return len(self._fixed_starts("val", math.ceil(n_tokens / T), T + 1, T))

    def probe_tokens(self, n_tokens: int, seq_len: int | None = None) -> torch.Tensor:
        """The fixed probe set, (ceil(n_tokens / T), T) int64, from the probe region; the same every call.
        Unlike val, a short region is an error: probe statistics depend on how many tokens go in."""
        T = seq_len or self.seq_len
        n_seqs = math.ceil(n_tokens / T)
        starts = self._fixed_starts("probe", n_seqs, T, T)
        if len(starts) < n_seqs:
            raise DataError(
                f"corpus {self.corpus_source} has {len(starts)} probe sequences of {T} tokens; probe.tokens "
                f"{n_tokens} needs {n_seqs}; lower probe.tokens or raise data.probe_frac"
            )
        return self._windows(starts, T)

    def summary(self) -> dict:
        """Plain data describing the stream and split, for the run folder."""
        return {
            "corpus": self.corpus_source, "corpus_sha256": self.corpus_sha256,
            "tokenizer": self.tokenizer_name, "tokenizer_sha256": self.tokenizer.identity,
            "vocab_size": self.vocab_size, "n_tokens": self.n_tokens, "n_train_tokens": self.n_train_tokens,
            "n_val_tokens": self.n_val_tokens, "n_probe_tokens": self.n_probe_tokens,
            "block_len": self.block_len, "cache": str(self.cache_path) if self.cache_path else None,
        }


def _to(t: torch.Tensor, device: str | torch.device) -> torch.Tensor:
    if torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)  # pinned: the copy overlaps the previous step
    return t.to(device)


# ---------------------------------------------------------------------------------------------
# the on-disk token cache


def _open_cached(bin_path: Path, meta_path: Path, key: str) -> np.ndarray | None:
    """The cached ids if the sidecar matches `key` and the .bin has the recorded length, else None."""
    try:
        meta = json.loads(meta_path.read_text())
        dtype = np.dtype(meta["dtype"])
        if meta["key"] != key or bin_path.stat().st_size != meta["length"] * dtype.itemsize:
            return None
        return np.memmap(bin_path, dtype=dtype, mode="r", shape=(meta["length"],))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def encode_cached(corpus: Corpus, tokenizer: Tokenizer, cache_dir: Path,
                  log: Callable[[str], None] | None = None) -> tuple[np.ndarray, Path]:
    """The corpus as one id stream (eot before each document), read from or written to the cache."""
    key = hashlib.sha256(
        json.dumps([TOKENS_FORMAT, corpus.sha256, corpus.boundaries_sha256, tokenizer.identity]).encode()
    ).hexdigest()
    bin_path = Path(cache_dir) / "tokens" / f"{corpus.sha256[:12]}-{tokenizer.name}-{key[:12]}.bin"
    meta_path = bin_path.with_suffix(".json")
    ids = _open_cached(bin_path, meta_path, key)
    if ids is not None:
        return ids, bin_path
    if log:
        log(f"encoding {len(corpus.text):,} characters with {tokenizer.name}")
    dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32
    stream = tokenizer.encode_documents(corpus.documents).astype(dtype)
    meta = {
        "key": key, "dtype": np.dtype(dtype).name, "length": len(stream), "format": TOKENS_FORMAT,
        "corpus": corpus.source, "corpus_sha256": corpus.sha256, "n_documents": len(corpus.documents),
        "tokenizer": tokenizer.name, "tokenizer_sha256": tokenizer.identity, "vocab_size": tokenizer.vocab_size,
    }
    # .bin first, sidecar second: a sidecar on disk always describes a complete .bin
    write_atomic(bin_path, stream.tofile)
    write_atomic(meta_path, lambda f: f.write(json.dumps(meta, indent=1).encode()))
    return np.memmap(bin_path, dtype=dtype, mode="r", shape=(len(stream),)), bin_path


def prepare(data: DataConfig, seq_len: int, batch_size: int, cache_dir: str | Path | None = None,
            log: Callable[[str], None] | None = None) -> TokenData:
    """Corpus -> tokenizer -> cached ids -> TokenData. `cache_dir` None means resolve_cache_dir(data.cache_dir)."""
    cache = resolve_cache_dir(data.cache_dir if cache_dir is None else cache_dir)
    corpus = load_corpus(data.corpus, data.jsonl_field)
    tokenizer = get_tokenizer(data.tokenizer, corpus, data.vocab_size, cache, log)
    ids, path = encode_cached(corpus, tokenizer, cache, log)
    return TokenData(ids, tokenizer, corpus.source, corpus.sha256, seq_len, batch_size,
                     data.val_frac, data.probe_frac, path)

"""Tokenizers: a byte-level BPE trained on the corpus, or GPT-2 (r50k_base) read from a .tiktoken file.

`get_tokenizer(spec, corpus, vocab_size, cache_dir)` returns a `Tokenizer`, one small class over either
backend (Hugging Face `tokenizers` or `tiktoken`): `encode`, `encode_batch`, `decode`,
`encode_documents`, `vocab_size`, `name`, `eot_id` and `identity` (sha256 of the tokenizer's definition,
which keys the token cache). Trained tokenizers are cached as tokenizer.json under
`cache_dir/tokenizers/`, keyed by corpus sha256 and vocabulary size.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tiktoken
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from rankprobe.config import ConfigError, DataError
from rankprobe.data.corpus import Corpus
from rankprobe.files import read_regular
from rankprobe.runfolder import write_atomic

EOT = "<|endoftext|>"
BPE_RECIPE = "bpe1"  # part of the cache key: bump it when the training recipe below changes
PIECE_CHARS = 1 << 16  # ~64 KB pieces: measured fastest for HF batch encoding on 2 cores (vs 4 KB, 1 MB)
GROUP_CHARS = 1 << 22  # encode_documents converts ids to numpy every ~4 MB of text to bound memory
GPT2_N_RANKS = 50256  # mergeable ranks; <|endoftext|> is id 50256 on top
# tiktoken's own r50k_base pattern (tiktoken_ext/openai_public.py), written out so no network is needed.
GPT2_PAT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
GPT2_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"  # tiktoken's r50k hash
MAX_TIKTOKEN_BYTES = 64 * 2**20  # GPT-2's file is 1.6 MB: a bound on what a path that is none can make us read

# A cut just before a newline that follows a non-space character is a pre-token boundary for both the
# HF ByteLevel and the r50k regex: no pre-token joins a non-space character to the whitespace after it,
# and matching restarts identically at a whitespace character. So encoding pieces one by one gives the
# same ids as encoding the whole text (tests check this), and the pieces can use the batch encoders.
_SAFE_CUT = re.compile(r"(?<=\S)\n")


def split_pieces(text: str, piece_chars: int = PIECE_CHARS) -> list[str]:
    """Cut `text` into pieces of at least `piece_chars` characters at safe points; joined they give `text`."""
    pieces, start = [], 0
    while True:
        m = _SAFE_CUT.search(text, start + piece_chars)
        if m is None:
            break
        pieces.append(text[start : m.start()])
        start = m.start()
    pieces.append(text[start:])
    return pieces


@dataclass(frozen=True)
class Tokenizer:
    """One interface over HF byte-level BPE and tiktoken GPT-2; build it with get_tokenizer."""

    name: str
    vocab_size: int
    eot_id: int
    identity: str
    _encode_batch: Callable[[list[str]], list[list[int]]] = field(repr=False)
    _decode: Callable[[list[int]], str] = field(repr=False)

    def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
        """Ids of each text, in parallel; '<|endoftext|>' inside a text is plain text, never the eot id."""
        return self._encode_batch(list(texts))

    def encode(self, text: str) -> list[int]:
        return [i for ids in self._encode_batch(split_pieces(text)) for i in ids]

    def decode(self, ids: Iterable[int]) -> str:
        return self._decode([int(i) for i in ids])

    def encode_documents(self, documents: Iterable[str]) -> np.ndarray:
        """One uint32 stream: eot, ids of document 0, eot, ids of document 1, ...

        The eot in front of each document acts as a BOS, so a document's first token is predicted from a
        "new document" context, and windows that straddle two documents see where one ends.
        """
        eot = np.array([self.eot_id], dtype=np.uint32)
        parts: list[np.ndarray] = []
        pending: list[str | None] = []  # None marks a document start
        pending_chars = 0

        def flush() -> None:
            encoded = iter(self._encode_batch([p for p in pending if p is not None]))
            parts.extend(eot if p is None else np.asarray(next(encoded), dtype=np.uint32) for p in pending)
            pending.clear()

        for doc in documents:
            pending.append(None)
            for piece in split_pieces(doc):
                pending.append(piece)
                pending_chars += len(piece)
                if pending_chars >= GROUP_CHARS:
                    flush()
                    pending_chars = 0
        flush()
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint32)


# ---------------------------------------------------------------------------------------------
# byte-level BPE (Hugging Face tokenizers)


def _from_hf(hf: HFTokenizer, definition: str) -> Tokenizer:
    hf.encode_special_tokens = True  # a literal "<|endoftext|>" in the corpus stays text, as in tiktoken
    eot_id = hf.token_to_id(EOT)
    if eot_id is None:
        raise DataError(f"BPE tokenizer has no {EOT} token")
    return Tokenizer(
        name=f"bpe-{hf.get_vocab_size()}",
        vocab_size=hf.get_vocab_size(),
        eot_id=eot_id,
        identity=hashlib.sha256(definition.encode("utf-8")).hexdigest(),
        _encode_batch=lambda texts: [e.ids for e in hf.encode_batch_fast(texts, add_special_tokens=False)],
        _decode=lambda ids: hf.decode(ids, skip_special_tokens=False),
    )


def _train_hf(corpus: Corpus, vocab_size: int) -> HFTokenizer:
    """GPT-2-style byte-level BPE: every byte is in the alphabet, so any text encodes without <unk>."""
    if vocab_size < 257:
        raise ConfigError(
            f"data.vocab_size must be at least 257 for byte-level BPE (256 bytes + {EOT}); got {vocab_size}"
        )
    hf = HFTokenizer(models.BPE())
    # add_prefix_space=False: a prefix space would make pieces encode differently from the whole text
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # train on the joined text, not per document, so the result depends only on corpus.sha256 (its key)
    hf.train_from_iterator(split_pieces(corpus.text), trainer)
    return hf


def train_bpe(corpus: Corpus, vocab_size: int) -> Tokenizer:
    """A fresh byte-level BPE tokenizer for `corpus` (deterministic: same corpus, same ids), not cached."""
    hf = _train_hf(corpus, vocab_size)
    return _from_hf(hf, hf.to_str())


def load_bpe(path: Path) -> Tokenizer:
    """A tokenizer.json written by this module; DataError if it cannot be read or parsed."""
    try:
        definition = path.read_text(encoding="utf-8")
        hf = HFTokenizer.from_str(definition)
    except Exception as e:  # OSError, UnicodeDecodeError, or the bare Exception tokenizers raises on bad JSON
        raise DataError(f"cannot load BPE tokenizer {path}: {e}") from None
    return _from_hf(hf, definition)


def _cached_bpe(corpus: Corpus, vocab_size: int, cache_dir: Path, log: Callable[[str], None] | None) -> Tokenizer:
    path = Path(cache_dir) / "tokenizers" / f"{BPE_RECIPE}-{vocab_size}-{corpus.sha256[:16]}.json"
    if path.exists():
        try:
            return load_bpe(path)
        except DataError:
            pass  # a damaged cache entry is rebuilt, never trusted
    if log:
        log(f"training byte-level BPE tokenizer, vocab {vocab_size}, on {len(corpus.text):,} characters")
    hf = _train_hf(corpus, vocab_size)
    definition = hf.to_str()
    write_atomic(path, lambda f: f.write(definition.encode("utf-8")))
    return _from_hf(hf, definition)


# ---------------------------------------------------------------------------------------------
# GPT-2 (tiktoken)


def _parse_tiktoken(path: Path, raw: bytes) -> dict[bytes, int]:
    """The .tiktoken format: one '<base64 token> <rank>' per line.

    Parsed here rather than with tiktoken.load.load_tiktoken_bpe because that copies the file into a
    cache keyed by the path's name (in $TMPDIR/data-gym-cache), so an edited file at the same path would
    silently keep loading the old ranks.
    """
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error):
            raise DataError(
                f"tokenizer file {path} is not a .tiktoken file: line {lineno} is not '<base64> <rank>'"
            ) from None
    return ranks


def load_tiktoken(path: Path) -> Tokenizer:
    """GPT-2 (r50k_base) from its .tiktoken ranks file: 50,257 ids, <|endoftext|> = 50256."""
    # a FIFO would block for ever, /dev/zero fill the memory: only a regular file of a bounded size is read
    raw = read_regular(path, "tokenizer file", DataError, expect="a .tiktoken file", limit=MAX_TIKTOKEN_BYTES,
                       hint="data.tokenizer is 'bpe' or a GPT-2 .tiktoken file; GPT-2's is 1.6 MB")
    ranks = _parse_tiktoken(path, raw)
    if len(ranks) != GPT2_N_RANKS or set(ranks.values()) != set(range(GPT2_N_RANKS)):
        raise DataError(
            f"tokenizer file {path} has {len(ranks)} ranks; GPT-2 needs ranks 0..{GPT2_N_RANKS - 1} exactly once"
        )
    try:
        enc = tiktoken.Encoding(
            name="gpt2",
            pat_str=GPT2_PAT,
            mergeable_ranks=ranks,
            special_tokens={EOT: GPT2_N_RANKS},
            explicit_n_vocab=GPT2_N_RANKS + 1,
        )
    except (ValueError, AssertionError) as e:
        raise DataError(f"tokenizer file {path} is not a usable GPT-2 vocabulary: {e}") from None
    threads = min(8, os.cpu_count() or 1)
    identity = hashlib.sha256(raw).hexdigest()
    return Tokenizer(
        # other merges in the same format would give other ids; do not let reports call them GPT-2
        name="gpt2" if identity == GPT2_SHA256 else f"gpt2-like-{identity[:8]}",
        vocab_size=enc.n_vocab,
        eot_id=enc.eot_token,
        identity=identity,
        _encode_batch=lambda texts: enc.encode_ordinary_batch(texts, num_threads=threads),
        _decode=enc.decode,
    )


def get_tokenizer(
    spec: str, corpus: Corpus, vocab_size: int, cache_dir: Path, log: Callable[[str], None] | None = None
) -> Tokenizer:
    """'bpe': byte-level BPE trained on `corpus` (cached); otherwise a path to a GPT-2 .tiktoken file."""
    if spec == "bpe":
        return _cached_bpe(corpus, vocab_size, cache_dir, log)
    return load_tiktoken(Path(spec).expanduser())

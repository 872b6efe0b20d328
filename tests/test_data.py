"""Tests for rankprobe.data: corpus loading and its errors, tokenizers, the token cache and the split."""

from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch

from rankprobe.config import ConfigError, DataConfig, DataError
from rankprobe.data import Corpus, Tokenizer, get_tokenizer, load_corpus, prepare, resolve_cache_dir
from rankprobe.data import tokenizer as tokenizer_mod
from rankprobe.data.tokens import TokenData, assign_blocks, split_segments, window_starts

GPT2_FILE = Path(__file__).resolve().parents[2] / "shared" / "tokenizers" / "gpt2.tiktoken"
needs_gpt2 = pytest.mark.skipif(not GPT2_FILE.exists(), reason=f"{GPT2_FILE} not available")

TRICKY = (
    "It is a truth universally acknowledged,  that a single man\n\n\n  in possession of a good fortune\n"
    "\t\tmust be in want of a wife.\r\n\r\nI'll say we've 42 ducks' eggs... — “Moby Dick?” 😀\n \n"
    "x\n\ny \n\n\nz  \n    \nend<|endoftext|>tail\n\n"
)


@pytest.fixture(scope="session")
def sample_text() -> str:
    """~200 KB of real prose (the embedded corpus, from Austen into Melville), for fast real tokenizers."""
    text = load_corpus("embedded").text
    return text[:120_000] + "\n\n" + text[-80_000:]


@pytest.fixture(scope="session")
def sample_file(tmp_path_factory, sample_text) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "sample.txt"
    path.write_text(sample_text, encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def bpe(sample_file, tmp_path_factory) -> Tokenizer:
    return get_tokenizer("bpe", load_corpus(str(sample_file)), 512, tmp_path_factory.mktemp("cache"))


def _error(match: str):
    return pytest.raises(DataError, match=match)


# ---------------------------------------------------------------------------------------------
# corpus


def test_missing_corpus(tmp_path):
    with _error(f"corpus not found: {re.escape(str(tmp_path / 'nope.txt'))}"):
        load_corpus(str(tmp_path / "nope.txt"))


@pytest.mark.parametrize("content", ["", "  \n\t\n  "])
def test_empty_corpus(tmp_path, content):
    path = tmp_path / "empty.txt"
    path.write_text(content)
    with _error(f"corpus {re.escape(str(path))} is empty"):
        load_corpus(str(path))


def test_binary_corpus(tmp_path):
    path = tmp_path / "weights.txt"
    path.write_bytes(b"PK\x03\x04" + b"\x00" * 100)
    with _error(f"{re.escape(str(path))} looks binary"):
        load_corpus(str(path))


def test_non_utf8_corpus_names_offset(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("café au lait".encode("utf-8") + b" na\xefve")
    with _error(f"{re.escape(str(path))} is not UTF-8: invalid byte 0xef at byte offset 16"):
        load_corpus(str(path))


def test_error_is_one_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{oops\n')
    with pytest.raises(DataError) as e:
        load_corpus(str(path))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "lines, match",
    [
        (['{"text": "a"}', "{not json"], "line 2: not valid JSON"),
        (['{"text": "a"}', "", '{"body": "b"}'], "line 3: no field 'text' \\(keys: body"),
        (['["text"]'], "line 1: expected a JSON object"),
        (['{"text": 3}'], "line 1: field 'text' is int"),
    ],
)
def test_bad_jsonl(tmp_path, lines, match):
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with _error(match):
        load_corpus(str(path))


def test_jsonl_corpus(tmp_path):
    path = tmp_path / "docs.jsonl"
    records = [{"body": "first doc\u2028same line"}, {"body": "   "}, {"body": "second", "x": 1}]
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n\n")
    corpus = load_corpus(str(path), jsonl_field="body")
    assert corpus.documents == ("first doc\u2028same line", "second")  # whitespace-only record dropped
    assert corpus.text == "first doc\u2028same line\n\nsecond"


def test_folder_corpus(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / ".git").mkdir()
    (tmp_path / "b" / "two.md").write_text("# two")
    (tmp_path / "a.txt").write_text("one")
    (tmp_path / "c.jsonl").write_text('{"text": "three"}\n{"text": "four"}\n')
    (tmp_path / "skip.py").write_text("print('no')")
    (tmp_path / ".git" / "notes.txt").write_text("hidden")
    corpus = load_corpus(str(tmp_path))
    assert corpus.documents == ("one", "# two", "three", "four")
    assert corpus.text == "one\n\n# two\n\nthree\n\nfour"
    assert corpus.sha256 == load_corpus(str(tmp_path)).sha256


def test_folder_without_text_files(tmp_path):
    (tmp_path / "model.pt").write_bytes(b"\x00\x01")
    with _error(f"corpus folder {re.escape(str(tmp_path))} has no .txt, .md or .jsonl files"):
        load_corpus(str(tmp_path))


def test_embedded_corpus_matches_data_md():
    corpus = load_corpus("embedded")
    doc = (resources.files("rankprobe.data") / "embedded" / "DATA.md").read_text()
    stated = re.search(r"sha256 of the uncompressed text: `([0-9a-f]{64})`", doc).group(1)
    assert corpus.sha256 == stated
    assert corpus.text.startswith("PRIDE AND PREJUDICE") and "Call me Ishmael" in corpus.text


# ---------------------------------------------------------------------------------------------
# tokenizers


@needs_gpt2
def test_gpt2_known_answer(sample_text):
    tok = get_tokenizer(str(GPT2_FILE), None, 0, Path("unused"))
    assert tok.encode("Hello world") == [15496, 995]
    assert (tok.name, tok.vocab_size, tok.eot_id) == ("gpt2", 50257, 50256)
    assert tok.encode("<|endoftext|>") != [50256]  # literal text never becomes the control token
    assert tok.decode(tok.encode(TRICKY)) == TRICKY
    # pieces cut at safe points encode exactly like the whole text
    whole = tok.encode_batch([sample_text])[0]
    pieces = tokenizer_mod.split_pieces(sample_text, 1)
    assert [i for ids in tok.encode_batch(pieces) for i in ids] == whole


def test_tiktoken_bad_files(tmp_path):
    with _error("tokenizer file not found"):
        get_tokenizer(str(tmp_path / "gpt2.tiktoken"), None, 0, tmp_path)
    with _error("is not a .tiktoken file but a folder"):
        get_tokenizer(str(tmp_path), None, 0, tmp_path)
    garbage = tmp_path / "garbage.tiktoken"
    garbage.write_bytes(bytes(range(256)) * 4)
    with _error(f"{re.escape(str(garbage))} is not a .tiktoken file: line 1"):
        get_tokenizer(str(garbage), None, 0, tmp_path)
    short = tmp_path / "short.tiktoken"
    short.write_text("IQ== 0\nIg== 1\n")
    with _error("has 2 ranks; GPT-2 needs"):
        get_tokenizer(str(short), None, 0, tmp_path)


def test_bpe_roundtrip(bpe, sample_text):
    assert bpe.name == "bpe-512" and bpe.vocab_size == 512 and bpe.eot_id == 0
    ids = bpe.encode(TRICKY)
    assert all(0 <= i < 512 for i in ids) and bpe.eot_id not in ids
    assert bpe.decode(ids) == TRICKY
    # chunked encoding (what encode and encode_documents do) equals encoding the text in one piece
    for text in (TRICKY, sample_text[:30_000]):
        whole = bpe.encode_batch([text])[0]
        pieces = tokenizer_mod.split_pieces(text, 1)
        assert len(pieces) > 3 and "".join(pieces) == text
        assert [i for p in bpe.encode_batch(pieces) for i in p] == whole
    # a tokenizer trained on whitespace-heavy text has merged whitespace runs, where bad cuts would show
    spacey = tokenizer_mod.train_bpe(Corpus(documents=(TRICKY * 30,), source="tricky"), 300)
    pieces_of_space = [spacey.decode([i]) for i in range(spacey.vocab_size)]
    assert any(len(t) > 1 and t.isspace() for t in pieces_of_space)
    pieces = tokenizer_mod.split_pieces(TRICKY * 3, 1)
    assert [i for p in spacey.encode_batch(pieces) for i in p] == spacey.encode_batch([TRICKY * 3])[0]


def test_bpe_cache_reused(tmp_path, sample_file, monkeypatch):
    corpus = load_corpus(str(sample_file))
    first = get_tokenizer("bpe", corpus, 300, tmp_path)
    assert len(list((tmp_path / "tokenizers").glob("*.json"))) == 1

    def no_training(*a, **k):
        raise AssertionError("retrained although a cached tokenizer exists")

    monkeypatch.setattr(tokenizer_mod, "_train_hf", no_training)
    second = get_tokenizer("bpe", corpus, 300, tmp_path)
    assert second.identity == first.identity
    assert second.encode(corpus.text[:5000]) == first.encode(corpus.text[:5000])


def test_bpe_vocab_too_small(tmp_path, sample_file):
    with pytest.raises(ConfigError, match="data.vocab_size must be at least 257"):
        get_tokenizer("bpe", load_corpus(str(sample_file)), 100, tmp_path)


def test_encode_documents_puts_eot_first(bpe):
    stream = bpe.encode_documents(["one two", "three"])
    assert stream.dtype == np.uint32
    assert stream[0] == bpe.eot_id and (stream == bpe.eot_id).sum() == 2
    assert bpe.decode(stream) == "<|endoftext|>one two<|endoftext|>three"


# ---------------------------------------------------------------------------------------------
# the split


def test_split_tiles_stream_and_spreads_holdouts():
    n, block = 1_000_003, 2048
    seg = split_segments(n, block, val_frac=0.05, probe_frac=0.02)
    allseg = np.concatenate(list(seg.values()))
    allseg = allseg[np.argsort(allseg[:, 0])]
    assert allseg[0, 0] == 0 and allseg[-1, 1] == n and (allseg[1:, 0] == allseg[:-1, 1]).all()
    sizes = {k: int((v[:, 1] - v[:, 0]).sum()) for k, v in seg.items()}
    assert abs(sizes["val"] / n - 0.05) < 0.005 and abs(sizes["probe"] / n - 0.02) < 0.005
    for name in ("val", "probe"):  # spread along the stream, not piled at one end
        assert seg[name][0, 0] < 0.15 * n and seg[name][-1, 1] > 0.85 * n
    roles = assign_blocks(10, 0.05, 0.02)
    assert (roles == 1).sum() == 1 and (roles == 2).sum() == 1  # at least one block each


def _fake_data(n: int, seq_len: int = 16, batch_size: int = 8) -> TokenData:
    """TokenData whose token at position p is p, so every window reveals where it came from."""
    tok = Tokenizer("positions", n, 0, "fake", lambda texts: [], lambda ids: "")
    return TokenData(np.arange(n, dtype=np.uint32), tok, "fake", "0" * 64, seq_len, batch_size, 0.05, 0.02)


def _inside(starts: np.ndarray, span: int, segments: np.ndarray) -> bool:
    s = np.searchsorted(segments[:, 0], starts, side="right") - 1
    return bool((s >= 0).all() and (starts + span <= segments[s, 1]).all())


def test_train_windows_stay_in_train_region():
    data = _fake_data(50_000)
    for step in range(200):
        x, y = data.train_batch(step, seed=3)
        assert x.shape == y.shape == (8, 16) and x.dtype == torch.int64
        assert torch.equal(y, x + 1) and torch.equal(x[:, 1:], x[:, :1] + torch.arange(1, 16))
        assert _inside(x[:, 0].numpy(), 17, data.segments["train"])


def test_train_batch_is_function_of_seed_and_step():
    data = _fake_data(50_000)
    a, b = data.train_batch(7, seed=1), data.train_batch(7, seed=1)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], data.train_batch(8, seed=1)[0])
    assert not torch.equal(a[0], data.train_batch(7, seed=2)[0])
    assert data.train_batch(0, 0, batch_size=3, seq_len=40)[0].shape == (3, 40)


def test_val_and_probe_are_fixed_and_in_their_regions():
    data = _fake_data(200_000, seq_len=16, batch_size=8)
    batches = list(data.val_batches(1000))
    assert batches and all(torch.equal(a[0], b[0]) for a, b in zip(batches, data.val_batches(1000)))
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    assert len(x) == 63 == data.n_val_windows(1000) and torch.equal(y, x + 1)
    assert _inside(x[:, 0].numpy(), 17, data.segments["val"])
    assert x[0, 0] < 0.2 * data.n_tokens and x[-1, 0] > 0.8 * data.n_tokens  # sampled along the corpus
    probe = data.probe_tokens(500)
    assert probe.shape == (32, 16) and torch.equal(probe, data.probe_tokens(500))
    assert _inside(probe[:, 0].numpy(), 16, data.segments["probe"])
    assert len(np.unique(probe.numpy())) == probe.numel()  # windows do not overlap
    with _error("probe sequences of 16 tokens; probe.tokens 1000000 needs"):
        data.probe_tokens(1_000_000)


def test_window_starts():
    seg = np.array([[0, 10], [20, 41]])
    assert window_starts(seg, 5, 4).tolist() == [0, 4, 20, 24, 28, 32, 36]


# ---------------------------------------------------------------------------------------------
# prepare: end to end, cache, errors


def test_prepare_caches_tokens(tmp_path, sample_file, monkeypatch):
    cfg = DataConfig(corpus=str(sample_file), vocab_size=400)
    data = prepare(cfg, seq_len=32, batch_size=4, cache_dir=tmp_path)
    assert data.vocab_size == 400 and data.tokenizer_name == "bpe-400" and data.ids.dtype == np.uint16
    assert data.n_train_tokens + data.n_val_tokens + data.n_probe_tokens == data.n_tokens == len(data.ids)
    meta = json.loads(data.cache_path.with_suffix(".json").read_text())
    assert meta["length"] == data.n_tokens and meta["dtype"] == "uint16"
    mtime = data.cache_path.stat().st_mtime_ns

    def no_encoding(*a, **k):
        raise AssertionError("re-encoded although cached ids exist")

    monkeypatch.setattr(Tokenizer, "encode_documents", no_encoding)
    again = prepare(cfg, seq_len=32, batch_size=4, cache_dir=tmp_path)
    assert again.cache_path == data.cache_path and data.cache_path.stat().st_mtime_ns == mtime
    assert np.array_equal(again.ids, data.ids)
    assert torch.equal(again.train_batch(5, 0)[0], data.train_batch(5, 0)[0])


def test_prepare_rebuilds_truncated_cache(tmp_path, sample_file):
    cfg = DataConfig(corpus=str(sample_file), vocab_size=400)
    data = prepare(cfg, seq_len=32, batch_size=4, cache_dir=tmp_path)
    full = np.array(data.ids)
    data.cache_path.write_bytes(data.cache_path.read_bytes()[:100])
    assert np.array_equal(prepare(cfg, seq_len=32, batch_size=4, cache_dir=tmp_path).ids, full)


def test_prepare_tiny_corpus(tmp_path):
    path = tmp_path / "tiny.txt"
    path.write_text("hello world, hello there.\n" * 20)
    cfg = DataConfig(corpus=str(path), vocab_size=300)
    with _error(r"has 0 training tokens \(of \d+\); one batch needs 132 \(train.batch_size 4"):
        prepare(cfg, seq_len=32, batch_size=4, cache_dir=tmp_path / "cache")


def test_cache_dir_not_writable(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with _error(f"cache directory {re.escape(str(blocker / 'cache'))} is not writable"):
        prepare(DataConfig(cache_dir=str(blocker / "cache")), 16, 2)
    monkeypatch.setenv("RANKPROBE_CACHE", str(tmp_path / "env-cache"))
    assert resolve_cache_dir("") == tmp_path / "env-cache" and (tmp_path / "env-cache").is_dir()
    assert resolve_cache_dir(str(tmp_path / "explicit")) == tmp_path / "explicit"


@pytest.mark.slow
def test_prepare_embedded_default(tmp_path_factory):
    """The default corpus end to end (one BPE training, ~1.5M tokens; a few seconds)."""
    data = prepare(DataConfig(vocab_size=512), seq_len=256, batch_size=4, cache_dir=tmp_path_factory.mktemp("emb"))
    assert data.corpus_sha256 == load_corpus("embedded").sha256
    assert data.n_tokens > 1_000_000 and data.ids[0] == data.eot_id
    assert 0.04 < data.n_val_tokens / data.n_tokens < 0.06 and 0.015 < data.n_probe_tokens / data.n_tokens < 0.025
    # Melville fills the last ~23% of the stream: val and probe must both reach into it
    assert data.segments["val"][-1, 0] > 0.8 * data.n_tokens and data.segments["probe"][-1, 0] > 0.8 * data.n_tokens
    x, y = data.train_batch(0, 0)
    assert x.shape == (4, 256) and int(x.max()) < 512
    assert data.tokenizer.decode(data.probe_tokens(512)[0]).strip()

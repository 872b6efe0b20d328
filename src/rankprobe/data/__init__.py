"""Data for RankProbe: corpora (corpus.py), tokenizers (tokenizer.py), cached token streams and the
train / val / probe split (tokens.py), and the embedded Austen + Melville corpus (embedded/, see DATA.md).

Typical use: `data = prepare(cfg.data, cfg.model.seq_len, cfg.train.batch_size)`, then
`data.train_batch(step, seed)`, `data.val_batches(n_tokens)`, `data.probe_tokens(n_tokens)`.
"""

from rankprobe.data.corpus import Corpus, load_corpus
from rankprobe.data.tokenizer import Tokenizer, get_tokenizer
from rankprobe.data.tokens import TokenData, prepare, resolve_cache_dir

__all__ = ["Corpus", "Tokenizer", "TokenData", "get_tokenizer", "load_corpus", "prepare", "resolve_cache_dir"]

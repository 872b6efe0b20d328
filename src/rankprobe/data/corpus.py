"""Loading a text corpus: the embedded Austen + Melville default, a .txt file, a folder, or JSONL.

`load_corpus(spec)` returns a `Corpus`: its documents, their text joined by blank lines, and the
sha256 of that text, which keys every cache built from it (tokenizers, token ids). Anything that
cannot be used raises `DataError` with one line naming the file and the problem, so the CLI can
print it without a traceback.
"""

from __future__ import annotations

import hashlib
import json
import lzma
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from rankprobe.errors import DataError
from rankprobe.files import read_regular

EMBEDDED = "embedded"
EMBEDDED_FILE = "austen-moby.txt.xz"
TEXT_SUFFIXES = (".txt", ".md")
JSONL_SUFFIX = ".jsonl"
BINARY_SNIFF_BYTES = 8192  # a NUL byte in the first 8 KB is the same heuristic git and grep use
DOC_SEPARATOR = "\n\n"


@dataclass(frozen=True)
class Corpus:
    """A loaded corpus. `text` is `documents` joined by blank lines; `sha256` is of its UTF-8 bytes."""

    documents: tuple[str, ...] = field(repr=False)
    source: str
    text: str = field(init=False, repr=False)
    sha256: str = field(init=False)

    def __post_init__(self) -> None:
        text = DOC_SEPARATOR.join(self.documents)
        object.__setattr__(self, "text", text)
        object.__setattr__(self, "sha256", hashlib.sha256(text.encode("utf-8")).hexdigest())

    @property
    def boundaries_sha256(self) -> str:
        """Hash of the document lengths: two corpora with one text but other splits get other eots."""
        lengths = ",".join(str(len(d)) for d in self.documents)
        return hashlib.sha256(lengths.encode()).hexdigest()


def load_corpus(spec: str, jsonl_field: str = "text") -> Corpus:
    """'embedded', a text file, a .jsonl file (one object per line) or a folder of .txt/.md/.jsonl."""
    if spec == EMBEDDED:
        return Corpus(documents=(_embedded_text(),), source=f"{EMBEDDED}:{EMBEDDED_FILE}")
    if not spec.strip():  # Path("") is the current folder: an unset variable would train on whatever lies there
        raise DataError("the corpus is an empty string (use 'embedded', a .txt/.jsonl file or a folder)")
    path = Path(spec).expanduser()
    if not path.exists():
        raise DataError(f"corpus not found: {spec} (use 'embedded', a .txt/.jsonl file or a folder)")
    if path.is_dir():
        docs = _folder_documents(path, jsonl_field)
    elif path.suffix == JSONL_SUFFIX:
        docs = _jsonl_documents(path, jsonl_field)
    else:
        docs = [_read_text(path)]
    docs = [d for d in docs if d.strip()]  # whitespace-only files and records carry nothing to learn
    if not docs:
        raise DataError(f"corpus {spec} is empty (no non-whitespace text)")
    return Corpus(documents=tuple(docs), source=str(path))


def _embedded_text() -> str:
    blob = resources.files("rankprobe.data").joinpath("embedded", EMBEDDED_FILE)
    try:
        return lzma.decompress(blob.read_bytes()).decode("utf-8")
    except (OSError, lzma.LZMAError) as e:
        raise DataError(f"embedded corpus {EMBEDDED_FILE} is missing or damaged ({e}); reinstall rankprobe") from None


def _folder_documents(root: Path, jsonl_field: str) -> list[str]:
    """Every .txt/.md/.jsonl file under `root`, in sorted relative-path order so the text is stable."""
    files = sorted(
        (p for p in root.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES + (JSONL_SUFFIX,)),
        key=lambda p: p.relative_to(root).as_posix(),
    )
    # hidden folders (.git, .venv, ...) hold tooling, not corpus text
    files = [p for p in files if not any(part.startswith(".") for part in p.relative_to(root).parts)]
    if not files:
        raise DataError(f"corpus folder {root} has no .txt, .md or .jsonl files")
    docs: list[str] = []
    for p in files:
        if p.suffix == JSONL_SUFFIX:
            docs += _jsonl_documents(p, jsonl_field)
        else:
            docs.append(_read_text(p))
    return docs


def _decode(path: Path, raw: bytes) -> str:
    nul = raw.find(b"\x00", 0, BINARY_SNIFF_BYTES)
    if nul >= 0:
        raise DataError(f"corpus file {path} looks binary (NUL byte at offset {nul}); expected UTF-8 text")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        bad = raw[e.start : e.start + 1].hex()
        raise DataError(f"corpus file {path} is not UTF-8: invalid byte 0x{bad} at byte offset {e.start}") from None
    return text.removeprefix("\ufeff")  # a BOM is an encoding marker, not text


def _read_text(path: Path) -> str:
    # only a regular file of at most an eighth of the memory: a FIFO or /dev/zero would never end
    return _decode(path, read_regular(path, "corpus file", DataError))


def _jsonl_documents(path: Path, jsonl_field: str) -> list[str]:
    """One document per non-blank line; each line must be an object with a string `jsonl_field`."""
    docs = []
    # split on "\n" only: str.splitlines() also breaks at U+2028 and friends, which JSON strings may hold raw
    for lineno, line in enumerate(_read_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"corpus file {path} line {lineno}: not valid JSON ({e.msg})") from None
        except RecursionError:
            raise DataError(f"corpus file {path} line {lineno}: JSON nested too deep") from None
        if not isinstance(record, dict):
            raise DataError(f"corpus file {path} line {lineno}: expected a JSON object, got {type(record).__name__}")
        if jsonl_field not in record:
            keys = ", ".join(sorted(record)) or "none"
            raise DataError(
                f"corpus file {path} line {lineno}: no field {jsonl_field!r} (keys: {keys}; set data.jsonl_field)"
            )
        value = record[jsonl_field]
        if not isinstance(value, str):
            raise DataError(
                f"corpus file {path} line {lineno}: field {jsonl_field!r} is {type(value).__name__}, not a string"
            )
        docs.append(value)
    return docs

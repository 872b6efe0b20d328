"""Fixtures shared by the end-to-end, resume and distributed tests."""

import pytest

from rankprobe.data.corpus import load_corpus


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory):
    """The first ~150 KB of the embedded corpus: real English, fast to tokenize."""
    path = tmp_path_factory.mktemp("corpus") / "austen.txt"
    path.write_text(load_corpus("embedded").text[:150_000], encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")

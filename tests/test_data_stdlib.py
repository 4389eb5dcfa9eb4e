"""The embedded corpus: the running interpreter's standard library, built for real."""

import time

import numpy as np

from es_llm.data import load_corpus
from es_llm.data.documents import STDLIB_EXCLUDED_DIRS, stdlib_files


def test_stdlib_file_selection_is_sorted_and_excludes_tests():
    files = stdlib_files()
    rels = [rel for rel, _ in files]
    assert len(rels) > 100
    assert rels == sorted(rels)
    assert all(rel.endswith(".py") for rel in rels)
    for rel in rels:
        assert not set(rel.split("/")[:-1]) & STDLIB_EXCLUDED_DIRS, rel
    assert "os.py" in rels and "json/__init__.py" in rels
    assert stdlib_files(max_documents=5) == files[:5]


def test_stdlib_corpus_builds_and_is_cached(tmp_path):
    t0 = time.perf_counter()
    a = load_corpus(None, seq_len=128, vocab_size=512, cache_dir=tmp_path, progress=False)
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    b = load_corpus("stdlib", seq_len=128, vocab_size=512, cache_dir=tmp_path, progress=False)
    hit_s = time.perf_counter() - t0
    print(f"stdlib corpus: {a.stats}, build {build_s:.1f}s, cache hit {hit_s:.3f}s")

    s = a.stats
    assert a.name == "stdlib" and b.cache_path == a.cache_path
    assert s["split_rule"] == "hash"
    assert s["documents"] == len(stdlib_files())
    assert 0 < s["val_documents"] < s["documents"] / 5
    assert len(a.train) == s["train_sequences"] > 1000
    assert len(a.val) == s["val_sequences"] > 10
    assert a.vocab_size == 512
    assert a.train["id"][-3:] == list(range(len(a.train) - 3, len(a.train)))
    first = np.asarray(a.train["input_ids"][:4])
    assert np.array_equal(first, np.asarray(b.train["input_ids"][:4]))

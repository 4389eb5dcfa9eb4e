"""load_corpus on small synthetic corpora: formats, caching, split hygiene, bad-input errors."""

import json
import multiprocessing as mp
import random
import shutil

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer

import es_llm.data.corpus as corpus_mod
import es_llm.data.sources as sources
from es_llm.data import load_corpus
from es_llm.data.documents import stable_hash

WORDS = [
    "alpha",
    "beta",
    "gamma",
    "delta",
    "epsilon",
    "zeta",
    "eta",
    "theta",
    "iota",
    "kappa",
    "lambda",
    "mu",
    "nu",
    "xi",
    "pi",
    "rho",
]
VOCAB = 300
T = 16


def make_texts(n_docs=40, words=60, seed=0):
    rng = random.Random(seed)
    return [
        f"docmark{i:04d}zz " + " ".join(rng.choice(WORDS) for _ in range(words)) + "\n"
        for i in range(n_docs)
    ]


@pytest.fixture
def txt_dir(tmp_path):
    d = tmp_path / "txt"
    d.mkdir()
    for i, t in enumerate(make_texts()):
        (d / f"doc{i:03d}.txt").write_text(t)
    return d


def build(data, cache, **kw):
    kw.setdefault("seq_len", T)
    kw.setdefault("vocab_size", VOCAB)
    return load_corpus(str(data), cache_dir=cache, progress=False, **kw)


def rows(ds):
    return np.asarray(ds["input_ids"][:], dtype=np.int64).reshape(len(ds), -1)


def test_txt_dir_columns_ids_and_tokens(txt_dir, tmp_path):
    c = build(txt_dir, tmp_path / "cache")
    assert c.train.features["id"].dtype == "int64"
    assert c.train.features["input_ids"].feature.dtype == "int32"
    assert c.train.features["input_ids"].length == T
    assert c.train["id"][:] == list(range(len(c.train)))
    assert c.val["id"][:] == list(range(len(c.val)))
    assert len(c.train) > 0 and len(c.val) > 0
    r = rows(c.train)
    assert r.shape == (len(c.train), T) and r.min() >= 0 and r.max() < c.vocab_size
    assert c.vocab_size <= VOCAB and c.seq_len == T
    assert (r == c.eod_id).sum() > 0  # documents are separated
    s = c.stats
    assert s["documents"] == 40 == s["train_documents"] + s["val_documents"]
    assert s["train_sequences"] == s["train_tokens"] // T == len(c.train)
    assert Tokenizer.from_file(c.tokenizer_path).get_vocab_size() == c.vocab_size


def test_stable_ids_across_two_builds(txt_dir, tmp_path):
    a = build(txt_dir, tmp_path / "c1")
    b = build(txt_dir, tmp_path / "c2")
    assert np.array_equal(rows(a.train), rows(b.train))
    assert np.array_equal(rows(a.val), rows(b.val))


def test_second_load_is_a_cache_hit(txt_dir, tmp_path, monkeypatch):
    a = build(txt_dir, tmp_path / "cache")

    def no_build(*args, **kwargs):
        raise AssertionError("rebuilt although cached")

    monkeypatch.setattr(corpus_mod, "_build", no_build)
    b = build(txt_dir, tmp_path / "cache")
    assert b.cache_path == a.cache_path
    assert np.array_equal(rows(a.train), rows(b.train))
    # a different seq_len is another entry (and builds)
    with pytest.raises(AssertionError, match="rebuilt"):
        build(txt_dir, tmp_path / "cache", seq_len=T + 1)


def test_changed_file_invalidates_the_cache(txt_dir, tmp_path):
    a = build(txt_dir, tmp_path / "cache")
    (txt_dir / "doc000.txt").write_text(make_texts(1, seed=99)[0] * 3)
    b = build(txt_dir, tmp_path / "cache")
    assert b.cache_path != a.cache_path


def _decoded_markers(c):
    tok = Tokenizer.from_file(c.tokenizer_path)
    out = {}
    for split in ("train", "val"):
        text = tok.decode(rows(getattr(c, split)).reshape(-1).tolist(), skip_special_tokens=False)
        out[split] = {w[:11] for w in text.split() if w.startswith("docmark") and len(w) >= 11}
    return out


def test_no_document_in_both_train_and_val(txt_dir, tmp_path):
    c = build(txt_dir, tmp_path / "cache")
    m = _decoded_markers(c)
    assert m["train"] and m["val"]
    assert not (m["train"] & m["val"])
    held_out = {f"docmark{i:04d}" for i in range(40) if stable_hash(f"doc{i:03d}.txt#0") % 20 == 0}
    assert c.stats["split_rule"] == "hash"
    assert m["val"] <= held_out


def test_val_split_falls_back_to_trailing_documents(tmp_path):
    d = tmp_path / "few"
    d.mkdir()
    names = [f"n{i}.txt" for i in range(200) if stable_hash(f"n{i}.txt#0") % 20 != 0][:5]
    for name, text in zip(names, make_texts(5, words=80), strict=True):
        (d / name).write_text(text)
    c = build(d, tmp_path / "cache")
    assert c.stats["split_rule"] == "tail"
    assert len(c.val) >= 1 and len(c.train) >= 1
    m = _decoded_markers(c)
    assert not (m["train"] & m["val"])
    assert "docmark0004" in m["val"]  # the last document is held out


def test_max_samples_truncate_to_first_rows(txt_dir, tmp_path):
    full = build(txt_dir, tmp_path / "cache")
    cut = build(txt_dir, tmp_path / "cache", max_train_samples=5, max_val_samples=1)
    assert len(cut.train) == 5 and len(cut.val) == 1
    assert np.array_equal(rows(cut.train), rows(full.train)[:5])
    assert cut.train["id"][:] == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="max_train_samples"):
        build(txt_dir, tmp_path / "cache", max_train_samples=0)


def test_jsonl_json_and_parquet_give_the_same_corpus(txt_dir, tmp_path):
    tok = build(txt_dir, tmp_path / "cache").tokenizer_path
    texts = make_texts()
    jl = tmp_path / "data.jsonl"
    jl.write_text("".join(json.dumps({"text": t, "meta": i}) + "\n" for i, t in enumerate(texts)))
    js = tmp_path / "data.json"
    js.write_text(json.dumps([{"text": t} for t in texts]))
    pqf = tmp_path / "data.parquet"
    pq.write_table(pa.table({"text": texts, "n": list(range(len(texts)))}), pqf)
    built = [build(p, tmp_path / "cache", tokenizer=tok) for p in (jl, js, pqf)]
    for c in built:
        assert c.stats["documents"] == len(texts)
        assert len(c.train) > 0 and len(c.val) > 0
    # same texts, same tokenizer: the same token stream (the split differs: keys name the file)
    assert len({c.stats["tokens"] for c in built}) == 1


def test_user_tokenizer_file_and_hf_directory(txt_dir, tmp_path):
    first = build(txt_dir, tmp_path / "cache")
    by_file = build(txt_dir, tmp_path / "cache", tokenizer=first.tokenizer_path, vocab_size=9999)
    assert np.array_equal(rows(by_file.train), rows(first.train))
    hf = tmp_path / "hf_tok"
    hf.mkdir()
    shutil.copyfile(first.tokenizer_path, hf / "tokenizer.json")
    (hf / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    by_dir = build(txt_dir, tmp_path / "cache", tokenizer=str(hf))
    assert by_dir.vocab_size == first.vocab_size and by_dir.eod_id == first.eod_id
    with pytest.raises(ValueError, match="tokenizer path does not exist"):
        build(txt_dir, tmp_path / "cache", tokenizer=str(tmp_path / "nope.json"))
    (tmp_path / "empty_tok").mkdir()
    with pytest.raises(ValueError, match="no tokenizer.json"):
        build(txt_dir, tmp_path / "cache", tokenizer=str(tmp_path / "empty_tok"))


def test_hub_dataset_through_monkeypatched_load_dataset(tmp_path, monkeypatch):
    calls = []

    def fake_load_dataset(name, config=None, *, split, streaming):
        calls.append((name, config, split, streaming))
        return datasets.Dataset.from_dict({"text": make_texts(), "label": [0] * 40})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    c = load_corpus(
        "someorg/somedata:en", seq_len=T, vocab_size=VOCAB, cache_dir=tmp_path, progress=False
    )
    assert calls[0] == ("someorg/somedata", "en", "train", False)
    assert c.stats["documents"] == 40 and len(c.train) > 0 and len(c.val) > 0
    load_corpus("plainname", seq_len=T, vocab_size=VOCAB, cache_dir=tmp_path, progress=False)
    assert calls[-1][:2] == ("plainname", None)


def test_hub_errors_name_the_dataset(tmp_path, monkeypatch):
    def offline(name, config=None, **kw):
        raise ConnectionError("no internet")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    # the hub answers, the load fails: datasets' reason is kept
    monkeypatch.setattr(sources, "hub_unreachable", lambda: None)
    with pytest.raises(ValueError, match=r"'org/missing'.*not a local path.*no internet"):
        load_corpus("org/missing", seq_len=T, cache_dir=tmp_path)
    # the hub does not answer and nothing is cached: why, and what to do
    monkeypatch.setattr(sources, "hub_unreachable", lambda: "offline mode is set (X)")
    with pytest.raises(
        ValueError, match=r"'org/missing'.*offline mode is set \(X\), and the dataset is not in "
    ):
        load_corpus("org/missing", seq_len=T, cache_dir=tmp_path)
    monkeypatch.setattr(
        datasets, "load_dataset", lambda *a, **k: datasets.Dataset.from_dict({"body": ["x"]})
    )
    with pytest.raises(ValueError, match="no 'text' column; available columns: body"):
        load_corpus("org/notext", seq_len=T, cache_dir=tmp_path)


def test_nonexistent_path(tmp_path):
    for p in (str(tmp_path / "missing"), "./no/such/dir", "nothere.jsonl"):
        with pytest.raises(ValueError, match="does not exist"):
            load_corpus(p, seq_len=T, cache_dir=tmp_path)


def test_jsonl_without_text_field_names_file_and_fields(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps({"content": "a", "id": 1}) + "\n")
    with pytest.raises(
        ValueError, match=r"bad\.jsonl.*no 'text' field; available fields: content, id"
    ):
        load_corpus(str(p), seq_len=T, cache_dir=tmp_path)
    q = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"body": ["a"]}), q)
    with pytest.raises(
        ValueError, match=r"bad\.parquet.*no 'text' column; available columns: body"
    ):
        load_corpus(str(q), seq_len=T, cache_dir=tmp_path)


def test_empty_dataset(tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    with pytest.raises(ValueError, match="no data files"):
        load_corpus(str(d), seq_len=T, cache_dir=tmp_path)
    (d / "a.txt").write_text("")
    (d / "b.txt").write_text("   \n")
    with pytest.raises(ValueError, match="no documents with text"):
        load_corpus(str(d), seq_len=T, cache_dir=tmp_path)
    j = tmp_path / "blank.jsonl"
    j.write_text(json.dumps({"text": ""}) + "\n" + json.dumps({"text": None}) + "\n")
    with pytest.raises(ValueError, match="no documents with text"):
        load_corpus(str(j), seq_len=T, cache_dir=tmp_path)


def test_documents_shorter_than_seq_len(tmp_path):
    d = tmp_path / "short"
    d.mkdir()
    for i in range(3):
        (d / f"{i}.txt").write_text(f"tiny doc {i}")
    with pytest.raises(ValueError, match=r"only \d+ tokens.*seq_len=512 needs at least 1024"):
        load_corpus(str(d), seq_len=512, vocab_size=VOCAB, cache_dir=tmp_path, progress=False)
    assert not any(p.name.startswith(".build") for p in tmp_path.iterdir())  # temp dir cleaned


def test_bad_parameters(txt_dir, tmp_path):
    with pytest.raises(ValueError, match="seq_len"):
        build(txt_dir, tmp_path, seq_len=1)
    with pytest.raises(ValueError, match="vocab_size must be at least 257"):
        build(txt_dir, tmp_path, vocab_size=100)
    one = tmp_path / "one.txt"
    one.write_text("just one document " * 50)
    with pytest.raises(ValueError, match="holds 899 characters.*needs at least 2000"):
        build(one, tmp_path)
    folder = tmp_path / "one_file"
    folder.mkdir()
    (folder / "only.txt").write_text("just one document " * 50)
    with pytest.raises(ValueError, match="at least 2 documents.*folder of several files"):
        build(folder, tmp_path)


def _load_in_child(data, cache, q):
    c = load_corpus(data, seq_len=T, vocab_size=VOCAB, cache_dir=cache, progress=False)
    q.put((c.cache_path, len(c.train), c.train["input_ids"][0]))


def test_concurrent_builds_do_not_corrupt_the_cache(txt_dir, tmp_path):
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    procs = [
        ctx.Process(target=_load_in_child, args=(str(txt_dir), str(tmp_path / "cache"), q))
        for _ in range(3)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    results = [q.get(timeout=5) for _ in procs]
    assert len(set(map(str, results))) == 1
    cache = tmp_path / "cache"
    entries = [p for p in cache.iterdir() if p.is_dir() and p.name not in ("tokenizers", "locks")]
    assert len(entries) == 1  # one entry, no leftover temp dirs
    # lock files are kept in one place, never beside the entries
    assert [p.name for p in cache.iterdir() if p.is_file()] == []
    assert [p.suffix for p in (cache / "locks").iterdir()] == [".lock"]

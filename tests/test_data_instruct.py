"""Instruction data: forms, completion-only labels, truncation counts, chat templates, split."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from es_llm.data import load_corpus
from es_llm.data.documents import is_val_group
from es_llm.data.instruct import IGNORE_INDEX, InstructDataError, is_instruct_data
from es_llm.data.instruct_build import SplitReport, fit_sample
from es_llm.data.instruct_sets import function_records
from es_llm.data.tokenizer import EOD_TOKEN, train_bpe
from es_llm.errors import InputError

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
]
TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}" + EOD_TOKEN + "{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


def phrase(i: int, n: int) -> str:
    return " ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(n))


def pc_records(n: int = 60) -> list[dict]:
    return [
        {"prompt": f"Q{i}: {phrase(i, 3)}?", "completion": f" {phrase(i + 1, 4)}."}
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def chat_tokenizer(tmp_path_factory) -> Path:
    """A tiny Hugging Face tokenizer directory with a chat template."""
    d = tmp_path_factory.mktemp("chat_tok")
    tok = train_bpe([" ".join(WORDS) + " <user> <assistant> <system> ?:."] * 10, 300)
    tok.save(str(d / "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOD_TOKEN}
    (d / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": TEMPLATE}))
    return d


def load(data: Path | str, cache: Path, **kw):
    kw.setdefault("seq_len", 32)
    kw.setdefault("vocab_size", 300)
    return load_corpus(str(data), cache_dir=cache, progress=False, **kw)


def decode(corpus, ids) -> str:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(corpus.tokenizer_path)
    return tok.decode([int(i) for i in ids], skip_special_tokens=False)


def test_prompt_completion_labels_mask_prompt_and_padding(tmp_path):
    from tokenizers import Tokenizer

    recs = pc_records()
    c = load(write_jsonl(tmp_path / "pc.jsonl", recs), tmp_path / "cache")
    assert c.train.column_names == ["id", "input_ids", "labels"]
    assert c.composition["instruct"]["records"] == len(recs)
    tok = Tokenizer.from_file(c.tokenizer_path)
    by_text = {r["prompt"]: r for r in recs}
    for row in list(c.train) + list(c.val):
        ids, labels = np.array(row["input_ids"]), np.array(row["labels"])
        assert len(ids) == len(labels) == 32
        # recover the record from its prompt: the tokens before the first label
        p = int(np.argmax(labels != IGNORE_INDEX))
        rec = by_text[tok.decode(ids[:p].tolist())]
        n_prompt = len(tok.encode(rec["prompt"], add_special_tokens=False).ids)
        n_comp = len(tok.encode(rec["completion"], add_special_tokens=False).ids) + 1  # + eod
        assert p == n_prompt
        ignored = np.ones(32, bool)
        ignored[n_prompt : n_prompt + n_comp] = False
        assert np.array_equal(labels == IGNORE_INDEX, ignored)  # prompt + padding exactly
        assert np.array_equal(labels[~ignored], ids[~ignored])
        assert (ids[n_prompt + n_comp :] == c.eod_id).all()  # right padding with eod
        assert ids[n_prompt + n_comp - 1] == c.eod_id  # the completion ends with eod


def test_truncation_and_drops_are_counted(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    long_prompt = {"prompt": phrase(1, 40), "completion": " alpha"}  # prompt fills seq_len
    long_completion = {"prompt": "Q:", "completion": " " + phrase(2, 40)}  # completion cut
    empty_prompt = {"prompt": "", "completion": " beta"}
    short = [{"prompt": f"Q{i}:", "completion": " mu"} for i in range(20)]
    recs = [long_prompt, long_completion, empty_prompt] * 20 + short
    c = load(write_jsonl(tmp_path / "t.jsonl", recs), tmp_path / "cache", seq_len=16)
    rep = c.composition["instruct"]
    assert rep["records"] == 80
    assert rep["dropped_no_completion_tokens"] == 20
    assert rep["truncated_completions"] == 20
    assert rep["train"]["samples"] + rep["val"]["samples"] == 60
    assert len(c.train) + len(c.val) == 60
    assert "20 left out" in capsys.readouterr().err
    for row in c.train:  # every kept sample has a completion token to predict
        assert (np.array(row["labels"])[1:] != IGNORE_INDEX).any()


def test_fit_sample_edges():
    rep = SplitReport()
    ids = np.arange(1, 7, dtype=np.int32)
    mask = np.array([0, 0, 0, 1, 1, 1], bool)
    assert fit_sample(ids, mask, 3, 0, rep, "a") is None  # prompt alone fills seq_len
    inp, lab = fit_sample(ids, mask, 4, 0, rep, "b")  # one completion token left: cut
    assert inp.tolist() == [1, 2, 3, 4] and lab.tolist() == [-100, -100, -100, 4]
    inp, lab = fit_sample(ids, mask, 8, 0, rep, "c")  # padded
    assert inp.tolist() == [1, 2, 3, 4, 5, 6, 0, 0]
    assert lab.tolist() == [-100, -100, -100, 4, 5, 6, -100, -100]
    # a completion token at position 0 has nothing to be predicted from
    assert fit_sample(ids[:1], np.array([1], bool), 4, 0, rep, "d") is None
    assert (rep.records, rep.samples, rep.dropped_no_completion_tokens) == (4, 2, 2)
    assert rep.truncated_completions == 1 and rep.dropped_keys == ["a", "d"]


def test_chat_template_assistant_turns_are_the_completion(tmp_path, chat_tokenizer):
    recs = [
        {
            "messages": [
                {"role": "system", "content": "kappa"},
                {"role": "user", "content": phrase(i, 2)},
                {"role": "assistant", "content": phrase(i + 1, 2)},
                {"role": "user", "content": "mu"},
                {"role": "assistant", "content": "lambda"},
            ]
        }
        for i in range(40)
    ]
    c = load(write_jsonl(tmp_path / "chat.jsonl", recs), tmp_path / "cache", seq_len=48,
             tokenizer=str(chat_tokenizer))  # fmt: skip
    assert c.composition["forms"] == ["conversational"]
    row = c.train[0]
    ids, labels = np.array(row["input_ids"]), np.array(row["labels"])
    i = int(row["id"])
    text = decode(c, ids)
    assert text.startswith(f"<system>kappa{EOD_TOKEN}<user>")
    completion = decode(c, labels[labels != IGNORE_INDEX])
    first = next(r for r in recs if decode(c, ids).find(r["messages"][1]["content"]) > 0)
    want = first["messages"][2]["content"] + EOD_TOKEN + "lambda" + EOD_TOKEN
    assert completion == want, (i, text)
    # the assistant header belongs to the prompt: it is rendered by the generation prompt
    assert "<assistant>" not in completion


def test_conversational_prompt_completion(tmp_path, chat_tokenizer):
    recs = [
        {
            "prompt": [{"role": "user", "content": phrase(i, 2)}],
            "completion": [{"role": "assistant", "content": "theta"}],
        }
        for i in range(40)
    ]
    c = load(write_jsonl(tmp_path / "cpc.jsonl", recs), tmp_path / "cache",
             tokenizer=str(chat_tokenizer))  # fmt: skip
    labels = np.array(c.train[0]["labels"])
    assert decode(c, labels[labels != IGNORE_INDEX]) == "theta" + EOD_TOKEN


def test_conversational_without_chat_template_is_an_input_error(tmp_path, chat_tokenizer):
    recs = [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}]
    data = write_jsonl(tmp_path / "chat.jsonl", recs * 30)
    with pytest.raises(InputError, match="need a chat template.*no --tokenizer"):
        load(data, tmp_path / "c1")
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "tokenizer.json").write_text((chat_tokenizer / "tokenizer.json").read_text())
    with pytest.raises(InputError, match=f"need a chat template.*{bare}"):
        load(data, tmp_path / "c2", tokenizer=str(bare))


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        ({"prompt": "a", "messages": []}, "record 3 mixes 'messages'"),
        ({"prompt": "a", "answer": "b"}, r"record 3 has neither .*fields: answer, prompt"),
        ({"prompt": "a", "completion": 5}, "record 3: 'prompt' and 'completion' must"),
        ({"messages": [{"role": "user", "content": "x"}]}, "record 3 is conversational but"),
    ],
)
def test_bad_records_name_file_and_record(tmp_path, bad, match):
    data = write_jsonl(tmp_path / "bad.jsonl", [*pc_records(3), bad, *pc_records(3)])
    with pytest.raises(InstructDataError, match=f"bad.jsonl: {match}"):
        load(data, tmp_path / "cache")


def test_split_by_group_and_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    recs = [{**r, "group": f"file{i // 3}"} for i, r in enumerate(pc_records(90))]
    pq.write_table(pa.Table.from_pylist(recs), tmp_path / "g.parquet")
    c = load(tmp_path / "g.parquet", tmp_path / "cache")
    assert c.stats["split_rule"] == "hash"
    prompts = {r["prompt"]: r["group"] for r in recs}
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(c.tokenizer_path)

    def groups(ds) -> set[str]:
        out = set()
        for row in ds:
            labels = np.array(row["labels"])
            p = int(np.argmax(labels != IGNORE_INDEX))
            out.add(prompts[tok.decode(list(row["input_ids"][:p]))])
        return out

    val = groups(c.val)
    assert val and all(is_val_group(g) for g in val)
    assert not val & groups(c.train)


def test_val_data_and_packed_text_unchanged(tmp_path):
    train = write_jsonl(tmp_path / "a.jsonl", pc_records(60))
    text = write_jsonl(tmp_path / "text.jsonl", [{"text": phrase(i, 30)} for i in range(30)])
    assert is_instruct_data(str(train)) and is_instruct_data("instruct:stdlib-functions")
    assert not is_instruct_data(str(text)) and not is_instruct_data(None)
    packed = load(text, tmp_path / "cache")
    assert packed.train.column_names == ["id", "input_ids"]
    with pytest.raises(InputError, match="is not instruction data"):
        load(train, tmp_path / "cache", val_data=str(text))
    other = write_jsonl(tmp_path / "b.jsonl", pc_records(200)[100:])
    c = load(train, tmp_path / "cache", val_data=str(other))
    assert c.stats["split_rule"] == "hash-separate-val-data" and len(c.val) > 0
    assert c.composition["val_data"] == "b.jsonl"


def test_stdlib_functions_prompt_is_signature_and_docstring():
    src = (
        "class A:\n"
        "    def f(self, x: int) -> int:\n"
        '        """Twice x.\n\n        More.\n        """\n'
        "        y = x * 2\n"
        "        return y\n"
        "\n"
        "def g():\n"
        '    """Only a docstring."""\n'
        "def h(): 'doc'; return 1\n"
    )
    recs = function_records("pkg/mod.py", src)
    assert len(recs) == 1
    r = recs[0]
    assert r.key == "pkg/mod.py::A.f:2" and r.group == "pkg/mod.py"
    assert r.prompt == 'def f(self, x: int) -> int:\n    """Twice x.\n\n    More.\n    """\n'
    assert r.completion == "    y = x * 2\n    return y\n"


def test_embedded_stdlib_functions_split_by_file(tmp_path):
    c = load("instruct:stdlib-functions", tmp_path / "cache", seq_len=64, max_documents=40)
    rep = c.composition["instruct"]
    assert rep["records"] > 40 and len(c.train) > len(c.val) > 0
    assert rep["train"]["completion_tokens"] > 0
    with pytest.raises(InputError, match="unknown embedded instruction set"):
        load("instruct:nope", tmp_path / "cache")


def test_records_that_are_not_text_are_refused_with_one_line(tmp_path):
    from es_llm.data.sources import NotTextError

    # a NUL inside a field (JSON escapes it, so the file itself is clean text)
    data = write_jsonl(
        tmp_path / "nul.jsonl", [*pc_records(3), {"prompt": "a", "completion": "b\x00c"}]
    )
    with pytest.raises(NotTextError, match=r"nul.jsonl: record 3: its 'completion' is not text"):
        load(data, tmp_path / "cache")
    # a binary file under a .jsonl name
    binary = tmp_path / "ls.jsonl"
    binary.write_bytes(bytes(range(256)) * 64)
    with pytest.raises(NotTextError, match="ls.jsonl"):
        load(str(binary), tmp_path / "cache2")

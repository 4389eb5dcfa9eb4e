"""One .txt file as the data: cut into documents by the stated rule before the split."""

import random

import pytest

from es_llm.data import load_corpus
from es_llm.data.sources import (
    TEXT_DOC_CHARS,
    TEXT_MIN_CHARS,
    TEXT_MIN_DOCS,
    local_source,
    split_text_file,
)
from es_llm.errors import InputError

NAMES = ["HAMLET", "HORATIO", "OPHELIA", "POLONIUS", "LAERTES", "GERTRUDE", "CLAUDIUS"]
WORDS = [
    "the",
    "a",
    "lord",
    "night",
    "king",
    "crown",
    "sword",
    "ghost",
    "speak",
    "now",
    "doth",
    "thou",
    "thee",
    "hath",
    "not",
    "what",
    "where",
    "madness",
    "love",
    "death",
    "sleep",
    "dream",
    "grave",
    "question",
    "truth",
    "heaven",
    "earth",
    "mother",
    "father",
]


def make_play(chars: int, seed: int = 0) -> str:
    """A play-shaped text: speeches (a name line, then verse lines) separated by blank lines."""
    rng = random.Random(seed)
    parts: list[str] = []
    size = 0
    act = 0
    while size < chars:
        if rng.random() < 0.01:
            act += 1
            speech = f"ACT {act}. SCENE {rng.randint(1, 7)}."
        else:
            lines = [rng.choice(NAMES) + "."]
            for _ in range(rng.randint(1, 8)):
                lines.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 10))))
            speech = "\n".join(lines)
        parts.append(speech)
        size += len(speech) + 2
    return "\n\n".join(parts) + "\n"


def _squash(text: str) -> str:
    return "".join(text.split())


def test_a_play_is_cut_into_paragraph_documents():
    play = make_play(1_100_000)
    docs = split_text_file(play, "play.txt")
    assert len(docs) > 400  # about 1.1 MB / 2,000 characters
    assert all(len(d) >= TEXT_DOC_CHARS for d in docs)
    assert all(len(d) < 3 * TEXT_DOC_CHARS for d in docs)  # paragraphs, not the whole file
    assert all(not d.startswith("\n") and d.strip() for d in docs)
    assert _squash("".join(docs)) == _squash(play)  # nothing lost or repeated, order kept
    for d in docs[:-1]:  # a document ends where a speech ends
        assert d.split("\n\n")[-1] in play.split("\n\n")


def test_text_without_paragraphs_falls_back_to_equal_blocks():
    rng = random.Random(1)
    lines = [" ".join(rng.choice(WORDS) for _ in range(8)) for _ in range(400)]
    text = "\n".join(lines)  # no blank line: a single paragraph
    docs = split_text_file(text, "lines.txt")
    assert len(docs) == TEXT_MIN_DOCS
    assert "".join(docs) == text
    assert all(d.endswith("\n") for d in docs[:-1])  # cut at line ends
    sizes = [len(d) for d in docs[:-1]]
    assert max(sizes) <= 1.5 * len(text) / TEXT_MIN_DOCS
    assert min(sizes) >= len(text) / TEXT_MIN_DOCS / 2


def test_a_few_long_paragraphs_also_give_blocks():
    paragraphs = [" ".join(["word"] * 400) for _ in range(5)]  # 5 paragraphs of 2,000 chars
    docs = split_text_file("\n\n".join(paragraphs), "few.txt")
    assert len(docs) >= TEXT_MIN_DOCS


def test_a_file_too_small_to_split_says_how_much_text_is_needed():
    with pytest.raises(InputError, match=f"holds 1500 characters.*at least {TEXT_MIN_CHARS}"):
        split_text_file("x" * 1500, "small.txt")


def test_a_folder_keeps_one_document_per_file(tmp_path):
    folder = tmp_path / "plays"
    folder.mkdir()
    for i in range(3):
        (folder / f"p{i}.txt").write_text(make_play(20_000, seed=i))
    docs = local_source(str(folder)).load()
    assert [d.key for d in docs] == ["p0.txt#0", "p1.txt#0", "p2.txt#0"]
    single = local_source(str(folder / "p0.txt")).load()
    assert len(single) >= TEXT_MIN_DOCS
    assert len({d.key for d in single}) == len(single)


def test_a_whole_play_builds_a_corpus_with_both_splits(tmp_path):
    path = tmp_path / "input.txt"
    path.write_text(make_play(1_100_000, seed=3))
    corpus = load_corpus(str(path), seq_len=64, vocab_size=512, cache_dir=tmp_path, progress=False)
    stats = corpus.stats
    assert stats["documents"] > 400
    assert stats["split_rule"] == "hash"
    assert 0.02 < stats["val_documents"] / stats["documents"] < 0.09
    assert len(corpus.train) > 10 * len(corpus.val) > 0


# --- what is not text is refused, a few bad bytes are counted -------------------------------
def _binary_copy(tmp_path):
    import shutil

    path = tmp_path / "x.txt"
    shutil.copyfile("/bin/ls", path)
    return path


def test_an_executable_named_txt_is_refused_naming_the_file(tmp_path):
    from es_llm.data.sources import NotTextError, sniff_local_files

    path = _binary_copy(tmp_path)
    with pytest.raises(NotTextError, match=f"{path} is not text: it holds a NUL"):
        local_source(str(path)).load()
    with pytest.raises(NotTextError, match=str(path)):  # the preflight check, on its head only
        sniff_local_files([("x.txt", path)])


def test_a_nul_byte_in_a_text_file_is_refused(tmp_path):
    from es_llm.data.sources import NotTextError

    path = tmp_path / "nul.txt"
    path.write_bytes(make_play(5_000).encode() + b"\x00" + make_play(5_000, seed=1).encode())
    with pytest.raises(NotTextError, match="nul.txt is not text"):
        local_source(str(path)).load()


def test_a_mostly_latin1_file_is_refused_with_the_count(tmp_path):
    from es_llm.data.sources import NotTextError

    path = tmp_path / "latin.txt"
    para = "L'été à Noël, ça déçoit: où est la forêt? Très gênée, élève bientôt. "
    path.write_bytes(("\n\n".join([para * 4] * 30)).encode("latin-1"))
    with pytest.raises(NotTextError, match=r"latin.txt is not UTF-8 text: \d+ of its \d+"):
        local_source(str(path)).load()


def test_a_bad_file_in_a_folder_is_refused_naming_it(tmp_path):
    from es_llm.data.sources import NotTextError

    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "a.txt").write_text(make_play(3_000))
    _binary_copy(folder)
    with pytest.raises(NotTextError, match="x.txt is not text"):
        local_source(str(folder)).load()


def test_a_nul_inside_a_jsonl_text_field_is_refused(tmp_path):
    import json

    from es_llm.data.sources import NotTextError

    path = tmp_path / "d.jsonl"
    rows = [{"text": make_play(500, seed=i)} for i in range(3)] + [{"text": "a\u0000b"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(NotTextError, match="d.jsonl: the text of record 3 is not text"):
        local_source(str(path)).load()


def test_a_nul_inside_a_parquet_text_column_is_refused(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from es_llm.data.sources import NotTextError

    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": [make_play(500), "ok\u0000"]}), path)
    with pytest.raises(NotTextError, match="d.parquet: the text of record 1"):
        local_source(str(path)).load()


def test_two_bad_bytes_still_train_and_are_counted(tmp_path):
    path = tmp_path / "input.txt"
    text = make_play(60_000, seed=5).encode()
    path.write_bytes(text[:1000] + b"\xff" + text[1000:30000] + b"\xc3(" + text[30000:])
    src = local_source(str(path))
    docs = src.load()
    assert src.read_stats["replaced_characters"] == 2
    assert sum(d.text.count("\ufffd") for d in docs) == 2
    corpus = load_corpus(str(path), seq_len=32, vocab_size=300, cache_dir=tmp_path, progress=False)
    assert corpus.stats["replaced_characters"] == 2

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

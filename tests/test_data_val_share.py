"""--val-share: the share of split groups held out. The default is the original rule, byte for
byte (held-out items, cache keys); other shares are nested, by group, and keyed apart."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

import es_llm.data.recipes as recipes
from es_llm.data import load_corpus
from es_llm.data.cache import cache_digest
from es_llm.data.corpus import FORMAT_VERSION
from es_llm.data.corpus_tokenizer import BPE_CACHE_VERSION, tokenizer_fingerprint
from es_llm.data.documents import Document, check_val_share, is_val_group, stable_hash
from es_llm.data.instruct import IGNORE_INDEX
from es_llm.data.sources import resolve_source, stdlib_files
from es_llm.data.split import (
    SPLIT_RULE,
    held_out,
    min_val_items,
    separate_validation,
    split_documents,
    split_rule,
)
from es_llm.errors import InputError

KEYS = [f"pkg/module_{i}.py" for i in range(20_000)]
SHARES = (0.002, 0.01, 0.03, 0.05, 0.1, 0.15, 0.2, 0.35, 0.5)
WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa"]


def phrase(i: int, n: int) -> str:
    return " ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(n))


# ----------------------------------------------------------------------------- the rule
def test_the_default_share_is_the_original_rule():
    for k in KEYS:
        old = stable_hash(k) % 20 == 0
        assert is_val_group(k) == old and is_val_group(k, 0.05) == old
        assert held_out(Document(k, "t")) == old
        assert held_out(Document("other", "t", group=k), 0.05) == old
    assert SPLIT_RULE == "sha1-mod-20-or-tail"
    assert split_rule() == split_rule(0.05) == SPLIT_RULE
    assert split_rule(0.2) != SPLIT_RULE and split_rule(0.2) != split_rule(0.25)
    for n in range(1, 3000):
        assert min_val_items(n) == math.ceil(n / 20)
    assert [min_val_items(n, 0.15) for n in (1, 20, 21, 100)] == [1, 3, 4, 15]


def test_shares_are_nested_depend_on_the_key_alone_and_hold_out_their_share():
    held = {s: {k for k in KEYS if is_val_group(k, s)} for s in SHARES}
    for small, large in zip(SHARES, SHARES[1:], strict=False):
        assert held[small] < held[large], (small, large)
    for s in SHARES:
        assert len(held[s]) / len(KEYS) == pytest.approx(s, abs=0.01), s
    # the key alone decides: another order, or the key among other keys, changes nothing
    assert {k for k in reversed(KEYS) if is_val_group(k, 0.2)} == held[0.2]
    items = [Document(f"doc#{i}", "t", group=k) for i, k in enumerate(KEYS[:400])]
    train, val, rule = split_documents(items, 0.2)
    assert rule == "hash" and {items[i].group for i in val} == held[0.2] & set(KEYS[:400])


@pytest.mark.parametrize("bad", [0, 0.0, -0.1, 0.51, 1, 1.5, float("nan"), "abc", None, True])
def test_a_share_out_of_range_is_one_line_naming_the_flag(bad, tmp_path):
    with pytest.raises(InputError) as e:
        check_val_share(bad)
    assert "--val-share" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(InputError, match="--val-share"):
        load_corpus("stdlib", seq_len=16, cache_dir=tmp_path, val_share=bad, progress=False)
    assert not any(tmp_path.iterdir())  # refused before anything is read or built


def test_separate_validation_holds_out_by_the_share():
    train = [Document(f"t{i}", f"train {i}") for i in range(300)]
    val = [Document(f"v{i}", f"val {i}") for i in range(300)]
    for share in (0.05, 0.3):
        kept, held = separate_validation(train, val, lambda d: d.text, share)
        assert [d.key for d in kept] == [d.key for d in train if not is_val_group(d.key, share)]
        assert [d.key for d in held] == [d.key for d in val if is_val_group(d.key, share)]


# ----------------------------------------------------------------------------- packed corpus
def _txt_folder(root: Path, n: int = 200) -> Path:
    d = root / "txt"
    d.mkdir()
    for i in range(n):
        (d / f"doc{i:03d}.txt").write_text(f"docmark{i:04d} " + phrase(i, 40) + "\n")
    return d


def test_packed_corpus_at_share_0_2_holds_out_a_fifth_and_is_keyed_apart(tmp_path):
    data, cache = _txt_folder(tmp_path), tmp_path / "cache"
    kw = {"seq_len": 16, "vocab_size": 300, "cache_dir": cache, "progress": False}
    base = load_corpus(str(data), **kw)
    # the default's cache key is the one built before --val-share existed, byte for byte
    old_key = cache_digest(
        {
            "v": FORMAT_VERSION,
            "source": resolve_source(str(data)).fingerprint,
            "tokenizer": tokenizer_fingerprint(None, 300),
            "seq_len": 16,
            "split": "sha1-mod-20-or-tail",
        }
    )[:16]
    assert Path(base.cache_path).name == f"txt-T16-{old_key}"
    assert load_corpus(str(data), val_share=0.05, **kw).cache_path == base.cache_path
    wide = load_corpus(str(data), val_share=0.2, **kw)
    assert wide.cache_path != base.cache_path

    keys = [f"doc{i:03d}.txt#0" for i in range(200)]
    for c, share in ((base, 0.05), (wide, 0.2)):
        expected = [k for k in keys if is_val_group(k, share)]
        assert c.stats["split_rule"] == "hash" and c.stats["val_documents"] == len(expected)
        assert (
            c.stats["val_document_keys_sha1"]
            == hashlib.sha1("\n".join(expected).encode()).hexdigest()
        )
        assert c.composition["val_share"] == share and c.composition["split_rule"] == "hash"
    assert 0.15 <= wide.stats["val_documents"] / 200 <= 0.25
    assert len(wide.val) > 2 * len(base.val)
    # the BPE is trained on the train side: one cached BPE per share, the default's key as before
    bpes = sorted(p.name for p in (cache / "tokenizers").iterdir())
    old_bpe = cache_digest(
        {
            "v": BPE_CACHE_VERSION,
            "source": resolve_source(str(data)).fingerprint,
            "vocab": 300,
            "split": "sha1-mod-20-or-tail",
        }
    )[:16]
    assert len(bpes) == 2 and f"txt-v300-{old_bpe}.json" in bpes


# ----------------------------------------------------------------------------- instruction data
def test_instruction_build_at_share_0_2_holds_out_a_fifth_of_the_groups(tmp_path):
    recs = [
        {
            "prompt": f"Q{i}: {phrase(i, 3)}?",
            "completion": f" {phrase(i + 1, 4)}.",
            "group": f"f{i // 4}",
        }
        for i in range(800)
    ]
    data = tmp_path / "g.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    kw = {"seq_len": 32, "vocab_size": 300, "cache_dir": tmp_path / "cache", "progress": False}
    base = load_corpus(str(data), **kw)
    wide = load_corpus(str(data), val_share=0.2, **kw)
    assert wide.cache_path != base.cache_path
    assert len(list((tmp_path / "cache" / "tokenizers").iterdir())) == 2
    group_of = {r["prompt"]: r["group"] for r in recs}

    def groups(c, split: str) -> set[str]:
        tok = Tokenizer.from_file(c.tokenizer_path)
        out = set()
        for row in getattr(c, split):
            p = int(np.argmax(np.array(row["labels"]) != IGNORE_INDEX))
            out.add(group_of[tok.decode(list(row["input_ids"][:p]))])
        return out

    all_groups = {r["group"] for r in recs}
    for c, share in ((base, 0.05), (wide, 0.2)):
        val, train = groups(c, "val"), groups(c, "train")
        assert val == {g for g in all_groups if is_val_group(g, share)}
        assert not val & train and val | train == all_groups  # a group on one side only
        assert c.stats["instruct"]["val"]["records"] == 4 * len(val)
        assert c.composition["val_share"] == share
    assert 0.15 <= len(groups(wide, "val")) / len(all_groups) <= 0.25
    assert groups(base, "val") < groups(wide, "val")


# ----------------------------------------------------------------------------- recipes
def test_recipe_duplicates_copy_the_train_side_of_the_share(monkeypatch):
    monkeypatch.setattr(recipes, "stdlib_files", lambda: stdlib_files()[40:70])
    data = "recipe:code=1,dup=0.3"
    assert "val_share" not in resolve_source(data).fingerprint
    assert resolve_source(data, val_share=0.05).fingerprint == resolve_source(data).fingerprint
    wide = resolve_source(data, val_share=0.4)
    assert wide.fingerprint["val_share"] == 0.4
    dups = {d.group for d in wide.load() if d.key.startswith("dup/")}
    assert dups and not any(is_val_group(g, 0.4) for g in dups)
    # at the default share some copies come from groups that 0.4 holds out
    default_dups = {d.group for d in resolve_source(data).load() if d.key.startswith("dup/")}
    assert any(is_val_group(g, 0.4) for g in default_dups)

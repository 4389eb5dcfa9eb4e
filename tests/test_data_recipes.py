"""Data recipes: the grammar, the composition of the mixtures, determinism, and --val-data."""

from __future__ import annotations

import hashlib
from collections import Counter

import numpy as np
import pytest

from es_llm.data import load_corpus
from es_llm.data.documents import is_val_group
from es_llm.data.recipes import (
    build_documents,
    chunks,
    code_documents,
    component_of,
    near_copy,
    parse_recipe,
    prose_documents,
)
from es_llm.data.sources import resolve_source, stdlib_files
from es_llm.errors import InputError


@pytest.fixture(scope="module")
def files():
    # a fixed slice of the standard library: fast, and the same on every run
    return stdlib_files()[40:70]


def chars_by_component(docs) -> Counter:
    out: Counter = Counter()
    for d in docs:
        out[component_of(d.key)] += len(d.text)
    return out


# --- grammar ---


def test_parse_normalises_domain_weights_and_reads_noise_and_seed():
    r = parse_recipe("recipe:prose=1, code=3,junk=0.3,seed=7")
    assert r.domains == {"code": 0.75, "prose": 0.25}
    assert (r.junk, r.dup, r.seed) == (0.3, 0.0, 7)
    assert r.canonical() == "recipe:code=0.75,prose=0.25,junk=0.3,seed=7"
    assert parse_recipe(r.canonical()) == r


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("recipe:", "no components"),
        ("recipe:junk=0.3", "no domain"),
        ("recipe:code=1,poetry=1", "unknown component 'poetry'"),
        ("recipe:code=1,code=2", "given twice"),
        ("recipe:code", "not NAME=VALUE"),
        ("recipe:code=0", "must be a finite number > 0"),
        ("recipe:code=1,junk=1", r"junk=1 must be a share in \[0, 1\)"),
        ("recipe:code=1,dup=-0.1", "must be a share"),
        ("recipe:code=x", "is not a number"),
        ("recipe:code=1,seed=1.5", "seed must be an integer"),
    ],
)
def test_bad_recipes_are_input_errors_that_say_what_to_change(text, why):
    with pytest.raises(InputError, match=why) as e:
        parse_recipe(text)
    assert "expected recipe:DOMAIN=WEIGHT" in str(e.value) and "\n" not in str(e.value)


def test_resolve_source_routes_recipes():
    src = resolve_source("recipe:code=1,junk=0.2")
    assert src.name == "recipe-code-1-junk-0.2-seed-0"
    assert src.fingerprint["recipe"] == "recipe:code=1,junk=0.2,seed=0"
    assert src.components == ("code", "prose", "junk", "dup")


# --- composition ---


def test_chunks_cut_at_line_ends_and_lose_nothing():
    text = "".join(f"line {i} " + "x" * (i % 50) + "\n" for i in range(2000))
    parts = chunks(text, size=500)
    assert "".join(parts) == text
    assert all(p.endswith("\n") for p in parts)
    assert all(len(p) >= 500 for p in parts[:-1]) and all(len(p) < 600 for p in parts)


def test_domain_mixture_has_the_given_character_shares(files):
    docs = build_documents(parse_recipe("recipe:code=0.6,prose=0.4"), files, is_val_group)
    ch = chars_by_component(docs)
    share = ch["prose"] / (ch["prose"] + ch["code"])
    # the scarcer domain is used whole, the other is cut to within one chunk of its share
    assert share == pytest.approx(0.4, abs=0.02)
    whole = {
        "code": sum(len(d.text) for d in code_documents(files)),
        "prose": sum(len(d.text) for d in prose_documents(files)),
    }
    scarce = min(whole, key=lambda d: whole[d] / {"code": 0.6, "prose": 0.4}[d])
    assert ch[scarce] == whole[scarce] and ch[scarce] < whole[scarce] + 1


def test_junk_share_of_characters_and_junk_is_random_printable(files):
    docs = build_documents(parse_recipe("recipe:code=1,junk=0.3"), files, is_val_group)
    ch = chars_by_component(docs)
    assert ch["junk"] / (ch["junk"] + ch["code"]) == pytest.approx(0.3, abs=0.005)
    junk = "".join(d.text for d in docs if d.key.startswith("junk/"))
    assert set(junk) <= set(map(chr, range(32, 127))) | {"\n"}
    # near-uniform characters: no character above twice its expected frequency
    counts = Counter(junk)
    assert max(counts.values()) < 2 * len(junk) / 96


def test_duplicates_share_and_kinds(files):
    recipe = parse_recipe("recipe:code=1,dup=0.2")
    docs = build_documents(recipe, files, is_val_group)
    n = Counter(component_of(d.key) for d in docs)
    assert n["dup"] / (n["dup"] + n["code"]) == pytest.approx(0.2, abs=0.01)
    by_key = {d.key: d for d in docs}
    exact = near = 0
    for d in docs:
        if not d.key.startswith("dup/"):
            continue
        _, kind, _, orig_key = d.key.split("/", 3)
        orig = by_key[orig_key]
        assert d.group == orig.group and not is_val_group(d.group)  # train side only
        if kind == "exact":
            exact += 1
            assert d.text == orig.text
        else:
            near += 1
            assert d.text != orig.text or orig.text.count("\n") == 0
            a, b = orig.text.split("\n"), d.text.split("\n")
            assert abs(len(a) - len(b)) <= 0.25 * len(a) + 3
    assert abs(exact - near) <= 1 and exact > 0


def test_near_copy_edits_about_the_given_share_of_lines():
    rng = np.random.default_rng(0)
    text = "\n".join(f"row {i}" for i in range(4000))
    out = near_copy(text, rng).split("\n")
    changed = len(set(text.split("\n")).symmetric_difference(out))
    assert 0.02 * 4000 < changed < 0.08 * 4000


def test_recipes_are_deterministic_in_the_recipe_and_its_seed(files):
    a = build_documents(parse_recipe("recipe:code=1,junk=0.2,dup=0.1"), files, is_val_group)
    b = build_documents(parse_recipe("recipe:code=1,junk=0.2,dup=0.1"), files, is_val_group)
    c = build_documents(parse_recipe("recipe:code=1,junk=0.2,dup=0.1,seed=1"), files, is_val_group)
    assert [(d.key, d.text) for d in a] == [(d.key, d.text) for d in b]
    assert [d.key for d in a] != [d.key for d in c]
    # shuffled: the first tenth already holds every component
    assert {component_of(d.key) for d in a[: len(a) // 10]} == {"code", "junk", "dup"}


def test_every_prefix_holds_the_mixture_to_within_one_document(files):
    docs = build_documents(parse_recipe("recipe:code=1,junk=0.4"), files, is_val_group)
    total = chars_by_component(docs)
    share = total["junk"] / sum(total.values())
    longest = max(len(d.text) for d in docs)
    seen: Counter = Counter()
    for n, d in enumerate(docs, 1):
        seen[component_of(d.key)] += len(d.text)
        # the junk characters so far are their share of all characters so far, +- one document
        assert abs(seen["junk"] - share * sum(seen.values())) <= longest, n


# --- corpus: composition and a separate clean validation source ---


def _sha(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


def test_val_data_is_separate_clean_and_recorded(tmp_path):
    kw = dict(seq_len=32, cache_dir=tmp_path, vocab_size=300, max_documents=400, progress=False)
    c = load_corpus("recipe:code=1,junk=0.3,dup=0.2", val_data="recipe:code=1", **kw)
    comp = c.composition
    assert set(comp["train"]) == {"code", "junk", "dup"} and set(comp["val"]) == {"code"}
    for split, ds in (("train", c.train), ("val", c.val)):
        assert sum(v["tokens"] for v in comp[split].values()) == len(ds) * 32
    assert comp["val_data"] == "recipe-code-1-seed-0" and c.stats["split_rule"].startswith("hash")

    # no validation document is (a copy of) a training document, and none is junk
    src = resolve_source("recipe:code=1,junk=0.3,dup=0.2", 400)
    train_docs = [d for d in src.load() if not is_val_group(d.group or d.key)]
    val_docs = [d for d in resolve_source("recipe:code=1", 400).load() if is_val_group(d.group)]
    train_groups = {d.group for d in train_docs}
    assert val_docs and not train_groups & {d.group for d in val_docs}
    assert not {_sha(d.text) for d in train_docs} & {_sha(d.text) for d in val_docs}

    # a different validation source is a different cache entry; the same one is a hit
    c2 = load_corpus("recipe:code=1,junk=0.3,dup=0.2", **kw)
    assert c2.cache_path != c.cache_path and set(c2.composition["val"]) != {"code"}
    assert (
        load_corpus("recipe:code=1,junk=0.3,dup=0.2", val_data="recipe:code=1", **kw).cache_path
        == c.cache_path
    )


def test_composition_follows_max_train_samples(tmp_path):
    kw = dict(seq_len=32, cache_dir=tmp_path, vocab_size=300, max_documents=300, progress=False)
    full = load_corpus("recipe:code=1,junk=0.3", **kw)
    part = load_corpus("recipe:code=1,junk=0.3", max_train_samples=50, **kw)
    assert part.composition["train_sequences"] == 50
    assert sum(v["tokens"] for v in part.composition["train"].values()) == 50 * 32
    assert sum(v["documents"] for v in part.composition["train"].values()) < sum(
        v["documents"] for v in full.composition["train"].values()
    )
    # junk tokenizes into more tokens per character than code
    jt = full.composition["train"]["junk"]["token_share"]
    assert 0.3 < jt < 0.9


def test_plain_sources_record_a_single_component(tmp_path):
    c = load_corpus(
        "stdlib", seq_len=32, cache_dir=tmp_path, vocab_size=300, max_documents=40, progress=False
    )
    assert set(c.composition["train"]) == {"stdlib"}
    assert c.composition["train"]["stdlib"]["token_share"] == 1.0


def test_too_small_validation_source_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="validation data"):
        load_corpus(
            "recipe:code=1",
            val_data="recipe:prose=1",
            seq_len=4096,
            cache_dir=tmp_path,
            vocab_size=300,
            max_documents=30,
            progress=False,
        )


# --- command line ---


def test_val_data_flag_reaches_train_options_and_compare_children(tmp_path):
    from es_llm.cli import build_parser
    from es_llm.cliargs import options_from_args
    from es_llm.tools.compare.planning import RunSpec
    from es_llm.tools.compare.runner import run_options

    data = ["--data", "recipe:code=1,junk=0.3", "--val-data", "recipe:code=1"]
    args = build_parser().parse_args(["train", *data])
    opts = options_from_args(args)
    assert (opts.data, opts.val_data) == ("recipe:code=1,junk=0.3", "recipe:code=1")
    cargs = build_parser().parse_args(["compare", *data])
    spec = RunSpec("uniform", "uniform", {}, 1, 1)
    child = run_options(options_from_args(cargs), spec, tmp_path)
    assert child.val_data == "recipe:code=1"

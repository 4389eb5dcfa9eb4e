"""Corpus recipes: reproducible data regimes built from text that ships with Python.

``--data "recipe:code=0.7,prose=0.3"`` and friends build a mixture with no download, so the
regimes where selection might help (mixtures, unlearnable junk, duplicates) can be studied
anywhere. Grammar (items separated by commas, each ``NAME=VALUE``, any order)::

    recipe:DOMAIN=WEIGHT[,DOMAIN=WEIGHT...][,junk=SHARE][,dup=SHARE][,seed=N]

- domains (at least one): ``code`` (the standard library's ``.py`` sources) and ``prose``
  (the interpreter's own documentation: the ``pydoc_data`` topic texts and, per module, the
  docstrings of its module, classes and functions). Weights > 0 are character shares of the
  clean text, normalised to sum 1; the mixture is the largest one with those shares (the
  scarcer domain is used whole, the other is subsampled).
- ``junk=SHARE`` in [0, 1): random-character documents (printable ASCII, lengths drawn from
  the clean documents' lengths) make up SHARE of the final text's characters.
- ``dup=SHARE`` in [0, 1): copies of clean training documents make up SHARE of the final
  documents; half are exact copies, half near copies (about 5% of their lines edited:
  deleted, repeated, or one character replaced; at least one).
- ``seed=N`` (default 0): every random choice above is a function of the recipe alone.

Domain texts are cut at line ends into pieces of about CHUNK_CHARS characters (one document
each). Each component's documents are shuffled (seeded) and the components interleaved so
that every prefix holds each component's share of the characters to within about one document:
the first rows of the packed corpus (what ``--max-train-samples`` keeps) are the mixture, not
the luck of a shuffle (one junk document fills about 27 rows of 128 tokens). Each document's
key starts with its component (``code/``, ``prose/``, ``junk/``, ``dup/``); its ``group`` is
the standard-library file it comes from (code, its docstrings, copies of either), so the
corpus splits a file, its docstrings and its copies to the same side: no near-duplicate or
docstring of a validation file is ever trained on.
"""

from __future__ import annotations

import ast
import importlib
import re
import sys
from dataclasses import dataclass

import numpy as np

from es_llm.data.documents import (
    DEFAULT_VAL_SHARE,
    Document,
    Source,
    is_val_group,
    stable_hash,
    stat_entry,
    stdlib_files,
)
from es_llm.data.split import split_key
from es_llm.errors import InputError

PREFIX = "recipe:"
RECIPE_VERSION = 2  # bump when the same recipe would build different documents
DOMAINS = ("code", "prose")
NOISE = ("junk", "dup")
COMPONENTS = (*DOMAINS, *NOISE)
JUNK_ALPHABET = np.frombuffer(
    b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    b"!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~ \n",
    dtype=np.uint8,
)
NEAR_EDIT_RATE = 0.05  # share of a near duplicate's lines that are edited
MIN_PROSE_CHARS = 200  # a module whose docstrings are shorter yields no prose document
CHUNK_CHARS = 4000  # domain documents are cut at line ends into pieces of about this size
GRAMMAR = "recipe:DOMAIN=WEIGHT[,...][,junk=SHARE][,dup=SHARE][,seed=N] with DOMAIN in code, prose"


@dataclass(frozen=True)
class Recipe:
    domains: dict[str, float]  # normalised weights, sum 1, in DOMAINS order
    junk: float = 0.0
    dup: float = 0.0
    seed: int = 0

    def canonical(self) -> str:
        items = [f"{d}={w:g}" for d, w in self.domains.items()]
        items += [f"{n}={v:g}" for n, v in (("junk", self.junk), ("dup", self.dup)) if v]
        return PREFIX + ",".join([*items, f"seed={self.seed}"])


def is_recipe(data: str | None) -> bool:
    return isinstance(data, str) and data.strip().lower().startswith(PREFIX)


def _bad(text: str, why: str) -> InputError:
    return InputError(f"bad data recipe {text!r}: {why}; expected {GRAMMAR}")


def parse_recipe(text: str) -> Recipe:
    """Parse ``recipe:...`` (see the module docstring); InputError names what to change."""
    body = text.strip()[len(PREFIX) :]
    if not body.strip():
        raise _bad(text, "no components")
    values: dict[str, str] = {}
    for item in body.split(","):
        name, eq, raw = item.strip().partition("=")
        name = name.strip().lower()
        if not eq or not name:
            raise _bad(text, f"item {item.strip()!r} is not NAME=VALUE")
        if name not in (*COMPONENTS, "seed"):
            raise _bad(text, f"unknown component {name!r}")
        if name in values:
            raise _bad(text, f"{name!r} given twice")
        values[name] = raw.strip()
    seed = 0
    if "seed" in values:
        try:
            seed = int(values.pop("seed"))
        except ValueError:
            raise _bad(text, "seed must be an integer") from None
        if seed < 0:
            raise _bad(text, "seed must be >= 0")
    nums: dict[str, float] = {}
    for name, raw in values.items():
        try:
            nums[name] = float(raw)
        except ValueError:
            raise _bad(text, f"{name}={raw!r} is not a number") from None
    for d in DOMAINS:
        if d in nums and not 0 < nums[d] < float("inf"):
            raise _bad(text, f"domain weight {d}={nums[d]:g} must be a finite number > 0")
    for n in NOISE:
        if n in nums and not 0 <= nums[n] < 1:
            raise _bad(text, f"{n}={nums[n]:g} must be a share in [0, 1)")
    weights = {d: nums[d] for d in DOMAINS if d in nums}
    if not weights:
        raise _bad(text, "no domain (code or prose) given")
    total = sum(weights.values())
    return Recipe(
        {d: w / total for d, w in weights.items()},
        junk=nums.get("junk", 0.0),
        dup=nums.get("dup", 0.0),
        seed=seed,
    )


# ----------------------------------------------------------------------------- domains
def chunks(text: str, size: int = CHUNK_CHARS) -> list[str]:
    """``text`` cut after the first line end at or beyond every ``size`` characters."""
    out, start = [], 0
    while start < len(text):
        end = text.find("\n", start + size)
        end = len(text) if end < 0 else end + 1
        out.append(text[start:end])
        start = end
    return [c for c in out if c.strip()]


def _chunked(prefix: str, text: str, group: str) -> list[Document]:
    """Pieces of one file's text; all keep the file's group (one side of the split)."""
    return [Document(f"{prefix}#{i}", c, group=group) for i, c in enumerate(chunks(text))]


def code_documents(files: list) -> list[Document]:
    docs: list[Document] = []
    for rel, p in files:
        docs += _chunked(f"code/{rel}", p.read_bytes().decode("utf-8", errors="replace"), rel)
    return docs


def _docstrings(source: bytes) -> str:
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return ""
    parts = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc and doc.strip():
                parts.append(doc.strip())
    return "\n\n".join(parts)


def _topics() -> dict[str, str]:
    """The interpreter's documentation topics (``pydoc_data.topics``); {} if not shipped."""
    try:
        return dict(importlib.import_module("pydoc_data.topics").topics)
    except ImportError:
        return {}


def prose_documents(files: list) -> list[Document]:
    """Documentation topics, then the docstrings of each standard-library module."""
    docs: list[Document] = []
    for name, text in sorted(_topics().items()):
        docs += _chunked(f"prose/topic/{name}", text, f"topic/{name}")
    for rel, p in files:
        text = _docstrings(p.read_bytes())
        if len(text) >= MIN_PROSE_CHARS:
            docs += _chunked(f"prose/doc/{rel}", text, rel)
    return docs


# ----------------------------------------------------------------------------- noise
def _rng(recipe: Recipe, component: str) -> np.random.Generator:
    return np.random.default_rng([recipe.seed, stable_hash(component) & 0xFFFFFFFF])


def _take_share(docs: list[Document], chars: float, rng: np.random.Generator) -> list[Document]:
    """A seeded random subset of ``docs`` whose characters just reach ``chars``."""
    out, acc = [], 0
    for i in rng.permutation(len(docs)):
        if acc >= chars:
            break
        out.append(docs[i])
        acc += len(docs[i].text)
    return out


def junk_documents(clean: list[Document], share: float, rng: np.random.Generator) -> list[Document]:
    """Random printable characters, ``share`` of the final text, lengths like the clean docs."""
    if share <= 0 or not clean:
        return []
    target = share / (1.0 - share) * sum(len(d.text) for d in clean)
    lengths = np.array([len(d.text) for d in clean])
    out, acc, i = [], 0, 0
    while acc < target:
        n = int(min(lengths[rng.integers(len(lengths))], target - acc + 1))
        text = JUNK_ALPHABET[rng.integers(len(JUNK_ALPHABET), size=n)].tobytes().decode("ascii")
        out.append(Document(f"junk/{i}", text, group=f"junk/{i}"))
        acc += n
        i += 1
    return out


def near_copy(text: str, rng: np.random.Generator) -> str:
    """About NEAR_EDIT_RATE of the lines (at least one) deleted, repeated, or with one
    character replaced."""
    lines = text.split("\n")
    edit_line = rng.random(len(lines)) < NEAR_EDIT_RATE
    if not edit_line.any():
        edit_line[rng.integers(len(lines))] = True
    out = []
    for line, edit_it in zip(lines, edit_line, strict=True):
        if not edit_it:
            out.append(line)
            continue
        edit = rng.integers(3)
        if edit == 1:
            out += [line, line]
        elif edit == 2 and line:
            j = int(rng.integers(len(line)))
            c = chr(int(JUNK_ALPHABET[rng.integers(len(JUNK_ALPHABET) - 1)]))
            c = "#" if c == line[j] and c != "#" else ("$" if c == line[j] else c)
            out.append(line[:j] + c + line[j + 1 :])
        # edit 0 (or an empty line to edit): the line is deleted
    return "\n".join(out)


def duplicate_documents(
    clean: list[Document], share: float, rng: np.random.Generator, is_val_group
) -> list[Document]:
    """Copies of clean training-side documents: ``share`` of the final documents, half near."""
    pool = [d for d in clean if not is_val_group(split_key(d))]
    if share <= 0 or not pool:
        return []
    n = round(share / (1.0 - share) * len(clean))
    out = []
    for j in range(n):
        d = pool[int(rng.integers(len(pool)))]
        exact = j < (n + 1) // 2
        kind = "exact" if exact else "near"
        text = d.text if exact else near_copy(d.text, rng)
        out.append(Document(f"dup/{kind}/{j}/{d.key}", text, group=split_key(d)))
    return out


# ----------------------------------------------------------------------------- build
def build_documents(recipe: Recipe, files: list, is_val_group) -> list[Document]:
    """The recipe's documents, interleaved (pure function of the recipe and the files)."""
    pools = {
        "code": code_documents(files) if "code" in recipe.domains else [],
        "prose": prose_documents(files) if "prose" in recipe.domains else [],
    }
    chars = {d: sum(len(x.text) for x in pools[d]) for d in recipe.domains}
    empty = [d for d, c in chars.items() if c == 0]
    if empty:
        raise InputError(
            f"data recipe {recipe.canonical()!r}: this Python ships no {empty[0]} text "
            f"(looked in {files[0][1].parent if files else 'the standard library'}); "
            "drop that domain from the recipe"
        )
    scale = min(chars[d] / w for d, w in recipe.domains.items())
    clean: list[Document] = []
    for d, w in recipe.domains.items():
        docs = pools[d]
        clean += docs if len(recipe.domains) == 1 else _take_share(docs, w * scale, _rng(recipe, d))
    docs = clean + junk_documents(clean, recipe.junk, _rng(recipe, "junk"))
    docs += duplicate_documents(clean, recipe.dup, _rng(recipe, "dup"), is_val_group)
    return interleave(docs, _rng(recipe, "order"))


def interleave(docs: list[Document], rng: np.random.Generator) -> list[Document]:
    """Each component shuffled, then merged so every prefix holds each component's share of
    the characters to within about one document (a plain shuffle of a few large junk documents
    can leave the first rows far from the mixture)."""
    groups: dict[str, list[Document]] = {}
    for d in docs:
        groups.setdefault(component_of(d.key), []).append(d)
    total = sum(len(d.text) for d in docs) or 1
    queues = {}
    for c in sorted(groups):
        g = groups[c]
        queues[c] = [g[i] for i in rng.permutation(len(g))]
    share = {c: sum(len(d.text) for d in g) / total for c, g in queues.items()}
    taken = dict.fromkeys(queues, 0)
    pos = dict.fromkeys(queues, 0)
    out = []
    while len(out) < len(docs):
        live = [c for c in queues if pos[c] < len(queues[c])]
        c = min(live, key=lambda c: (taken[c] / share[c] if share[c] else 0.0, c))
        d = queues[c][pos[c]]
        pos[c] += 1
        taken[c] += len(d.text)
        out.append(d)
    return out


def component_of(key: str) -> str:
    """The recipe component a document key belongs to (``code/x.py`` -> ``code``)."""
    return key.split("/", 1)[0]


def recipe_source(
    data: str, max_documents: int | None = None, *, val_share: float = DEFAULT_VAL_SHARE
) -> Source:
    """A Source for ``recipe:...``; the recipe, Python and stdlib files make the fingerprint.

    Its duplicates copy documents of the training side of the split at ``val_share``
    (--val-share), which is part of the fingerprint when it is not the default."""

    recipe = parse_recipe(data)
    files = stdlib_files()
    if not files:
        raise InputError("data recipe: no .py files found in the standard library")
    fingerprint = {
        "kind": "recipe",
        "recipe": recipe.canonical(),
        "recipe_version": RECIPE_VERSION,
        "python": sys.version,
        "files": [stat_entry(p, rel) for rel, p in files],
        "max_documents": max_documents,
        **({} if val_share == DEFAULT_VAL_SHARE else {"val_share": val_share}),
    }

    def held_out_group(group: str) -> bool:
        return is_val_group(group, val_share)

    def load() -> list[Document]:
        docs = build_documents(recipe, files, held_out_group)
        return docs if max_documents is None else docs[:max_documents]

    name = re.sub(r"[^A-Za-z0-9.]+", "-", recipe.canonical()[len(PREFIX) :]).strip("-")
    return Source(f"recipe-{name}", fingerprint, load, components=COMPONENTS)

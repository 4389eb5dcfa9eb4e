"""Documents and the split rule: the base every data module builds on.

A ``Document`` is one keyed text; a ``Source`` yields them in a fixed order with a fingerprint
for the cache key. The train/validation split hashes each document's group (or key), so it is
the same on every machine with the same data. The standard library's file list lives here too,
since both the plain stdlib source and the data recipes read it.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from es_llm.errors import InputError

VAL_MODULUS = 20  # hold out documents with stable_hash(group or key) % VAL_MODULUS == 0
# Directory names never taken from the standard library: installed packages, the test
# suites (their fixtures include deliberately broken and huge files) and the IDE.
STDLIB_EXCLUDED_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__"}
)


@dataclass(frozen=True)
class Document:
    key: str  # stable identity of the document
    text: str
    group: str = (
        ""  # the train/val split hashes this (or the key when empty): same group, same side
    )


@dataclass
class Source:
    """Documents of one data argument, loaded lazily so a cache hit reads no text."""

    name: str
    fingerprint: dict
    load: Callable[[], list[Document]]
    # component names when documents are keyed "<component>/..." (data recipes); else one
    components: tuple[str, ...] | None = None
    # what `load` observed while reading, e.g. {"replaced_characters": n} (sources.py)
    read_stats: dict = field(default_factory=dict)


def keep_first(src, max_documents: int | None):
    """``src`` (a ``Source`` or an ``InstructSource``: a ``fingerprint`` and a lazy ``load``)
    cut to its first ``max_documents`` items, the cut part of the cache key; None keeps all."""
    if max_documents is not None:
        inner = src.load
        src.fingerprint = {**src.fingerprint, "max_documents": max_documents}
        src.load = lambda: inner()[:max_documents]
    return src


def stable_hash(text: str) -> int:
    """A process-independent 64-bit hash (Python's ``hash`` is salted per process)."""
    return int.from_bytes(hashlib.sha1(text.encode("utf-8")).digest()[:8], "big")


def stat_entry(path: Path, rel: str) -> list:
    st = path.stat()
    return [rel, st.st_size, st.st_mtime_ns]


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(max_documents: int | None = None) -> list[tuple[str, Path]]:
    """(relative posix path, path) of the interpreter's standard-library sources, sorted."""
    root = stdlib_root()
    if not root.is_dir():
        raise InputError(f"standard library directory not found: {root}")
    out: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in STDLIB_EXCLUDED_DIRS)
        for fn in filenames:
            if fn.endswith(".py"):
                p = Path(dirpath) / fn
                out.append((p.relative_to(root).as_posix(), p))
    out.sort(key=lambda t: t[0])
    if max_documents is not None:
        out = out[:max_documents]
    return out


def is_val_group(group: str) -> bool:
    """Whether documents of this split group are held out for validation (the hash rule)."""
    return stable_hash(group) % VAL_MODULUS == 0

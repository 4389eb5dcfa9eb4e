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
# The share of split groups held out (--val-share): 1 / VAL_MODULUS is the rule above, exactly;
# another share refines it nestedly at a resolution of 1 / VAL_SHARE_STEPS (is_val_group).
DEFAULT_VAL_SHARE = 0.05
MAX_VAL_SHARE = 0.5
VAL_SHARE_STEPS = 10_000
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


def check_val_share(share: object) -> float:
    """``share`` as a float when it is a share the split takes, (0, MAX_VAL_SHARE]; else one
    line naming --val-share."""
    ok = isinstance(share, int | float) and not isinstance(share, bool)
    if not ok or not 0.0 < float(share) <= MAX_VAL_SHARE:  # NaN fails the comparison too
        raise InputError(
            f"--val-share must be a number in (0, {MAX_VAL_SHARE:g}], the share of the data "
            f"held out for validation (default {DEFAULT_VAL_SHARE:g}), got {share!r}"
        )
    return float(share)


def is_val_group(group: str, share: float = DEFAULT_VAL_SHARE) -> bool:
    """Whether documents of this split group are held out for validation (the hash rule).

    With h the group's stable hash, the default share holds out ``h % VAL_MODULUS == 0``
    (today's rule, unchanged). Another share also reads ``u = (h // VAL_MODULUS) %
    VAL_SHARE_STEPS``, nearly independent of ``h % VAL_MODULUS``: above the default, a group
    is held out when ``h % VAL_MODULUS == 0`` or ``u`` falls below the steps that make up the
    extra share; below it, when ``h % VAL_MODULUS == 0`` and ``u`` falls below the steps of
    that part. Both thresholds grow with the share, so the rule is nested: a group held out at
    one share is held out at every larger one, and it depends on the group alone.
    """
    h = stable_hash(group)
    base = h % VAL_MODULUS == 0
    if share == DEFAULT_VAL_SHARE:
        return base
    u = (h // VAL_MODULUS) % VAL_SHARE_STEPS
    if share < DEFAULT_VAL_SHARE:
        return base and u < round(share / DEFAULT_VAL_SHARE * VAL_SHARE_STEPS)
    extra = (share - DEFAULT_VAL_SHARE) / (1.0 - DEFAULT_VAL_SHARE)
    return base or u < round(extra * VAL_SHARE_STEPS)

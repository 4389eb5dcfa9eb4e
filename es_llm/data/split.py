"""The train/validation split of documents and instruction records: one rule for both.

An item (a ``Document`` or an instruction ``Record``: anything with ``key`` and ``group``) is
held out when the stable hash of its split key, its group or else its key, falls on the
validation side (``documents.is_val_group``, about 5%, or the ``share`` given: --val-share).
So the split depends on the item alone, never on the rest of the data, and items of one group
land on one side; a larger share holds out a superset. When that leaves one side empty, the
trailing items in order are held out instead (``tail``). With a separate validation source,
the training source's train side is kept and the validation source's held-out side, minus
every item whose text is also trained on.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from fractions import Fraction
from typing import Protocol, TypeVar

from es_llm.data.documents import (
    DEFAULT_VAL_SHARE,
    VAL_MODULUS,
    VAL_SHARE_STEPS,
    check_val_share,
    is_val_group,
)
from es_llm.errors import InputError

__all__ = [
    "SPLIT_RULE",
    "held_out",
    "min_val_items",
    "separate_validation",
    "split_documents",
    "split_key",
    "split_rule",
    "tail_split",
    "text_digest",
]

SPLIT_RULE = f"sha1-mod-{VAL_MODULUS}-or-tail"  # part of every corpus cache key


def split_rule(share: float = DEFAULT_VAL_SHARE) -> str:
    """The split's part of a cache key: ``SPLIT_RULE`` itself at the default share (so every
    key built before --val-share existed stays the same), else with the share."""
    share = check_val_share(share)
    return SPLIT_RULE if share == DEFAULT_VAL_SHARE else f"{SPLIT_RULE}-share-{share!r}"


def min_val_items(n: int, share: float = DEFAULT_VAL_SHARE) -> int:
    """The fewest items the tail fallback holds out of ``n``: ceil(n x share), exactly
    (ceil(n / VAL_MODULUS) at the default share)."""
    exact = Fraction(share).limit_denominator(VAL_MODULUS * VAL_SHARE_STEPS)
    return math.ceil(n * exact)


class Splittable(Protocol):
    key: str
    group: str


T = TypeVar("T", bound=Splittable)


def split_key(item: Splittable) -> str:
    """What the split hashes: the item's group, or its own key when it has none."""
    return item.group or item.key


def held_out(item: Splittable, share: float = DEFAULT_VAL_SHARE) -> bool:
    """Whether the hash rule, at ``share``, puts ``item`` on the validation side."""
    return is_val_group(split_key(item), share)


def tail_split(n: int, min_val: int) -> tuple[list[int], list[int]]:
    """The first ``n - k`` indices to train, the last ``k`` to validate (``1 <= k <= n - 1``)."""
    k = min(max(min_val, 1), n - 1)
    return list(range(n - k)), list(range(n - k, n))


def split_documents(
    items: Sequence[Splittable], share: float = DEFAULT_VAL_SHARE
) -> tuple[list[int], list[int], str]:
    """(train indices, val indices, rule used: "hash" or "tail") of ``items`` at ``share``."""
    n = len(items)
    if n < 2:
        raise InputError(
            f"need at least 2 documents for a train and a validation split, got {n}: give a "
            f"folder of several files (one document per file), a .jsonl/.json/.parquet file "
            f"with several records, or one .txt file (cut into paragraphs)"
        )
    val = [i for i, d in enumerate(items) if held_out(d, share)]
    if 0 < len(val) < n:
        val_set = set(val)
        return [i for i in range(n) if i not in val_set], val, "hash"
    train, val = tail_split(n, min_val_items(n, share))
    return train, val, "tail"


def text_digest(text: str) -> bytes:
    """What "the same text" compares: the sha1 of its UTF-8 bytes."""
    return hashlib.sha1(text.encode("utf-8", "replace")).digest()


def separate_validation(
    train_items: Sequence[T],
    val_items: Sequence[T],
    text: Callable[[T], str],
    share: float = DEFAULT_VAL_SHARE,
) -> tuple[list[T], list[T]]:
    """The train side of ``train_items`` and the held-out side of ``val_items`` (both at
    ``share``) minus every item whose ``text`` is also a training item's; either may come back
    empty (the caller says why, in its own terms)."""
    train = [d for d in train_items if not held_out(d, share)]
    seen = {text_digest(text(d)) for d in train}
    val = [d for d in val_items if held_out(d, share) and text_digest(text(d)) not in seen]
    return train, val

"""A built corpus cache entry, opened: the ``Corpus`` both corpus builders return.

The packed corpus (``corpus.py``) and the instruction corpus (``instruct_build.py``) write the
same layout: ``train/`` and ``val/`` Arrow datasets, ``tokenizer.json`` and ``meta.json``. This
module opens one; each builder adds its own description of the data (``composition``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import datasets

from es_llm.errors import InputError

__all__ = ["Corpus", "open_entry", "truncate"]


@dataclass
class Corpus:
    train: datasets.Dataset  # columns: "id" int64 (global id = row index), "input_ids" int32[T]
    val: datasets.Dataset  # same columns, ids local to the val split
    vocab_size: int  # the tokenizer's actual size (may be below the requested one on tiny data)
    seq_len: int
    tokenizer_path: str | None
    name: str
    eod_id: int = 0
    cache_path: str | None = None
    stats: dict = field(default_factory=dict)
    # documents/tokens per component of the rows in use, per split (see corpus._composition)
    composition: dict = field(default_factory=dict)


def truncate(ds: datasets.Dataset, n: int | None, what: str) -> datasets.Dataset:
    """The first ``n`` rows (all with None): a contiguous range, so ids stay the row index."""
    if n is None:
        return ds
    if n < 1:
        raise InputError(f"{what} must be >= 1 or None, got {n}")
    return ds.select(range(min(n, len(ds))))  # a slice, no indices mapping


def open_entry(
    entry: Path,
    *,
    name: str,
    seq_len: int,
    max_train_samples: int | None,
    max_val_samples: int | None,
    composition: Callable[[dict, int, int], dict],
) -> Corpus:
    """The ``Corpus`` of a complete entry; ``composition(meta, n_train, n_val)`` describes
    the rows kept by ``max_*_samples``."""
    meta = json.loads((entry / "meta.json").read_text())
    train = truncate(
        datasets.load_from_disk(str(entry / "train")), max_train_samples, "max_train_samples"
    )
    val = truncate(datasets.load_from_disk(str(entry / "val")), max_val_samples, "max_val_samples")
    return Corpus(
        train=train,
        val=val,
        vocab_size=int(meta["vocab_size"]),
        seq_len=seq_len,
        tokenizer_path=str(entry / "tokenizer.json"),
        name=name,
        eod_id=int(meta["eod_id"]),
        cache_path=str(entry),
        stats=meta,
        composition=composition(meta, len(train), len(val)),
    )

"""Hugging Face style tokenized datasets (rows of varying length) as fixed-length ES rows.

The ES data path scores and trains whole meta-batches, so its rows have one length.
Fine-tuning sets as Hugging Face users have them hold ``input_ids`` of varying length, with
``labels`` and/or ``attention_mask`` (TRL: ``completion_mask``, ``assistant_masks``) and a
collator that pads per batch. ``fixed_length`` turns such a set into the rows
``es_llm.data.instruct`` builds: ``input_ids`` right-padded with ``pad_id``, ``labels``
(``ignore_index`` on padding and on every token a mask excludes), both ``int32[length]``,
and ``id`` = row index. Positions whose ``attention_mask`` is 0 (padding already there, left
or right) are removed first. Rows longer than ``length`` keep their start; rows are never
dropped (a row left with no label is scored as invalid and adds no loss), and both counts are
returned.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from es_llm.data.instruct import IGNORE_INDEX
from es_llm.data.instruct_build import to_dataset
from es_llm.errors import InputError

logger = logging.getLogger(__name__)

MASK_COLUMNS = ("completion_mask", "assistant_masks")  # 1: a trained token (TRL's columns)
BATCH = 1024


def _lengths(ds: Any, column: str = "input_ids") -> np.ndarray:
    import pyarrow.compute as pc

    col = ds.with_format("arrow")[:][column]
    return np.asarray(pc.list_value_length(col).to_numpy(zero_copy_only=False), dtype=np.int64)


def is_fixed_length(ds: Any) -> bool:
    """Rows that already are ES rows: one length, and no mask or padding to apply."""
    if any(c in ds.column_names for c in ("attention_mask", *MASK_COLUMNS)) or len(ds) == 0:
        return False
    lengths = _lengths(ds)
    if "labels" in ds.column_names and not np.array_equal(_lengths(ds, "labels"), lengths):
        return False  # the row-by-row path names the mismatch
    return bool(lengths.min() == lengths.max())


def _row(example: dict, has_labels: bool, ignore_index: int) -> tuple[np.ndarray, np.ndarray]:
    ids = np.asarray(example["input_ids"], dtype=np.int64)
    labels = np.asarray(example["labels"], dtype=np.int64) if has_labels else ids.copy()
    if labels.shape != ids.shape:
        raise InputError(
            f"a row's labels ({labels.size}) and input_ids ({ids.size}) differ in length"
        )
    for name in MASK_COLUMNS:
        if not has_labels and example.get(name) is not None:
            labels = np.where(np.asarray(example[name], dtype=bool), labels, ignore_index)
    if example.get("attention_mask") is not None:
        keep = np.asarray(example["attention_mask"], dtype=bool)
        ids, labels = ids[keep], labels[keep]
    return ids, labels


def fixed_length(
    ds: Any,
    *,
    length: int | None = None,
    max_length: int | None = None,
    pad_id: int = 0,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[Any, dict]:
    """(dataset of fixed-length ES rows, report). Rows get exactly ``length`` tokens when it
    is given, else the longest row's, capped at ``max_length``. A set that already is
    fixed-length at that length (and has nothing to mask) is returned as it is."""
    if "input_ids" not in ds.column_names:
        raise InputError("the training dataset needs an 'input_ids' column")
    n = len(ds)
    if n == 0:
        raise InputError("the training dataset is empty")
    if is_fixed_length(ds):
        have = int(_lengths(ds)[0])
        if (length is None or have == length) and (max_length is None or have <= max_length):
            return ds, {"rows": n, "padded": False, "length": have}
    has_labels = "labels" in ds.column_names
    columns = [c for c in ("input_ids", "labels", "attention_mask", *MASK_COLUMNS)
               if c in ds.column_names]  # fmt: skip
    rows = []
    plain = ds.with_format(None, columns=columns)
    for start in range(0, n, BATCH):
        batch = plain[start : min(n, start + BATCH)]
        for i in range(len(batch["input_ids"])):
            rows.append(_row({c: batch[c][i] for c in columns}, has_labels, ignore_index))
    if length is None:
        length = max(len(r[0]) for r in rows)
        if max_length is not None:
            length = min(length, max_length)
    if length < 2:
        raise InputError(f"the training rows hold at most {length} token: nothing to predict")
    out, truncated, no_labels = [], 0, 0
    for ids, labels in rows:
        truncated += int(len(ids) > length)
        ids, labels = ids[:length], labels[:length]
        no_labels += int(not (labels[1:] != ignore_index).any())
        inp = np.full(length, pad_id, dtype=np.int32)
        lab = np.full(length, ignore_index, dtype=np.int32)
        inp[: len(ids)], lab[: len(ids)] = ids, labels
        out.append((inp, lab))
    report = {
        "rows": n,
        "padded": True,
        "length": length,
        "truncated_rows": truncated,
        "rows_without_label_tokens": no_labels,
    }
    if truncated or no_labels:
        logger.warning(
            "ES rows of length %d: %d of %d rows truncated, %d without any label token "
            "(scored as invalid, no loss)",
            length,
            truncated,
            n,
            no_labels,
        )
    return to_dataset(out, length), report

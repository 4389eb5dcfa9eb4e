"""Varying-length Hugging Face rows -> fixed-length ES rows (es_llm.data.padded)."""

import datasets
import numpy as np
import pytest

from es_llm.data.padded import fixed_length
from es_llm.errors import InputError


def rows(ds) -> tuple[list, list]:
    d = ds.with_format("numpy")
    return [r.tolist() for r in d["input_ids"]], [r.tolist() for r in d["labels"]]


def test_labels_masks_and_attention_mask():
    ds = datasets.Dataset.from_dict(
        {
            "input_ids": [[9, 1, 2, 3], [9, 9, 4, 5, 6, 7]],
            "attention_mask": [[0, 1, 1, 1], [0, 0, 1, 1, 1, 1]],  # left padding: removed
            "completion_mask": [[0, 0, 1, 1], [0, 0, 0, 1, 1, 1]],
        }
    )
    out, rep = fixed_length(ds, pad_id=0)
    inp, lab = rows(out)
    assert out.column_names == ["id", "input_ids", "labels"]
    assert inp == [[1, 2, 3, 0], [4, 5, 6, 7]]
    assert lab == [[-100, 2, 3, -100], [-100, 5, 6, 7]]
    assert rep == {"rows": 2, "padded": True, "length": 4, "truncated_rows": 0,
                   "rows_without_label_tokens": 0}  # fmt: skip


def test_given_labels_length_and_truncation_counts():
    ds = datasets.Dataset.from_dict(
        {"input_ids": [[1, 2, 3, 4, 5], [6, 7]], "labels": [[-100, -100, -100, 4, 5], [-100, 7]]}
    )
    out, rep = fixed_length(ds, length=3, pad_id=8)
    inp, lab = rows(out)
    assert inp == [[1, 2, 3], [6, 7, 8]] and lab == [[-100] * 3, [-100, 7, -100]]
    assert rep["truncated_rows"] == 1 and rep["rows_without_label_tokens"] == 1
    assert len(out) == 2  # never dropped: a row without labels is scored as invalid
    capped, rep = fixed_length(ds, max_length=4)
    assert rep["length"] == 4 and rows(capped)[1][0] == [-100, -100, -100, 4]


def test_fixed_rows_pass_through_and_bad_input():
    ds = datasets.Dataset.from_dict({"input_ids": np.arange(12).reshape(3, 4).tolist()})
    out, rep = fixed_length(ds)
    assert out is ds and rep == {"rows": 3, "padded": False, "length": 4}
    out, rep = fixed_length(ds, length=6)
    assert rep["padded"] and rows(out)[1][0] == [0, 1, 2, 3, -100, -100]
    with pytest.raises(InputError, match="differ in length"):
        fixed_length(datasets.Dataset.from_dict({"input_ids": [[1, 2]], "labels": [[1]]}))
    with pytest.raises(InputError, match="'input_ids' column"):
        fixed_length(datasets.Dataset.from_dict({"text": ["a"]}))

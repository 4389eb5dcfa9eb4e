"""Instruction records -> the cached train/val datasets of fixed-length samples with labels.

The records, their forms and their rendering are `es_llm.data.instruct`'s; this module
tokenizes each record into one sample (truncated or right-padded to ``seq_len``; ``labels``
``IGNORE_INDEX`` on prompt and padding), counts what was cut or left out, splits by record
with the project's hash rule (at the run's --val-share), and caches the result like the packed corpus (``load_corpus``
calls ``load_instruct_corpus`` for instruction data).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from es_llm.data.cache import build_once, cache_digest, datasets_progress, lock_path
from es_llm.data.corpus_tokenizer import corpus_tokenizer, tokenizer_fingerprint
from es_llm.data.documents import DEFAULT_VAL_SHARE
from es_llm.data.entry import Corpus, open_entry
from es_llm.data.instruct import (
    IGNORE_INDEX,
    ChatTemplate,
    InstructDataError,
    InstructSource,
    Record,
    has_completion,
    is_instruct_data,
    record_text,
    segments,
)
from es_llm.data.instruct_sets import resolve_instruct_source
from es_llm.data.split import separate_validation, split_documents, split_rule

# bump when the build changes what lands on disk (2: records with an empty completion are left
# out and counted; version 1 trained them on the end-of-document token alone)
FORMAT_VERSION = 2


# ----------------------------------------------------------------------------- tokens
@dataclass
class SplitReport:
    records: int = 0  # records of this split (before any is dropped)
    samples: int = 0  # kept: one sample each
    truncated_completions: int = 0  # kept, completion cut at seq_len
    dropped_no_completion_tokens: int = 0  # left out: no completion token to predict
    dropped_empty_completion: int = 0  # of those, the ones whose completion is empty
    prompt_tokens: int = 0  # of the kept samples, after truncation
    completion_tokens: int = 0  # of the kept samples, after truncation (loss tokens)
    dropped_keys: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "dropped_keys"}
        d["dropped_examples"] = self.dropped_keys[:5]
        return d


def drop_empty(report: SplitReport, key: str) -> None:
    """Count a record whose completion is empty (instruct.has_completion) as left out: the
    end-of-document token alone is no completion to learn."""
    report.records += 1
    report.dropped_no_completion_tokens += 1
    report.dropped_empty_completion += 1
    report.dropped_keys.append(key)


def _nothing_kept(rep: SplitReport, split: str, seq_len: int, data_label: str) -> str:
    """Why no record of a split is left (every one dropped), and what to change."""
    empty, short = rep.dropped_empty_completion, rep.dropped_no_completion_tokens
    short -= empty
    if not short:
        return (
            f"data {data_label}: every one of the {rep.records} {split} records has an empty "
            "completion (no text but white space, or no assistant turn with text), so nothing "
            "can train; give records with completions"
        )
    return (
        f"data {data_label}: none of the {rep.records} {split} records keeps a completion "
        f"token: {short} have none within seq_len={seq_len}"
        + (f" and {empty} have an empty completion" if empty else "")
        + "; use a larger --seq-len"
    )


def encode_record(
    pieces: list[tuple[str, bool]], encode: Callable[[str], list[int]], eod: int, *, add_eod: bool
) -> tuple[np.ndarray, np.ndarray]:
    """(token ids, completion mask) of one record, before truncation."""
    ids: list[int] = []
    mask: list[bool] = []
    for text, is_completion in pieces:
        if text:
            t = encode(text)
            ids.extend(t)
            mask.extend([is_completion] * len(t))
    if add_eod:
        ids.append(eod)
        mask.append(True)
    return np.asarray(ids, dtype=np.int32), np.asarray(mask, dtype=bool)


def fit_sample(
    ids: np.ndarray, mask: np.ndarray, seq_len: int, pad_id: int, report: SplitReport, key: str
) -> tuple[np.ndarray, np.ndarray] | None:
    """Truncate or right-pad one record to ``seq_len``: (input_ids, labels), or None (dropped).

    Labels are ``IGNORE_INDEX`` on prompt and padding tokens. A completion token at position 0
    has nothing before it to predict it from, so it does not count as trainable.
    """
    report.records += 1
    cut = len(ids) > seq_len and bool(mask[seq_len:].any())
    ids, mask = ids[:seq_len], mask[:seq_len]
    trainable = int(mask[1:].sum())
    if trainable == 0:
        report.dropped_no_completion_tokens += 1
        report.dropped_keys.append(key)
        return None
    report.samples += 1
    report.truncated_completions += int(cut)
    report.completion_tokens += int(mask.sum())
    report.prompt_tokens += int((~mask).sum())
    input_ids = np.full(seq_len, pad_id, dtype=np.int32)
    labels = np.full(seq_len, IGNORE_INDEX, dtype=np.int32)
    input_ids[: len(ids)] = ids
    labels[: len(ids)] = np.where(mask, ids, IGNORE_INDEX)
    return input_ids, labels


def to_dataset(rows: list[tuple[np.ndarray, np.ndarray]], seq_len: int):
    """Arrow dataset: ``id`` int64 (row index), ``input_ids`` and ``labels`` int32[seq_len]."""
    import datasets
    import pyarrow as pa

    n = len(rows)
    inp = np.stack([r[0] for r in rows]) if rows else np.zeros((0, seq_len), np.int32)
    lab = np.stack([r[1] for r in rows]) if rows else np.zeros((0, seq_len), np.int32)

    def col(x: np.ndarray) -> pa.Array:
        flat = pa.array(np.ascontiguousarray(x, dtype=np.int32).reshape(-1), type=pa.int32())
        return pa.FixedSizeListArray.from_arrays(flat, seq_len)

    ids = pa.array(np.arange(n, dtype=np.int64), type=pa.int64())
    return datasets.Dataset(pa.table({"id": ids, "input_ids": col(inp), "labels": col(lab)}))


# ----------------------------------------------------------------------------- split
def split_records(
    records: list[Record],
    val_records: list[Record] | None,
    chat: ChatTemplate,
    label: str,
    share: float = DEFAULT_VAL_SHARE,
) -> tuple[list[Record], list[Record], str]:
    """(train, val, rule): by the hash rule of each record's group (or key) at ``share``, as
    documents are; with a separate validation source, its held-out records minus texts
    trained on."""
    if val_records is None:
        train_idx, val_idx, rule = split_documents(records, share)
        return [records[i] for i in train_idx], [records[i] for i in val_idx], rule
    train, val = separate_validation(records, val_records, lambda r: record_text(r, chat), share)
    if not train:
        raise InstructDataError(f"data {label}: every record falls on the validation side")
    if not val:
        raise InstructDataError(
            f"validation data of {label}: no held-out record that is not also a training "
            "record; use a larger or different validation source"
        )
    return train, val, "hash-separate-val-data"


# ----------------------------------------------------------------------------- build
def build(
    src: InstructSource,
    out_dir: Path,
    *,
    seq_len: int,
    vocab_size: int,
    tokenizer: str | None,
    cache_dir: Path,
    progress: bool,
    data_label: str,
    val_src: InstructSource | None = None,
    val_share: float = DEFAULT_VAL_SHARE,
) -> None:
    t0 = time.perf_counter()
    records = src.load()
    if not records:
        raise InstructDataError(f"data {data_label}: no instruction records")
    chat = ChatTemplate(tokenizer)
    val_records = None if val_src is None else val_src.load()
    train, val, rule = split_records(records, val_records, chat, data_label, val_share)
    # a trained BPE learns the train records' text, keyed as the packed corpus's would be
    tok, eod, tok_path = corpus_tokenizer(
        f"{src.name}-instruct",
        {"instruct": src.fingerprint},
        [record_text(r, chat) for r in train],
        tokenizer=tokenizer,
        vocab_size=vocab_size,
        cache_dir=cache_dir,
        progress=progress,
        val_share=val_share,
    )

    def encode(text: str) -> list[int]:
        return tok.encode(text, add_special_tokens=False).ids

    reports = {"train": SplitReport(), "val": SplitReport()}
    forms = sorted({r.form for r in train + val})
    for split, recs in (("train", train), ("val", val)):
        rows = []
        for r in recs:
            if not has_completion(r):
                drop_empty(reports[split], r.key)
                continue
            ids, mask = encode_record(
                segments(r, chat), encode, eod, add_eod=r.form == "prompt-completion"
            )
            row = fit_sample(ids, mask, seq_len, eod, reports[split], r.key)
            if row is not None:
                rows.append(row)
        if not rows:
            raise InstructDataError(_nothing_kept(reports[split], split, seq_len, data_label))
        to_dataset(rows, seq_len).save_to_disk(str(out_dir / split))
    shutil.copyfile(tok_path, out_dir / "tokenizer.json")
    tr, va = reports["train"], reports["val"]
    meta = {
        "format_version": FORMAT_VERSION,
        "kind": "instruct",
        "name": src.name,
        "data": data_label,
        "val_data": None if val_src is None else val_src.name,
        "forms": forms,
        "seq_len": seq_len,
        "vocab_size": tok.get_vocab_size(with_added_tokens=True),
        "requested_vocab_size": None if tokenizer else vocab_size,
        "eod_id": eod,
        "pad_id": eod,
        "split_rule": rule,
        "val_share": val_share,
        "instruct": {
            "records": tr.records + va.records,
            "truncated_completions": tr.truncated_completions + va.truncated_completions,
            "dropped_no_completion_tokens": (
                tr.dropped_no_completion_tokens + va.dropped_no_completion_tokens
            ),
            "dropped_empty_completion": tr.dropped_empty_completion + va.dropped_empty_completion,
            "train": tr.as_dict(),
            "val": va.as_dict(),
        },
        "train_sequences": tr.samples,
        "val_sequences": va.samples,
        "build_seconds": round(time.perf_counter() - t0, 3),
    }
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=2))


def _warn(meta: dict) -> None:
    """One line on stderr (rank 0) when records were dropped or cut, every time it is loaded."""
    rep = meta["instruct"]
    if os.environ.get("RANK", "0") != "0":
        return
    if rep["dropped_no_completion_tokens"] or rep["truncated_completions"]:
        empty = rep["dropped_empty_completion"]
        short = rep["dropped_no_completion_tokens"] - empty
        print(
            f"es-llm: instruction data {meta['data']}: {rep['records']} records, "
            f"{rep['dropped_no_completion_tokens']} left out ({empty} with an empty "
            f"completion, {short} with no completion token within seq_len={meta['seq_len']}), "
            f"{rep['truncated_completions']} with the completion cut; counts in summary.json "
            "(data_composition.instruct)",
            file=sys.stderr,
            flush=True,
        )


def composition(meta: dict, n_train: int, n_val: int) -> dict:
    return {
        "data": meta["data"],
        "val_data": meta["val_data"],
        "kind": "instruct",
        "forms": meta["forms"],
        "split_rule": meta["split_rule"],
        # entries built before --val-share existed hold no share: they were built at the default
        "val_share": meta.get("val_share", DEFAULT_VAL_SHARE),
        "instruct": meta["instruct"],
        "train_sequences": n_train,
        "val_sequences": n_val,
    }


def load_instruct_corpus(
    data: str,
    *,
    seq_len: int,
    cache_dir: Path,
    vocab_size: int,
    max_train_samples: int | None,
    max_val_samples: int | None,
    tokenizer: str | None,
    max_documents: int | None,
    progress: bool,
    val_data: str | None,
    val_share: float = DEFAULT_VAL_SHARE,
) -> Corpus:
    """The instruction-data counterpart of ``load_corpus`` (which calls it): a ``Corpus``
    whose train/val datasets carry a ``labels`` column next to ``input_ids``."""
    src = resolve_instruct_source(data, max_documents)
    val_src = None
    if val_data is not None:
        if not is_instruct_data(val_data):
            raise InstructDataError(
                f"--val-data {val_data!r} is not instruction data, but --data {data!r} is: "
                "validate instruction training on instruction records"
            )
        val_src = resolve_instruct_source(val_data, max_documents)
    key = cache_digest(
        {
            "v": FORMAT_VERSION,
            "kind": "instruct",
            "source": src.fingerprint,
            "tokenizer": tokenizer_fingerprint(tokenizer, vocab_size),
            "seq_len": seq_len,
            "split": split_rule(val_share),
            **({} if val_src is None else {"val_source": val_src.fingerprint}),
        }
    )[:16]
    final = cache_dir / f"{src.name}-instruct-T{seq_len}-{key}"

    def announce() -> None:
        if progress:
            print(
                f"es-llm: building the instruction data cache for {src.name} once -> {final}",
                file=sys.stderr,
                flush=True,
            )

    def make(tmp: Path) -> Path:
        with datasets_progress(progress):
            build(
                src,
                tmp,
                seq_len=seq_len,
                vocab_size=vocab_size,
                tokenizer=tokenizer,
                cache_dir=cache_dir,
                progress=progress,
                data_label=repr(data),
                val_src=val_src,
                val_share=val_share,
            )
        return tmp

    lock = lock_path(cache_dir, f"{src.name}-instruct-{key}")
    build_once(final, marker="meta.json", lock=lock, build=make, announce=announce)
    corpus = open_entry(
        final,
        name=src.name,
        seq_len=seq_len,
        max_train_samples=max_train_samples,
        max_val_samples=max_val_samples,
        composition=composition,
    )
    _warn(corpus.stats)
    return corpus

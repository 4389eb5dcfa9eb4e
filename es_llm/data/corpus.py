"""The packed, tokenized corpus: train/val Arrow datasets with stable global ids, cached on disk.

Pipeline (done once per cache key, then a cache hit is a memory-mapped ``load_from_disk``):
documents -> split by document (no leakage) -> BPE tokenizer trained on the train documents
-> tokenize, append one end-of-document token per document, concatenate -> cut into rows of
``seq_len`` tokens (the remainder of each split is dropped) -> ``save_to_disk``.

Validation split *(our choice)*: a document is held out when ``sha1(group) mod 20 == 0``
(about 5%; the group is the document's key unless a source groups documents, e.g. a recipe's
copies of a file), so the split depends only on the document itself, never on the rest of the
corpus. ``val_share`` (--val-share) holds out another share by a nested refinement of that
rule (``documents.is_val_group``). When that leaves no validation document, no train document,
or too few validation tokens for one row, the split falls back to holding out the trailing
documents in corpus order: the fewest, at least ceil(n x share) of them, whose tokens fill one
row. In that fallback the
trained tokenizer may have seen the text of the moved documents (BPE merges only; no
validation row is ever a train row).

With a separate validation source (``val_data``, e.g. a clean source while the training data
has junk), the train documents are the training source's train side of that rule and the
validation documents are the validation source's held-out side, minus any document whose
exact text is among the train documents; the tokenizer is trained on the train documents.

Each entry also records its composition: the tokens of every component (``code``, ``junk``,
... for recipes, else the source's name) in each packed row and where each document starts,
so ``Corpus.composition`` describes exactly the rows kept by ``max_*_samples``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
from tokenizers import Tokenizer
from tqdm.auto import tqdm

from es_llm.data.cache import build_once, cache_digest, datasets_progress, lock_path
from es_llm.data.corpus_tokenizer import corpus_tokenizer, tokenizer_fingerprint
from es_llm.data.documents import DEFAULT_VAL_SHARE, Document, Source, check_val_share
from es_llm.data.entry import Corpus, open_entry
from es_llm.data.instruct import is_instruct_data
from es_llm.data.instruct_build import load_instruct_corpus
from es_llm.data.sources import default_cache_dir, resolve_source
from es_llm.data.split import (
    min_val_items,
    separate_validation,
    split_documents,
    split_rule,
    tail_split,
)
from es_llm.errors import InputError

__all__ = ["Corpus", "default_cache_dir", "load_corpus", "pack", "split_info"]

FORMAT_VERSION = 2  # bump when the build changes what lands on disk
ENCODE_CHUNK = 64  # documents per encode_batch call (bounds memory, drives the progress bar)


def _announce_build(name: str, final: Path, progress: bool) -> None:
    """One line before the build, so a first run does not sit silent."""
    if progress:
        print(
            f"es-llm: building the corpus cache for {name} once (read, train the tokenizer, "
            f"tokenize, pack; seconds per 10 MB of text) -> {final}",
            file=sys.stderr,
            flush=True,
        )


# ----------------------------------------------------------------------------- packing
def _encode(tok: Tokenizer, texts: list[str], eod: int, desc: str, progress: bool) -> list:
    """Token ids per document (int32), each followed by the end-of-document id."""
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)
    out = []
    with tqdm(total=len(texts), desc=desc, unit="doc", disable=not progress) as bar:
        for start in range(0, len(texts), ENCODE_CHUNK):
            chunk = texts[start : start + ENCODE_CHUNK]
            for enc in encode(chunk, add_special_tokens=False):
                ids = np.empty(len(enc.ids) + 1, dtype=np.int32)
                ids[:-1] = enc.ids
                ids[-1] = eod
                out.append(ids)
            bar.update(len(chunk))
    return out


def pack(token_lists: list[np.ndarray], seq_len: int) -> np.ndarray:
    """Concatenate and cut into [rows, seq_len]; the trailing partial row is dropped."""
    flat = np.concatenate(token_lists) if token_lists else np.zeros(0, np.int32)
    rows = len(flat) // seq_len
    return flat[: rows * seq_len].reshape(rows, seq_len)


def _to_dataset(rows: np.ndarray) -> datasets.Dataset:
    n, t = rows.shape
    ids = pa.array(np.arange(n, dtype=np.int64), type=pa.int64())
    flat = pa.array(np.ascontiguousarray(rows, dtype=np.int32).reshape(-1), type=pa.int32())
    input_ids = pa.FixedSizeListArray.from_arrays(flat, t)
    return datasets.Dataset(pa.table({"id": ids, "input_ids": input_ids}))


def _num_tokens(token_lists: list[np.ndarray], idx: list[int]) -> int:
    return int(sum(len(token_lists[i]) for i in idx))


# ----------------------------------------------------------------------------- composition
def _component(src: Source, doc: Document) -> str:
    return doc.key.split("/", 1)[0] if src.components else src.name


def _save_composition(
    out_dir: Path, split: str, token_lists: list, comp: np.ndarray, n_comp: int, seq_len: int
) -> None:
    """Per packed row the tokens of each component, and each document's start and component."""
    lengths = np.array([len(t) for t in token_lists], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]) if len(lengths) else lengths
    flat = np.repeat(comp.astype(np.int16), lengths)
    rows = len(flat) // seq_len
    per_row = flat[: rows * seq_len].reshape(rows, seq_len)
    counts = np.stack([(per_row == c).sum(axis=1) for c in range(n_comp)], axis=1)
    np.save(out_dir / f"{split}_row_tokens.npy", counts.astype(np.int32))
    np.save(out_dir / f"{split}_doc_starts.npy", starts)
    np.save(out_dir / f"{split}_doc_component.npy", comp.astype(np.int16))


def split_info(meta: dict) -> dict:
    """How an entry was split, for ``composition`` (so summary.json and compare.json say it):
    the rule used ("hash", "tail", "hash-separate-val-data") and the held-out share. Entries
    built before --val-share existed hold no share: they were built at the default."""
    return {"split_rule": meta["split_rule"], "val_share": meta.get("val_share", DEFAULT_VAL_SHARE)}


def _composition(entry: Path, meta: dict, n_train: int, n_val: int) -> dict:
    """Documents (those starting inside the kept rows) and tokens per component and split."""
    names = meta["components"]
    out: dict = {"data": meta["data"], "val_data": meta["val_data"], **split_info(meta)}
    for split, n in (("train", n_train), ("val", n_val)):
        tokens = np.load(entry / f"{split}_row_tokens.npy", mmap_mode="r")[:n].sum(axis=0)
        starts = np.load(entry / f"{split}_doc_starts.npy")
        comp = np.load(entry / f"{split}_doc_component.npy")
        docs = np.bincount(comp[starts < n * meta["seq_len"]], minlength=len(names))
        total = max(int(tokens.sum()), 1)
        out[split] = {
            name: {
                "documents": int(docs[i]),
                "tokens": int(tokens[i]),
                "token_share": round(int(tokens[i]) / total, 4),
            }
            for i, name in enumerate(names)
            if docs[i] or tokens[i]
        }
        out[split + "_sequences"] = n
    return out


# ----------------------------------------------------------------------------- build
def _build(
    src: Source,
    out_dir: Path,
    *,
    seq_len: int,
    vocab_size: int,
    tokenizer: str | None,
    cache_dir: Path,
    progress: bool,
    data_label: str,
    val_src: Source | None = None,
    val_share: float = DEFAULT_VAL_SHARE,
) -> None:
    t0 = time.perf_counter()
    docs = src.load()
    if not docs:
        raise InputError(f"data {data_label}: no documents with text (empty dataset)")
    if val_src is None:
        train_idx, val_idx, rule = split_documents(docs, val_share)
        doc_src = [src] * len(docs)
        tok_src = src
    else:
        docs, train_idx, val_idx = _split_with_val_source(docs, val_src, data_label, val_share)
        rule = "hash-separate-val-data"
        doc_src = [src] * len(train_idx) + [val_src] * len(val_idx)
        tok_src = Source(src.name, {"train": src.fingerprint, "val": val_src.fingerprint}, src.load)
    tok, eod, tok_path = corpus_tokenizer(
        tok_src.name,
        tok_src.fingerprint,
        [docs[i].text for i in train_idx],
        tokenizer=tokenizer,
        vocab_size=vocab_size,
        cache_dir=cache_dir,
        progress=progress,
        val_share=val_share,
    )
    token_lists = _encode(tok, [d.text for d in docs], eod, f"tokenizing {src.name}", progress)
    total = _num_tokens(token_lists, list(range(len(docs))))
    if total < 2 * seq_len:
        raise InputError(
            f"data {data_label}: {len(docs)} documents hold only {total} tokens "
            f"(end-of-document tokens included); seq_len={seq_len} needs at least "
            f"{2 * seq_len} tokens: {seq_len} for one train and {seq_len} for one validation "
            f"sequence. Use more data or a smaller seq_len."
        )
    if val_src is not None and _num_tokens(token_lists, val_idx) < seq_len:
        raise InputError(
            f"validation data {val_src.name!r}: its {len(val_idx)} held-out documents hold "
            f"{_num_tokens(token_lists, val_idx)} tokens, fewer than seq_len={seq_len}; "
            "use a larger validation source or a smaller seq_len"
        )
    if _num_tokens(token_lists, val_idx) < seq_len:
        # Too little held-out text for one row: hold out the fewest trailing documents that fill one.
        n, k, acc = len(docs), 0, 0
        while k < n - 1 and (acc < seq_len or k < min_val_items(n, val_share)):
            k += 1
            acc += len(token_lists[n - k])
        train_idx, val_idx = tail_split(n, k)
        rule = "tail"
    train_tokens = _num_tokens(token_lists, train_idx)
    val_tokens = _num_tokens(token_lists, val_idx)
    if train_tokens < seq_len or val_tokens < seq_len:
        raise InputError(
            f"data {data_label}: split into {len(train_idx)} train documents ({train_tokens} "
            f"tokens) and {len(val_idx)} validation documents ({val_tokens} tokens); "
            f"seq_len={seq_len} needs at least {seq_len} tokens on each side. "
            f"Use more data or a smaller seq_len."
        )
    train_rows = pack([token_lists[i] for i in train_idx], seq_len)
    val_rows = pack([token_lists[i] for i in val_idx], seq_len)
    comp_of = [_component(doc_src[i], d) for i, d in enumerate(docs)]
    components = sorted(set(comp_of))
    comp_id = np.array([components.index(c) for c in comp_of], dtype=np.int16)
    for split, idx in (("train", train_idx), ("val", val_idx)):
        lists = [token_lists[i] for i in idx]
        _save_composition(out_dir, split, lists, comp_id[idx], len(components), seq_len)
    with datasets_progress(progress):
        _to_dataset(train_rows).save_to_disk(str(out_dir / "train"))
        _to_dataset(val_rows).save_to_disk(str(out_dir / "val"))
    shutil.copyfile(tok_path, out_dir / "tokenizer.json")
    meta = {
        "format_version": FORMAT_VERSION,
        "name": src.name,
        "data": data_label,
        "val_data": None if val_src is None else val_src.name,
        "components": components,
        "seq_len": seq_len,
        "vocab_size": tok.get_vocab_size(with_added_tokens=True),
        "requested_vocab_size": None if tokenizer else vocab_size,
        "eod_id": eod,
        "split_rule": rule,
        "val_share": val_share,
        "documents": len(docs),
        "train_documents": len(train_idx),
        "val_documents": len(val_idx),
        "tokens": total,
        "train_tokens": train_tokens,
        "val_tokens": val_tokens,
        "train_sequences": int(train_rows.shape[0]),
        "val_sequences": int(val_rows.shape[0]),
        "val_document_keys_sha1": hashlib.sha1(
            "\n".join(docs[i].key for i in val_idx).encode()
        ).hexdigest(),
        # undecodable bytes read as U+FFFD (sources.py), over the data and the validation data
        "replaced_characters": sum(
            part.read_stats.get("replaced_characters", 0)
            for part in (src, val_src)
            if part is not None
        ),
        "build_seconds": round(time.perf_counter() - t0, 3),
    }
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=2))


def _split_with_val_source(
    docs: list[Document], val_src: Source, data_label: str, val_share: float
) -> tuple[list[Document], list[int], list[int]]:
    """Train side of ``docs`` + held-out side of ``val_src`` (minus texts trained on)."""
    train, val = separate_validation(docs, val_src.load(), lambda d: d.text, val_share)
    if not train:
        raise InputError(f"data {data_label}: every document falls on the validation side")
    if not val:
        raise InputError(
            f"validation data {val_src.name!r}: no held-out document that is not also a "
            "training document; use a larger or different validation source"
        )
    return train + val, list(range(len(train))), list(range(len(train), len(train) + len(val)))


def load_corpus(
    data: str | None = None,
    *,
    seq_len: int,
    cache_dir: str | os.PathLike | None = None,
    vocab_size: int = 4096,
    max_train_samples: int | None = None,
    max_val_samples: int | None = None,
    tokenizer: str | None = None,
    max_documents: int | None = None,
    progress: bool = True,
    val_data: str | None = None,
    val_share: float = DEFAULT_VAL_SHARE,
) -> Corpus:
    """Build (once) or load the packed corpus for ``data``; safe to call from many ranks at once.

    ``data``: None or "stdlib" (the interpreter's standard-library sources), a local
    .txt/.jsonl/.json/.parquet file or a directory of them, else a Hugging Face hub dataset
    "name" or "name:config". ``tokenizer``: a tokenizer.json or a local HF tokenizer
    directory; None trains a byte-level BPE of ``vocab_size`` on the train documents.
    ``max_documents`` keeps the first documents only (a knob for tests; part of the cache key).
    ``max_*_samples`` keep the first rows, so ids stay the row index.
    ``val_data``: validate on this separate source's held-out documents instead (any form
    ``data`` takes; see the module docstring); None splits ``data`` itself.
    ``val_share``: the share of split groups held out, in (0, 0.5] (--val-share); the default
    0.05 is the project's original rule, and a larger share holds out a superset (see
    ``documents.is_val_group``); any other share is part of the cache keys.
    Instruction data (``instruct:...``, or files of prompt/completion or messages records)
    is not packed: see ``es_llm.data.instruct``.
    """
    if not isinstance(seq_len, int) or seq_len < 2:
        raise InputError(f"seq_len must be an integer >= 2, got {seq_len!r}")
    if max_documents is not None and max_documents < 1:
        raise InputError(f"max_documents must be >= 1 or None, got {max_documents}")
    val_share = check_val_share(val_share)
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    label = repr(data) if data is not None else "'stdlib'"
    if is_instruct_data(data):  # one padded sample per record, with labels (data/instruct.py)
        return load_instruct_corpus(
            data,
            seq_len=seq_len,
            cache_dir=cache,
            vocab_size=vocab_size,
            max_train_samples=max_train_samples,
            max_val_samples=max_val_samples,
            tokenizer=tokenizer,
            max_documents=max_documents,
            progress=progress,
            val_data=val_data,
            val_share=val_share,
        )

    src = resolve_source(data, max_documents, val_share=val_share)
    val_src = (
        None if val_data is None else resolve_source(val_data, max_documents, val_share=val_share)
    )
    tok_fp = tokenizer_fingerprint(tokenizer, vocab_size)
    key = cache_digest(
        {
            "v": FORMAT_VERSION,
            "source": src.fingerprint,
            "tokenizer": tok_fp,
            "seq_len": seq_len,
            "split": split_rule(val_share),
            **({} if val_src is None else {"val_source": val_src.fingerprint}),
        }
    )[:16]
    final = cache / f"{src.name}-T{seq_len}-{key}"

    def build(tmp: Path) -> Path:
        _build(
            src,
            tmp,
            seq_len=seq_len,
            vocab_size=vocab_size,
            tokenizer=tokenizer,
            cache_dir=cache,
            progress=progress,
            data_label=label,
            val_src=val_src,
            val_share=val_share,
        )
        return tmp

    build_once(
        final,
        marker="meta.json",
        lock=lock_path(cache, f"{src.name}-{key}"),
        build=build,
        announce=lambda: _announce_build(src.name, final, progress),
    )
    return open_entry(
        final,
        name=src.name,
        seq_len=seq_len,
        max_train_samples=max_train_samples,
        max_val_samples=max_val_samples,
        composition=lambda meta, n_train, n_val: _composition(final, meta, n_train, n_val),
    )

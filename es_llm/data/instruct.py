"""Instruction data for fine-tuning: one record is one fixed-length sample with loss labels.

Record forms (the ones TRL users have), detected from the fields of each record:

* prompt-completion: ``{"prompt": str, "completion": str}``; the sample is the prompt's
  tokens, the completion's tokens and one end-of-document token.
* conversational: ``{"messages": [{"role", "content"}, ...]}``, rendered with the tokenizer's
  chat template; every assistant turn is completion, everything else prompt.
* conversational prompt-completion: ``{"prompt": [messages], "completion": [messages]}``; the
  prompt is rendered with the generation prompt, the completion is what the template adds.

A record may also carry ``group`` (records of one group fall on the same side of the
train/validation split, e.g. all functions of one source file); other fields are ignored.
One record is one sample, never packed with others: its tokens are truncated or right-padded
(with the end-of-document id) to ``seq_len``. ``labels`` equal ``input_ids`` on completion
tokens and are ``IGNORE_INDEX`` on prompt and padding tokens, so the loss covers the
completion only. A record whose completion is cut is counted (``truncated_completions``); a
record left with no completion token to predict (the prompt fills ``seq_len``, or the
completion is empty) cannot train, and is counted (``dropped_no_completion_tokens``) and left
out. The counts are in the corpus's ``composition["instruct"]`` (``summary.json`` of a run).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from es_llm.data.documents import Document, Source, is_val_group
from es_llm.errors import InputError

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
INSTRUCT_PREFIX = "instruct:"
FORMAT_VERSION = 1  # bump when the build changes what lands on disk
FORMS = ("prompt-completion", "conversational", "conversational-prompt-completion")
INSTRUCT_EXTENSIONS = (".jsonl", ".json", ".parquet")


class InstructDataError(InputError):
    """Instruction records that cannot be read, or no chat template where one is needed."""


@dataclass(frozen=True)
class Record:
    key: str  # stable identity: "<file>#<n>" or an embedded set's own key
    form: str  # one of FORMS
    prompt: Any = None  # str, or a list of messages
    completion: Any = None  # str, or a list of messages
    messages: list | None = None
    group: str = ""  # the split hashes this (or the key when empty)


@dataclass
class InstructSource:
    """Records of one data argument, loaded lazily so a cache hit reads nothing."""

    name: str
    fingerprint: dict
    load: Callable[[], list[Record]]


# ----------------------------------------------------------------------------- forms
def _is_messages(x: Any) -> bool:
    return isinstance(x, list) and all(
        isinstance(m, dict) and "role" in m and "content" in m for m in x
    )


def record_form(rec: Any, where: str) -> str:
    """The form of one record, or an InstructDataError naming ``where`` and its fields."""
    if not isinstance(rec, dict):
        raise InstructDataError(f"{where} is a {type(rec).__name__}, expected an object")
    has_pc = "prompt" in rec or "completion" in rec
    fields = ", ".join(sorted(map(str, rec))) or "(none)"
    if "messages" in rec and has_pc:
        raise InstructDataError(
            f"{where} mixes 'messages' with 'prompt'/'completion' (fields: {fields}); "
            "give one form per record"
        )
    if "text" in rec and ("messages" in rec or has_pc):
        raise InstructDataError(
            f"{where} mixes 'text' (packed pre-training text) with instruction fields "
            f"(fields: {fields}); give one form per file"
        )
    if "messages" in rec:
        if not _is_messages(rec["messages"]) or not rec["messages"]:
            raise InstructDataError(
                f"{where}: 'messages' must be a non-empty list of {{role, content}} objects"
            )
        return "conversational"
    if "prompt" in rec and "completion" in rec:
        p, c = rec["prompt"], rec["completion"]
        if isinstance(p, str) and isinstance(c, str):
            return "prompt-completion"
        if _is_messages(p) and _is_messages(c) and c:
            return "conversational-prompt-completion"
        raise InstructDataError(
            f"{where}: 'prompt' and 'completion' must both be strings or both be lists of "
            f"{{role, content}} messages (got {type(p).__name__} and {type(c).__name__})"
        )
    raise InstructDataError(
        f"{where} has neither 'prompt' and 'completion' nor 'messages' (fields: {fields}); "
        "instruction data needs one of these forms"
    )


def make_record(rec: dict, key: str, where: str) -> Record:
    form = record_form(rec, where)
    group = rec.get("group")
    group = "" if group is None else str(group)
    if form == "conversational":
        return Record(key, form, messages=list(rec["messages"]), group=group)
    return Record(key, form, prompt=rec["prompt"], completion=rec["completion"], group=group)


# ----------------------------------------------------------------------------- local files
def _raw_records(path: Path) -> Iterable[dict]:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        yield from pq.read_table(path).to_pylist()
        return
    if suffix not in (".jsonl", ".json"):
        raise InstructDataError(
            f"{path}: instruction data is read from {', '.join(INSTRUCT_EXTENSIONS)} files, "
            "not this one (packed text and instruction records cannot be mixed)"
        )
    raw = path.read_text(encoding="utf-8", errors="replace")
    if suffix == ".json":
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError:
            obj = None  # JSON Lines under a .json name
        if isinstance(obj, list):
            yield from obj
            return
        if isinstance(obj, dict):
            yield obj
            return
    for n, line in enumerate(raw.splitlines()):
        if line.strip():
            try:
                yield json.loads(line)
            except json.JSONDecodeError as e:
                raise InstructDataError(f"{path}: line {n + 1} is not valid JSON ({e.msg})") from e


def first_fields(path: Path) -> set[str] | None:
    """Field names of the first record of a .jsonl/.json/.parquet file (None: no record)."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return set(pq.read_schema(path).names)
    if suffix == ".jsonl" or suffix == ".json":
        with path.open(encoding="utf-8", errors="replace") as f:
            head = f.read(1 << 16)
        line = next((ln for ln in head.splitlines() if ln.strip()), None)
        if line is None:
            return None
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            if suffix == ".jsonl":
                return None
            try:  # a .json file holding one array or object over several lines
                obj = json.loads(path.read_text(encoding="utf-8", errors="replace"))
            except json.JSONDecodeError:
                return None  # the packed reader names the bad line
        if isinstance(obj, list):
            obj = obj[0] if obj else None
        return set(obj) if isinstance(obj, dict) else None
    return None


def _looks_instruct(fields: set[str] | None) -> bool:
    return bool(fields) and "text" not in fields and ("messages" in fields or "prompt" in fields)


def is_instruct_data(data: str | None) -> bool:
    """Whether ``data`` names instruction records (``instruct:...`` or local files whose first
    record has instruction fields and no ``text``); packed pre-training data otherwise."""
    if not isinstance(data, str):
        return False
    if data.strip().lower().startswith(INSTRUCT_PREFIX):
        return True
    from es_llm.data.sources import local_files, looks_like_path

    path = Path(data).expanduser()
    if not looks_like_path(data) or not path.exists():
        return False
    files = [p for _, p in local_files(path) if p.suffix.lower() in INSTRUCT_EXTENSIONS]
    return bool(files) and _looks_instruct(first_fields(files[0]))


def local_instruct_source(data: str) -> InstructSource:
    from es_llm.data.documents import stat_entry
    from es_llm.data.sources import local_files

    path = Path(data).expanduser()
    if not path.exists():
        raise InstructDataError(f"data path does not exist: {data}")
    files = local_files(path)
    fingerprint = {
        "kind": "instruct-local",
        "root": str(path.resolve()),
        "files": [stat_entry(p, rel) for rel, p in files],
    }

    def load() -> list[Record]:
        out: list[Record] = []
        form = None
        for rel, p in files:
            for n, rec in enumerate(_raw_records(p)):
                r = make_record(rec, f"{rel}#{n}", f"{p}: record {n}")
                if form is None:
                    form = (r.form, f"{p}: record {n}")
                elif r.form != form[0]:
                    raise InstructDataError(
                        f"{p}: record {n} is {r.form} but {form[1]} is {form[0]}; "
                        "give one form per data set"
                    )
                out.append(r)
        return out

    return InstructSource(path.name or str(path), fingerprint, load)


def resolve_instruct_source(data: str, max_documents: int | None = None) -> InstructSource:
    """``instruct:<embedded set>`` or local instruction files (``max_documents``: see
    ``load_corpus``; for a local source the first records, for an embedded set its own knob)."""
    if data.strip().lower().startswith(INSTRUCT_PREFIX):
        from es_llm.data.instruct_sets import embedded_instruct_source

        return embedded_instruct_source(data.strip()[len(INSTRUCT_PREFIX) :], max_documents)
    src = local_instruct_source(data)
    if max_documents is not None:
        inner = src.load
        src.fingerprint = {**src.fingerprint, "max_documents": max_documents}
        src.load = lambda: inner()[:max_documents]
    return src


# ----------------------------------------------------------------------------- rendering
class ChatTemplate:
    """The chat template of a Hugging Face tokenizer directory, rendered to text."""

    def __init__(self, tokenizer_dir: str | None) -> None:
        self.where = tokenizer_dir
        self._tok: Any = None
        if tokenizer_dir is None:
            return
        p = Path(tokenizer_dir).expanduser()
        if not p.is_dir():
            return  # a bare tokenizer.json carries no chat template
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(p))
        if getattr(tok, "chat_template", None):
            self._tok = tok

    def render(self, messages: list, *, generation_prompt: bool = False) -> str:
        if self._tok is None:
            where = (
                "the trained BPE tokenizer (no --tokenizer given)"
                if self.where is None
                else f"tokenizer {self.where}"
            )
            raise InstructDataError(
                f"conversational records need a chat template, and {where} has none: pass "
                "--tokenizer a Hugging Face tokenizer directory whose tokenizer_config.json "
                "(or chat_template.jinja) has a chat_template, or give prompt-completion records"
            )
        if not messages:
            return ""
        return self._tok.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )


def segments(rec: Record, chat: ChatTemplate) -> list[tuple[str, bool]]:
    """The record's text as ``(text, is_completion)`` pieces, in order."""
    if rec.form == "prompt-completion":
        return [(rec.prompt, False), (rec.completion, True)]
    if rec.form == "conversational-prompt-completion":
        head = chat.render(rec.prompt, generation_prompt=True)
        full = chat.render(list(rec.prompt) + list(rec.completion))
        _check_prefix(head, full, rec)
        return [(head, False), (full[len(head) :], True)]
    msgs = rec.messages or []
    full = chat.render(msgs)
    out: list[tuple[str, bool]] = []
    pos = 0
    for k, m in enumerate(msgs):
        if m.get("role") != "assistant":
            continue
        before = chat.render(msgs[:k], generation_prompt=True)
        after = chat.render(msgs[: k + 1])
        _check_prefix(before, after, rec)
        _check_prefix(after, full, rec)
        if len(before) < pos:
            raise InstructDataError(f"record {rec.key}: the chat template is not incremental")
        out.append((full[pos : len(before)], False))
        out.append((full[len(before) : len(after)], True))
        pos = len(after)
    out.append((full[pos:], False))
    return out


def _check_prefix(head: str, full: str, rec: Record) -> None:
    if not full.startswith(head):
        raise InstructDataError(
            f"record {rec.key}: the chat template renders a conversation's beginning "
            "differently from the whole conversation, so its assistant turns cannot be located"
        )


def record_text(rec: Record, chat: ChatTemplate) -> str:
    return "".join(t for t, _ in segments(rec, chat))


# ----------------------------------------------------------------------------- tokens
@dataclass
class SplitReport:
    records: int = 0  # records of this split (before any is dropped)
    samples: int = 0  # kept: one sample each
    truncated_completions: int = 0  # kept, completion cut at seq_len
    dropped_no_completion_tokens: int = 0  # left out: no completion token to predict
    prompt_tokens: int = 0  # of the kept samples, after truncation
    completion_tokens: int = 0  # of the kept samples, after truncation (loss tokens)
    dropped_keys: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "dropped_keys"}
        d["dropped_examples"] = self.dropped_keys[:5]
        return d


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
def _split_key(rec: Record) -> str:
    return rec.group or rec.key


def split_records(
    records: list[Record], val_records: list[Record] | None, chat: ChatTemplate, label: str
) -> tuple[list[Record], list[Record], str]:
    """(train, val, rule): by the hash rule of each record's group (or key), as documents are;
    with a separate validation source, its held-out records minus texts trained on."""
    from es_llm.data.corpus import split_documents

    if val_records is None:
        docs = [Document(r.key, "", r.group) for r in records]
        train_idx, val_idx, rule = split_documents(docs)
        return [records[i] for i in train_idx], [records[i] for i in val_idx], rule
    train = [r for r in records if not is_val_group(_split_key(r))]
    seen = {hashlib.sha1(record_text(r, chat).encode()).digest() for r in train}
    val = [
        r
        for r in val_records
        if is_val_group(_split_key(r))
        and hashlib.sha1(record_text(r, chat).encode()).digest() not in seen
    ]
    if not train:
        raise InstructDataError(f"data {label}: every record falls on the validation side")
    if not val:
        raise InstructDataError(
            f"validation data of {label}: no held-out record that is not also a training "
            "record; use a larger or different validation source"
        )
    return train, val, "hash-separate-val-data"


# ----------------------------------------------------------------------------- build
def _tokenizer(
    src: InstructSource,
    train: list[Record],
    chat: ChatTemplate,
    *,
    tokenizer: str | None,
    vocab_size: int,
    cache_dir: Path,
    progress: bool,
):
    """(tokenizers.Tokenizer, eod id, its tokenizer.json): the user's, or a BPE trained on the
    train records' text (cached by its own key, as the packed corpus's)."""
    from es_llm.data.corpus import _tokenizer_for

    docs = [Document(r.key, record_text(r, chat)) for r in train]
    as_source = Source(f"{src.name}-instruct", {"instruct": src.fingerprint}, lambda: docs)
    return _tokenizer_for(
        as_source,
        docs,
        list(range(len(docs))),
        tokenizer=tokenizer,
        vocab_size=vocab_size,
        cache_dir=cache_dir,
        progress=progress,
    )


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
) -> None:
    t0 = time.perf_counter()
    records = src.load()
    if not records:
        raise InstructDataError(f"data {data_label}: no instruction records")
    chat = ChatTemplate(tokenizer)
    val_records = None if val_src is None else val_src.load()
    train, val, rule = split_records(records, val_records, chat, data_label)
    tok, eod, tok_path = _tokenizer(
        src,
        train,
        chat,
        tokenizer=tokenizer,
        vocab_size=vocab_size,
        cache_dir=cache_dir,
        progress=progress,
    )

    def encode(text: str) -> list[int]:
        return tok.encode(text, add_special_tokens=False).ids

    reports = {"train": SplitReport(), "val": SplitReport()}
    forms = sorted({r.form for r in train + val})
    for split, recs in (("train", train), ("val", val)):
        rows = []
        for r in recs:
            ids, mask = encode_record(
                segments(r, chat), encode, eod, add_eod=r.form == "prompt-completion"
            )
            row = fit_sample(ids, mask, seq_len, eod, reports[split], r.key)
            if row is not None:
                rows.append(row)
        if not rows:
            rep = reports[split]
            raise InstructDataError(
                f"data {data_label}: none of the {rep.records} {split} records keeps a "
                f"completion token within seq_len={seq_len} "
                f"({rep.dropped_no_completion_tokens} dropped); use a larger --seq-len"
            )
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
        "instruct": {
            "records": tr.records + va.records,
            "truncated_completions": tr.truncated_completions + va.truncated_completions,
            "dropped_no_completion_tokens": (
                tr.dropped_no_completion_tokens + va.dropped_no_completion_tokens
            ),
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
        print(
            f"es-llm: instruction data {meta['data']}: {rep['records']} records, "
            f"{rep['dropped_no_completion_tokens']} left out (no completion token within "
            f"seq_len={meta['seq_len']}), {rep['truncated_completions']} with the completion "
            "cut; counts in summary.json (data_composition.instruct)",
            file=sys.stderr,
            flush=True,
        )


def composition(meta: dict, n_train: int, n_val: int) -> dict:
    return {
        "data": meta["data"],
        "val_data": meta["val_data"],
        "kind": "instruct",
        "forms": meta["forms"],
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
):
    """The instruction-data counterpart of ``load_corpus`` (which calls it): a ``Corpus``
    whose train/val datasets carry a ``labels`` column next to ``input_ids``."""
    import datasets

    from es_llm.data import corpus as packed

    src = resolve_instruct_source(data, max_documents)
    val_src = None
    if val_data is not None:
        if not is_instruct_data(val_data):
            raise InstructDataError(
                f"--val-data {val_data!r} is not instruction data, but --data {data!r} is: "
                "validate instruction training on instruction records"
            )
        val_src = resolve_instruct_source(val_data, max_documents)
    if tokenizer is not None:
        from es_llm.data.tokenizer import resolve_tokenizer_file

        tok_file, eos = resolve_tokenizer_file(tokenizer)
        tok_fp: dict = {"file_sha256": hashlib.sha256(tok_file.read_bytes()).hexdigest()}
        cfg = Path(tokenizer).expanduser()
        for extra in ("tokenizer_config.json", "chat_template.jinja"):
            if cfg.is_dir() and (cfg / extra).is_file():
                tok_fp[extra] = hashlib.sha256((cfg / extra).read_bytes()).hexdigest()
        tok_fp["eos"] = eos
    else:
        tok_fp = {"trained_bpe": vocab_size}
    key = packed._digest(
        {
            "v": FORMAT_VERSION,
            "kind": "instruct",
            "source": src.fingerprint,
            "tokenizer": tok_fp,
            "seq_len": seq_len,
            "split": packed.SPLIT_RULE,
            **({} if val_src is None else {"val_source": val_src.fingerprint}),
        }
    )[:16]
    final = cache_dir / f"{src.name}-instruct-T{seq_len}-{key}"
    label = repr(data)
    if not (final / "meta.json").is_file():
        with packed._file_lock(packed.lock_path(cache_dir, f"{src.name}-instruct-{key}")):
            if not (final / "meta.json").is_file():
                if progress:
                    print(
                        f"es-llm: building the instruction data cache for {src.name} once "
                        f"-> {final}",
                        file=sys.stderr,
                        flush=True,
                    )
                cache_dir.mkdir(parents=True, exist_ok=True)
                tmp = Path(
                    tempfile.mkdtemp(prefix=f".build-{key}-{uuid.uuid4().hex[:8]}-", dir=cache_dir)
                )
                try:
                    with packed._datasets_progress(progress):
                        build(
                            src,
                            tmp,
                            seq_len=seq_len,
                            vocab_size=vocab_size,
                            tokenizer=tokenizer,
                            cache_dir=cache_dir,
                            progress=progress,
                            data_label=label,
                            val_src=val_src,
                        )
                    if final.exists():
                        shutil.rmtree(final, ignore_errors=True)
                    try:
                        os.rename(tmp, final)
                    except OSError:
                        if not (final / "meta.json").is_file():
                            raise
                finally:
                    shutil.rmtree(tmp, ignore_errors=True)
    meta = json.loads((final / "meta.json").read_text())
    _warn(meta)
    train = packed._truncate(
        datasets.load_from_disk(str(final / "train")), max_train_samples, "max_train_samples"
    )
    val = packed._truncate(
        datasets.load_from_disk(str(final / "val")), max_val_samples, "max_val_samples"
    )
    return packed.Corpus(
        train=train,
        val=val,
        vocab_size=int(meta["vocab_size"]),
        seq_len=seq_len,
        tokenizer_path=str(final / "tokenizer.json"),
        name=src.name,
        eod_id=int(meta["eod_id"]),
        cache_path=str(final),
        stats=meta,
        composition=composition(meta, len(train), len(val)),
    )

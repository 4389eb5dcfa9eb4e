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
out. A completion is empty when it holds no text but white space: a prompt-completion
record's ``completion`` string, the contents of a conversational prompt-completion record's
completion messages, or of a conversational record's assistant turns (none at all counts as
empty); those records are also counted apart (``dropped_empty_completion``), since no
``seq_len`` would keep them. Message roles are ``system``, ``user`` and ``assistant``;
another role is an error naming it and the record. The counts are in the corpus's
``composition["instruct"]`` (``summary.json`` of a run).
Building and caching the samples is ``es_llm.data.instruct_build``'s.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from es_llm.data.sources import NotTextError, decode_text, read_data_bytes, unreadable
from es_llm.errors import InputError

IGNORE_INDEX = -100
INSTRUCT_PREFIX = "instruct:"
FORMS = ("prompt-completion", "conversational", "conversational-prompt-completion")
INSTRUCT_EXTENSIONS = (".jsonl", ".json", ".parquet")
ROLES = ("system", "user", "assistant")  # every other role is refused (check_roles)


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


def check_roles(messages: list, where: str, field: str) -> None:
    """Every message's role is one of ROLES: the split into prompt and completion knows no
    other, and would silently count a 'tool' or 'bot' turn as prompt."""
    for k, m in enumerate(messages):
        role = m.get("role")
        if role not in ROLES:
            raise InstructDataError(
                f"{where}: {field!r} message {k} has role {role!r}; roles are "
                f"{', '.join(ROLES)} (the assistant turns are the completion)"
            )


def _has_text(x: Any) -> bool:
    return any(s.strip() for s in _strings(x))


def has_completion(rec: Record) -> bool:
    """Whether the record's completion holds any text but white space (the assistant turns'
    contents for a conversation; no assistant turn is no completion)."""
    if rec.form == "prompt-completion":
        return _has_text(rec.completion)
    if rec.form == "conversational-prompt-completion":
        return any(_has_text(m.get("content")) for m in rec.completion)
    return any(
        m.get("role") == "assistant" and _has_text(m.get("content")) for m in rec.messages or []
    )


def _strings(x: Any) -> Iterable[str]:
    """Every string inside a record's prompt, completion or messages."""
    if isinstance(x, str):
        yield x
    elif isinstance(x, dict):
        for v in x.values():
            yield from _strings(v)
    elif isinstance(x, list):
        for v in x:
            yield from _strings(v)


def make_record(rec: dict, key: str, where: str) -> Record:
    form = record_form(rec, where)
    fields = ("messages",) if form == "conversational" else ("prompt", "completion")
    for f in fields:
        if any("\x00" in s for s in _strings(rec[f])):
            raise NotTextError(f"{where}: its {f!r} is not text: it holds a NUL character")
        if form != "prompt-completion":
            check_roles(rec[f], where, f)
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

        read_data_bytes(path, 4)  # an unreadable file: one line, not pyarrow's OSError
        yield from pq.read_table(path).to_pylist()
        return
    if suffix not in (".jsonl", ".json"):
        raise InstructDataError(
            f"{path}: instruction data is read from {', '.join(INSTRUCT_EXTENSIONS)} files, "
            "not this one (packed text and instruction records cannot be mixed)"
        )
    raw, _ = decode_text(read_data_bytes(path), str(path))  # refuses binaries, other encodings
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
    """Field names of the first record of a .jsonl/.json/.parquet file (None: no record);
    an unreadable file is one line naming it."""
    try:
        return _first_fields(path)
    except OSError as e:
        raise unreadable(path, e) from e


def _first_fields(path: Path) -> set[str] | None:
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
    if not looks_like_path(data) or not os.path.exists(path):  # (False where it cannot look)
        return False
    files = [p for _, p in local_files(path) if p.suffix.lower() in INSTRUCT_EXTENSIONS]
    return bool(files) and _looks_instruct(first_fields(files[0]))


def local_instruct_source(data: str) -> InstructSource:
    from es_llm.data.sources import local_files_checked

    path, files, stats = local_files_checked(data)
    fingerprint = {"kind": "instruct-local", "root": str(path.resolve()), "files": stats}

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
        from es_llm.model import auto_tokenizer  # trust_remote_code=False; auto_map refused

        tok = auto_tokenizer(p)
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

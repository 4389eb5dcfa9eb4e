"""Document sources: where the raw text comes from, as an ordered list of keyed documents.

Every source yields ``Document(key, text)`` in a fixed order, plus a fingerprint that changes
whenever the result could change; the corpus cache key is built from it. The key of a document
is stable across machines with the same data (a relative path, a record number) because the
train/validation split hashes it.
"""

from __future__ import annotations

import codecs
import functools
import json
import os
import re
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from es_llm.data.documents import (
    DEFAULT_VAL_SHARE,
    Document,
    Source,
    keep_first,
    stat_entry,
    stdlib_files,
    stdlib_root,
)
from es_llm.data.recipes import recipe_source
from es_llm.errors import InputError

STDLIB_NAMES = ("stdlib",)
LOCAL_EXTENSIONS = (".txt", ".jsonl", ".json", ".parquet")
REPLACED_KEY = "replaced_characters"  # Source.read_stats key: bytes decoded as U+FFFD
CACHE_ENV = "ES_LLM_CACHE"


def default_cache_dir() -> Path:
    """The corpus cache without --cache-dir: $ES_LLM_CACHE, else ~/.cache/es_llm. Here, not in
    corpus.py, so that the preflight checks can name it without importing ``datasets``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "es_llm")


# ----------------------------------------------------------------------------- readable
class UnreadableDataError(InputError):
    """A data file or folder exists but cannot be read (permissions, a broken mount)."""


def unreadable(path: str | os.PathLike, error: OSError) -> UnreadableDataError:
    """The one-line error for an OSError met while listing or reading data at ``path``."""
    where = error.filename if error.filename is not None else path
    why = error.strerror or str(error)
    return UnreadableDataError(f"cannot read data {where}: {why}")


def read_data_bytes(path: Path, limit: int | None = None) -> bytes:
    """The bytes of a data file (the first ``limit`` of them); an OSError becomes one line
    naming the file (UnreadableDataError) instead of a traceback."""
    try:
        with path.open("rb") as fh:
            return fh.read() if limit is None else fh.read(limit)
    except OSError as e:
        raise unreadable(path, e) from e


# ----------------------------------------------------------------------------- text or not
# A file is read as UTF-8; an undecodable byte becomes U+FFFD and is counted. A file (or a
# text field) is refused as "not text" when it holds a NUL character, or when more than
# MAX_REPLACED_SHARE of its characters had to be replaced (and more than MAX_REPLACED_FEW):
# that is a binary file or text in another encoding, and training on it would train on
# U+FFFD. A few bad bytes in a real text file are replaced, counted and reported instead.
MAX_REPLACED_SHARE = 0.01
MAX_REPLACED_FEW = 16
SNIFF_BYTES = 1 << 16  # what the preflight check reads of each file
_UTF8_REPLACEMENT = "\ufffd".encode()


class NotTextError(InputError):
    """A data file (or a text field in it) is binary or not UTF-8; the message names it."""


def _refuse_if_not_text(text: str, replaced: int, where: str) -> None:
    nul = text.find("\x00")
    if nul != -1:
        raise NotTextError(
            f"{where} is not text: it holds a NUL character (at character {nul}); "
            "a binary file? give text files only"
        )
    if replaced > MAX_REPLACED_FEW and replaced > MAX_REPLACED_SHARE * max(len(text), 1):
        raise NotTextError(
            f"{where} is not UTF-8 text: {replaced} of its {len(text)} characters are "
            f"undecodable bytes (more than {MAX_REPLACED_SHARE:.0%}); a binary file, or text "
            "in another encoding (convert it, e.g. iconv -f latin1 -t utf-8)"
        )


def decode_text(raw: bytes, where: str, *, final: bool = True) -> tuple[str, int]:
    """``raw`` as UTF-8 text and the number of undecodable bytes replaced by U+FFFD; refuses
    (NotTextError) what is not text. ``final=False``: ``raw`` is a file's head, whose last
    character may be cut."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    text = decoder.decode(raw, final=final)
    replaced = text.count("\ufffd") - raw.count(_UTF8_REPLACEMENT)
    _refuse_if_not_text(text, replaced, where)
    return text, replaced


def check_texts(texts: list, where: str) -> None:
    """Refuse NUL characters in the (already decoded) text fields of one file."""
    for n, t in enumerate(texts):
        if isinstance(t, str) and "\x00" in t:
            _refuse_if_not_text(t, 0, f"{where}: the text of record {n}")


def sniff_local_files(files: list[tuple[str, Path]]) -> None:
    """Read the head of each text-format file and refuse binaries and other encodings before
    any engine starts (parquet is binary by design: its text is checked when read)."""
    for _, path in files:
        if path.suffix.lower() == ".parquet":
            read_data_bytes(path, 4)  # readable at all (its magic number)
            continue
        head = read_data_bytes(path, SNIFF_BYTES)
        decode_text(head, str(path), final=len(head) < SNIFF_BYTES)


# ----------------------------------------------------------------------------- stdlib
def stdlib_source(max_documents: int | None = None) -> Source:
    files = stdlib_files(max_documents)
    if not files:
        raise InputError(f"no .py files found in the standard library at {stdlib_root()}")
    fingerprint = {
        "kind": "stdlib",
        "python": sys.version,
        "files": [stat_entry(p, rel) for rel, p in files],
    }

    src = Source("stdlib", fingerprint, lambda: [])

    def load() -> list[Document]:
        docs, replaced = [], 0
        for rel, p in files:
            raw = p.read_bytes()
            text = raw.decode("utf-8", errors="replace")
            replaced += text.count("\ufffd") - raw.count(_UTF8_REPLACEMENT)
            docs.append(Document(rel, text))
        src.read_stats[REPLACED_KEY] = replaced
        return docs

    src.load = load
    return src


# ----------------------------------------------------------------------------- local files
def looks_like_path(data: str) -> bool:
    """Whether ``data`` is meant as a local path (else it is read as a hub dataset name)."""
    return (
        os.path.exists(data)
        or data.startswith(("/", ".", "~"))
        or "\\" in data
        or data.lower().endswith(LOCAL_EXTENSIONS)
    )


def local_files(path: Path) -> list[tuple[str, Path]]:
    """Supported files under ``path`` (or ``path`` itself), keyed by path relative to it.
    A folder that cannot be listed is an UnreadableDataError naming it (os.walk would skip it
    without a word)."""
    try:
        is_file = path.is_file()
    except OSError as e:
        raise unreadable(path, e) from e
    if is_file:
        if not path.name.lower().endswith(LOCAL_EXTENSIONS):
            raise InputError(
                f"unsupported data file {path}: expected one of {', '.join(LOCAL_EXTENSIONS)}"
            )
        return [(path.name, path)]
    out = []

    def refuse(e: OSError) -> None:
        raise unreadable(path, e) from e

    for dirpath, dirnames, filenames in os.walk(path, onerror=refuse):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for fn in filenames:
            if fn.lower().endswith(LOCAL_EXTENSIONS) and not fn.startswith("."):
                p = Path(dirpath) / fn
                out.append((p.relative_to(path).as_posix(), p))
    out.sort(key=lambda t: t[0])
    if not out:
        raise InputError(
            f"no data files in directory {path}: expected files ending in "
            f"{', '.join(LOCAL_EXTENSIONS)}"
        )
    return out


def _texts_from_records(records: Iterable, path: Path, what: str) -> list[str]:
    texts = []
    for n, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise InputError(f"{path}: {what} {n} is a {type(rec).__name__}, expected an object")
        if "text" not in rec:
            fields = ", ".join(sorted(map(str, rec))) or "(none)"
            raise InputError(f"{path}: {what} {n} has no 'text' field; available fields: {fields}")
        texts.append(rec["text"])
    return texts


def _read_json(path: Path) -> tuple[list[str], int]:
    raw, replaced = decode_text(read_data_bytes(path), str(path))
    texts = _json_texts(raw, path)
    check_texts(texts, str(path))
    return texts, replaced


def _json_texts(raw: str, path: Path) -> list[str]:
    if path.suffix.lower() == ".json":
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError:
            obj = None  # maybe JSON Lines under a .json name
        if isinstance(obj, list):
            return _texts_from_records(obj, path, "record")
        if isinstance(obj, dict):
            return _texts_from_records([obj], path, "record")
    records = []
    for n, line in enumerate(raw.splitlines()):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise InputError(f"{path}: line {n + 1} is not valid JSON ({e.msg})") from e
    return _texts_from_records(records, path, "record")


def _read_parquet(path: Path) -> list[str]:
    import pyarrow.parquet as pq

    read_data_bytes(path, 4)  # an unreadable file: one line, not pyarrow's OSError
    schema = pq.read_schema(path)
    if "text" not in schema.names:
        raise InputError(
            f"{path}: no 'text' column; available columns: {', '.join(schema.names) or '(none)'}"
        )
    texts = pq.read_table(path, columns=["text"]).column("text").to_pylist()
    check_texts(texts, str(path))
    return texts


# A single .txt file given as --data is cut into documents before the train/validation split
# (a folder of .txt files keeps one document per file). The rule, also in the README:
# paragraphs (separated by blank lines) are joined in order into documents of at least
# TEXT_DOC_CHARS characters; when that gives fewer than TEXT_MIN_DOCS documents, the file is
# cut into TEXT_MIN_DOCS blocks of about equal size instead, each ending at a line end where
# the block has one in its second half. Below TEXT_MIN_CHARS characters it is refused.
TEXT_DOC_CHARS = 2000
TEXT_MIN_DOCS = 20
TEXT_MIN_BLOCK_CHARS = 100
TEXT_MIN_CHARS = TEXT_MIN_DOCS * TEXT_MIN_BLOCK_CHARS
TEXT_SPLIT_RULE = f"paragraphs>={TEXT_DOC_CHARS}-or-{TEXT_MIN_DOCS}-blocks"
_BLANK_LINE = re.compile(r"\n[ \t\r\f\v]*\n\s*")


def _paragraph_documents(text: str, min_chars: int) -> list[str]:
    """Blank-line paragraphs joined in order until each document holds ``min_chars``."""
    docs: list[str] = []
    current: list[str] = []
    size = 0
    for para in _BLANK_LINE.split(text):
        if not para.strip():
            continue
        current.append(para)
        size += len(para)
        if size >= min_chars:
            docs.append("\n\n".join(current))
            current, size = [], 0
    if current:  # a short rest joins the previous document
        rest = "\n\n".join(current)
        if docs:
            docs[-1] = docs[-1] + "\n\n" + rest
        else:
            docs.append(rest)
    return docs


def _block_documents(text: str, count: int) -> list[str]:
    """``count`` blocks of about equal size: each cut at ``k * len / count``, moved back to
    just after a line end when one lies within half a block before it."""
    size = len(text) / count
    cuts = [0]
    for k in range(1, count):
        cut = round(k * size)
        nl = text.rfind("\n", max(cuts[-1] + 1, round(cut - size / 2)), cut)
        cuts.append(nl + 1 if nl != -1 else cut)
    cuts.append(len(text))
    return [text[a:b] for a, b in zip(cuts, cuts[1:], strict=False) if b > a]


def split_text_file(text: str, where: str) -> list[str]:
    """The documents of one whole .txt file (see TEXT_SPLIT_RULE above)."""
    chars = len(text.strip())
    if chars < TEXT_MIN_CHARS:
        raise InputError(
            f"{where} holds {chars} characters of text; a single text file needs at least "
            f"{TEXT_MIN_CHARS} (it is cut into {TEXT_MIN_DOCS} documents for the train/"
            f"validation split): add text, or give a folder of several text files"
        )
    docs = _paragraph_documents(text, TEXT_DOC_CHARS)
    if len(docs) < TEXT_MIN_DOCS:
        docs = _block_documents(text.strip(), TEXT_MIN_DOCS)
    return docs


def read_local_file(path: Path, *, split_text: bool = False) -> list[str]:
    """The texts of one file: .jsonl/.json/.parquet give one per record; a .txt file is one
    document, or with ``split_text`` (a single file given as the data) cut by split_text_file.
    A file that is not text is refused (NotTextError)."""
    return read_local_file_counted(path, split_text=split_text)[0]


def read_local_file_counted(path: Path, *, split_text: bool = False) -> tuple[list[str], int]:
    """`read_local_file` and the number of undecodable bytes it replaced by U+FFFD."""
    suffix = path.suffix.lower()
    if suffix == ".txt":
        text, replaced = decode_text(read_data_bytes(path), str(path))
        return (split_text_file(text, str(path)) if split_text else [text]), replaced
    if suffix in (".jsonl", ".json"):
        return _read_json(path)
    if suffix == ".parquet":
        return _read_parquet(path), 0
    raise InputError(f"unsupported data file {path}")


def _keep_texts(texts: Iterable, key_prefix: str, where: str) -> list[Document]:
    """Documents from a file's texts; empty/None texts are skipped, non-strings are an error."""
    docs = []
    for n, t in enumerate(texts):
        if t is None:
            continue
        if not isinstance(t, str):
            raise InputError(f"{where}: 'text' of record {n} is a {type(t).__name__}, not a string")
        if t.strip():
            docs.append(Document(f"{key_prefix}#{n}", t))
    return docs


def local_files_checked(data: str) -> tuple[Path, list[tuple[str, Path]], list[list]]:
    """(path, its data files, their stat entries) of a local ``data`` argument: a missing
    path, no data files, or a path that cannot be listed or stat-ed is one line."""
    path = Path(data).expanduser()
    try:
        exists = path.exists()
    except OSError as e:  # a parent folder without search permission
        raise unreadable(path, e) from e
    if not exists:
        raise InputError(f"data path does not exist: {data}")
    files = local_files(path)
    try:
        stats = [stat_entry(p, rel) for rel, p in files]
    except OSError as e:
        raise unreadable(path, e) from e
    return path, files, stats


def local_source(data: str) -> Source:
    path, files, stats = local_files_checked(data)
    split_text = path.is_file() and path.suffix.lower() == ".txt"
    fingerprint = {"kind": "local", "root": str(path.resolve()), "files": stats}
    if split_text:
        fingerprint["text_split"] = TEXT_SPLIT_RULE

    src = Source(path.name or str(path), fingerprint, lambda: [])

    def load() -> list[Document]:
        docs: list[Document] = []
        replaced = 0
        for rel, p in files:
            texts, n = read_local_file_counted(p, split_text=split_text)
            replaced += n
            docs.extend(_keep_texts(texts, rel, str(p)))
        src.read_stats[REPLACED_KEY] = replaced
        return docs

    src.load = load
    return src


# ----------------------------------------------------------------------------- hub
# Without network, `datasets.load_dataset` retries each request with back-off (about 27 s) and
# logs every retry. So the hub is probed once first, with one short request through
# huggingface_hub's own HTTP session (its proxies, endpoint and certificates); when that fails,
# or offline mode is set (HF_HUB_OFFLINE, HF_DATASETS_OFFLINE), the dataset is loaded in
# offline mode: a copy in the local `datasets` cache still loads, anything else is one line.
HUB_PROBE_TIMEOUT_S = 5.0
_OFFLINE_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
_announced: set[str] = set()


def is_hub_name(data: str | None) -> bool:
    """Whether ``data`` is read as a Hugging Face hub dataset name (see resolve_source)."""
    if not isinstance(data, str) or not data.strip() or data in STDLIB_NAMES:
        return False
    if data.strip().lower().startswith(("recipe:", "instruct:")):
        return False
    return not looks_like_path(data)


def _offline_requested() -> str | None:
    for var in _OFFLINE_ENV:
        if os.environ.get(var, "").strip().upper() in ("1", "ON", "YES", "TRUE"):
            return f"offline mode is set ({var})"
    return None


def _is_transport_error(e: Exception) -> bool:
    """A failure to reach the server (requests' errors are OSErrors; httpx's are not)."""
    return isinstance(e, OSError) or any(c.__name__ == "TransportError" for c in type(e).__mro__)


@functools.cache
def hub_unreachable() -> str | None:
    """Why the hub cannot be reached (offline mode set, or one short request failed), or
    None when it answered. One request per process, whatever the answer."""
    offline = _offline_requested()
    if offline is not None:
        return offline
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    try:
        get_session().head(constants.ENDPOINT, timeout=HUB_PROBE_TIMEOUT_S)
    except Exception as e:
        if not _is_transport_error(e):
            raise
        return f"the Hugging Face hub ({constants.ENDPOINT}) is not reachable: {e}"
    return None


@contextmanager
def _hub_offline() -> Iterator[None]:
    """datasets and huggingface_hub in offline mode (no request at all) and their warnings
    held back, restoring both afterwards. Their offline flags are read from the environment
    once, at import; both libraries consult the module attributes at call time."""
    import datasets
    from huggingface_hub import constants

    flags = [(datasets.config, "HF_HUB_OFFLINE"), (datasets.config, "HF_DATASETS_OFFLINE")]
    flags = [(m, a) for m, a in [*flags, (constants, "HF_HUB_OFFLINE")] if hasattr(m, a)]
    saved = [getattr(m, a) for m, a in flags]
    level = datasets.logging.get_verbosity()
    for m, a in flags:
        setattr(m, a, True)
    datasets.logging.set_verbosity_error()
    try:
        yield
    finally:
        for (m, a), v in zip(flags, saved, strict=True):
            setattr(m, a, v)
        datasets.logging.set_verbosity(level)


def load_hub_dataset(data: str):
    """The "train" split of hub dataset ``name`` or ``name:config`` (not streamed): from the
    hub, or from the local cache when the hub cannot be reached; else one InputError."""
    import datasets

    name, _, config = data.partition(":")
    tried = f"(name={name!r}, config={config or None!r}, split='train')"
    reason = hub_unreachable()
    if reason is None:
        try:
            return datasets.load_dataset(name, config or None, split="train", streaming=False)
        except Exception as e:  # missing dataset, bad config: say what was tried
            raise InputError(
                f"could not load Hugging Face dataset {data!r} {tried}, and it is not a local "
                f"path: {e}"
            ) from e
    try:
        with _hub_offline():
            ds = datasets.load_dataset(name, config or None, split="train", streaming=False)
    except Exception as e:
        detail = "" if isinstance(e, ConnectionError | FileNotFoundError) else f" ({e})"
        raise InputError(
            f"could not load Hugging Face dataset {data!r} {tried}: {reason}, and the dataset "
            f"is not in the local datasets cache ({datasets.config.HF_DATASETS_CACHE}){detail}; "
            "connect to the network, or give a local path"
        ) from e
    if data not in _announced and os.environ.get("RANK", "0") == "0":
        _announced.add(data)
        print(f"es-llm: {reason}; using the cached copy of {data!r}", file=sys.stderr, flush=True)
    return ds


def check_hub_dataset(data: str | None) -> None:
    """Preflight: a hub name that cannot load (no network and not cached) fails here. With
    network nothing is fetched here: the run loads it when the corpus is built."""
    if is_hub_name(data) and hub_unreachable() is not None:
        load_hub_dataset(str(data))


def hub_source(data: str) -> Source:
    """A Hugging Face hub dataset ``name`` or ``name:config``, split "train", not streamed."""
    name, _, config = data.partition(":")
    ds = load_hub_dataset(data)
    if "text" not in ds.column_names:
        raise InputError(
            f"Hugging Face dataset {data!r} has no 'text' column; "
            f"available columns: {', '.join(ds.column_names) or '(none)'}"
        )
    fp = getattr(ds, "_fingerprint", None) or f"rows={ds.num_rows}"
    fingerprint = {"kind": "hub", "name": name, "config": config, "fingerprint": fp}

    def load() -> list[Document]:
        return _keep_texts(ds["text"], f"{name}:{config}", f"Hugging Face dataset {data!r}")

    return Source(data.replace("/", "__").replace(":", "--"), fingerprint, load)


def resolve_source(
    data: str | None, max_documents: int | None = None, *, val_share: float = DEFAULT_VAL_SHARE
) -> Source:
    """Route ``data``: None/"stdlib", "recipe:..." (data/recipes.py), a local path, or a hub name.

    ``val_share`` (--val-share) matters to recipes only, whose duplicates copy training-side
    documents of the split at that share; the other sources do not depend on the split."""
    if data is None or data in STDLIB_NAMES:
        return stdlib_source(max_documents)
    if isinstance(data, str) and data.strip().lower().startswith("recipe:"):
        return recipe_source(data, max_documents, val_share=val_share)
    if not isinstance(data, str) or not data.strip():
        raise InputError(f"data must be None, 'stdlib', a path or a dataset name, got {data!r}")
    return keep_first(
        local_source(data) if looks_like_path(data) else hub_source(data), max_documents
    )

"""The tokenizer of a corpus build, and the tokenizer's part of the corpus cache key.

A build uses the user's tokenizer (``--tokenizer``: a tokenizer.json or a Hugging Face
tokenizer directory) or trains a byte-level BPE on the training side of the split, cached in
``CACHE/tokenizers/`` under a key of its own, so that corpora of the same source at other
sequence lengths share it. The packed and the instruction corpus both come here.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Sequence
from pathlib import Path

from tokenizers import Tokenizer

from es_llm.data.cache import cache_digest
from es_llm.data.documents import DEFAULT_VAL_SHARE
from es_llm.data.split import split_rule
from es_llm.data.tokenizer import (
    EOD_TOKEN,
    eod_id,
    load_tokenizer,
    resolve_tokenizer_file,
    save_tokenizer_atomic,
    train_bpe,
)

__all__ = ["BPE_CACHE_VERSION", "corpus_tokenizer", "tokenizer_fingerprint"]

logger = logging.getLogger(__name__)

BPE_CACHE_VERSION = 2  # bump when training changes what a cached BPE holds
# files of a Hugging Face tokenizer directory, besides its tokenizer.json, that change what a
# cached corpus holds: the chat template renders instruction records into text
TOKENIZER_EXTRA_FILES = ("tokenizer_config.json", "chat_template.jinja")


def tokenizer_fingerprint(tokenizer: str | None, vocab_size: int) -> dict:
    """The tokenizer's part of a corpus cache key: the sha256 of its tokenizer.json, its
    end-of-document token and, for a directory, of the files that carry its chat template;
    ``{"trained_bpe": vocab_size}`` when the corpus trains its own BPE."""
    if tokenizer is None:
        return {"trained_bpe": vocab_size}
    tok_file, eos = resolve_tokenizer_file(tokenizer)
    fp: dict = {"file_sha256": hashlib.sha256(tok_file.read_bytes()).hexdigest()}
    folder = Path(tokenizer).expanduser()
    for extra in TOKENIZER_EXTRA_FILES:
        if folder.is_dir() and (folder / extra).is_file():
            fp[extra] = hashlib.sha256((folder / extra).read_bytes()).hexdigest()
    fp["eos"] = eos
    return fp


def corpus_tokenizer(
    name: str,
    fingerprint: dict,
    texts: Sequence[str],
    *,
    tokenizer: str | None,
    vocab_size: int,
    cache_dir: Path,
    progress: bool = False,
    val_share: float = DEFAULT_VAL_SHARE,
) -> tuple[Tokenizer, int, Path]:
    """(tokenizer, end-of-document id, its tokenizer.json): the user's ``tokenizer``, or a BPE
    of ``vocab_size`` trained on ``texts`` (the training side of source ``name`` split at
    ``val_share``; the fingerprint and the split key the cached BPE)."""
    if tokenizer is not None:
        tok, path, eod = load_tokenizer(tokenizer)
        return tok, eod, path
    key = cache_digest(
        {
            "v": BPE_CACHE_VERSION,
            "source": fingerprint,
            "vocab": vocab_size,
            "split": split_rule(val_share),
        }
    )[:16]
    path = cache_dir / "tokenizers" / f"{name}-v{vocab_size}-{key}.json"
    if path.is_file():
        tok = Tokenizer.from_file(str(path))
    else:
        t0 = time.perf_counter()
        logger.info("training a %d-token BPE on %d documents", vocab_size, len(texts))
        tok = train_bpe(iter(texts), vocab_size, length=len(texts), progress=progress)
        save_tokenizer_atomic(tok, path)
        logger.info("tokenizer trained in %.1fs -> %s", time.perf_counter() - t0, path)
    return tok, eod_id(tok, EOD_TOKEN, where=str(path)), path

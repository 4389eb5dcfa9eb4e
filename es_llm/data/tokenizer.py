"""Byte-level BPE tokenizers: train one on the corpus, or load a user-supplied one.

Byte-level so that every input (source code, any language) is encodable without an unknown
token; one special end-of-document token separates documents in the packed stream.
A user tokenizer is a tokenizer.json or a Hugging Face tokenizer (or model) directory holding
one; `hf_tokenizer` turns whichever the run used into a `transformers` tokenizer to export.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from es_llm.errors import InputError

if TYPE_CHECKING:  # transformers is imported only to export a tokenizer
    from transformers import PreTrainedTokenizerBase

EOD_TOKEN = "<|endoftext|>"
# Tried in order when a user tokenizer names no eos token in its tokenizer_config.json.
EOD_CANDIDATES = (EOD_TOKEN, "</s>", "<eos>", "<|end_of_text|>", "<|eot_id|>", "[SEP]")
MIN_VOCAB = 257  # 256 byte symbols + the end-of-document token


def train_bpe(
    texts: Iterable[str], vocab_size: int, *, length: int | None = None, progress: bool = False
) -> Tokenizer:
    """Train a byte-level BPE with ``EOD_TOKEN`` as id 0 (``progress``: the trainer's bars)."""
    if vocab_size < MIN_VOCAB:
        raise InputError(
            f"vocab_size must be at least {MIN_VOCAB} (256 bytes + end-of-document), got {vocab_size}"
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=progress,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=length)
    return tok


def save_tokenizer_atomic(tok: Tokenizer, path: Path) -> None:
    """Write tokenizer.json via temp file + rename so a concurrent reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tok-", suffix=".json", dir=path.parent)
    os.close(fd)
    try:
        tok.save(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def resolve_tokenizer_file(spec: str) -> tuple[Path, str | None]:
    """(tokenizer.json path, eos token named by tokenizer_config.json or None) for a user spec.

    ``spec`` is a tokenizer.json file or a local Hugging Face tokenizer directory holding one.
    """
    p = Path(spec).expanduser()
    if not p.exists():
        raise InputError(f"tokenizer path does not exist: {spec}")
    eos = None
    if p.is_dir():
        cfg = p / "tokenizer_config.json"
        if cfg.is_file():
            try:
                tok_cfg = json.loads(cfg.read_text())
            except json.JSONDecodeError as e:
                raise InputError(f"{cfg}: not valid JSON ({e.msg})") from e
            raw = tok_cfg.get("eos_token")
            eos = raw.get("content") if isinstance(raw, dict) else raw
        p = p / "tokenizer.json"
        if not p.is_file():
            raise InputError(
                f"tokenizer directory {spec} has no tokenizer.json (a fast tokenizer is "
                f"required: AutoTokenizer.from_pretrained(dir).save_pretrained(dir) writes one, "
                f"or pass --tokenizer)"
            )
    return p, eos


def load_tokenizer(spec: str) -> tuple[Tokenizer, Path, int]:
    """Load a user tokenizer; returns (tokenizer, its tokenizer.json, end-of-document id)."""
    path, eos = resolve_tokenizer_file(spec)
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:
        raise InputError(f"could not read tokenizer {path}: {e}") from e
    return tok, path, eod_id(tok, eos, where=str(path))


def eod_id(tok: Tokenizer, preferred: str | None = None, *, where: str = "tokenizer") -> int:
    """The id appended after each document: the configured eos token or a well-known one."""
    for name in ((preferred,) if preferred else ()) + EOD_CANDIDATES:
        i = tok.token_to_id(name)
        if i is not None:
            return i
    tried = ", ".join(((preferred,) if preferred else ()) + EOD_CANDIDATES)
    raise InputError(f"{where}: no end-of-document token found (tried {tried})")


def token_id_bound(tok: Tokenizer) -> int:
    """One more than the largest token id ``tok`` can emit (added tokens included)."""
    return max(tok.get_vocab(with_added_tokens=True).values()) + 1


def hf_tokenizer(
    spec: str | None, tokenizer_json: str | Path, eod: int, *, model_max_length: int | None = None
) -> PreTrainedTokenizerBase:
    """The run's tokenizer as a `transformers` tokenizer, ready for ``save_pretrained``.

    A Hugging Face tokenizer directory (``spec`` holding a tokenizer_config.json) loads as
    itself, its special tokens included. Otherwise (the corpus's trained BPE, or a bare
    tokenizer.json) ``tokenizer_json`` is wrapped in a `PreTrainedTokenizerFast` whose
    bos, eos and pad token is the end-of-document token ``eod`` the corpus separates
    documents with, as GPT-2's tokenizer does.
    """
    if spec is not None and (Path(spec).expanduser() / "tokenizer_config.json").is_file():
        from es_llm.model import auto_tokenizer  # trust_remote_code=False; auto_map refused

        return auto_tokenizer(Path(spec).expanduser())
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer.from_file(str(tokenizer_json))
    name = tok.id_to_token(eod)
    extra = {} if model_max_length is None else {"model_max_length": model_max_length}
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=name, eos_token=name, pad_token=name, **extra
    )

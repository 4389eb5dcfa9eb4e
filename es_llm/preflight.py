"""Checks of `es-llm train`'s input that run before any engine or process group exists.

A wrong --config, --model, --data, --val-data, --val-share, --tokenizer or --resume is reported in a second,
not after the DeepSpeed engine is up (a model directory that is not a causal LM, a tokenizer
whose ids do not fit the model, a data file that cannot be read, a hub dataset that cannot be
reached included); an --out or cache directory that cannot be written is refused first, and a
non-empty --out unless --resume or --overwrite says what to do with it. Nothing here builds a
model or reads the corpus (a small single text file or set of instruction records excepted).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from es_llm.errors import InputError

if TYPE_CHECKING:
    from es_llm.model import ModelSpec
    from es_llm.sampling.config import EvolvedSamplingConfig

SMALL_TEXT = 1 << 20  # a single text file up to this size is split once here, as a check
SMALL_INSTRUCT = 8 << 20  # instruction files up to this size in all are read here, as a check
WRITE_CHECK_PREFIX = ".es-llm-write-check-"


def check_train_inputs(args: argparse.Namespace) -> EvolvedSamplingConfig:
    """Raise InputError for the first problem with the run's configs, data or checkpoint;
    return the run's ES config. With --no-progress, first silences the progress bars of the
    libraries (every rank runs this, before any of them loads a model or a dataset)."""
    from es_llm.data.documents import DEFAULT_VAL_SHARE, check_val_share
    from es_llm.drivers.deepspeed.dsconfig import es_config_for_run, load_ds_config
    from es_llm.model import resolve_model
    from es_llm.sampling.plan import plan_geometry

    if getattr(args, "no_progress", False):
        from es_llm.quiet import quiet_progress_bars

        quiet_progress_bars()
    check_output_dirs(args)

    ds_config = load_ds_config(args.config)
    es = es_config_for_run(
        ds_config,
        getattr(args, "method", None),
        dict(args.es),
        scorer=getattr(args, "scorer", None),
        proxy_model=getattr(args, "proxy_model", None),
    )
    # the run plan's first step (the rest needs the corpus, which is not read here)
    plan_geometry(ds_config, es, int(os.environ.get("WORLD_SIZE", "1")))
    model = resolve_model(args.model)
    check_val_share(getattr(args, "val_share", DEFAULT_VAL_SHARE))
    _check_data(args.data)
    _check_data(getattr(args, "val_data", None))
    _check_tokenizer(model, args)
    if es.proxy:
        _check_proxy(es.proxy_model, model, args)
    if getattr(args, "resume", None) is not None:
        from es_llm.drivers.deepspeed.checkpoint import preflight_resume

        resume = Path(args.resume)
        if not resume.is_dir():
            raise InputError(f"--resume {resume}: no such run directory")
        preflight_resume(resume)  # an intact tag: every file's size and sha256 (see there)
    return es


def _check_tokenizer(model: ModelSpec, args: argparse.Namespace) -> None:
    """The tokenizer loads, has an end-of-document token, and its ids fit the model."""
    from es_llm.data.tokenizer import load_tokenizer, token_id_bound
    from es_llm.model import check_fits, tokenizer_for

    if args.tokenizer is not None and not Path(args.tokenizer).expanduser().exists():
        raise InputError(f"--tokenizer {args.tokenizer}: no such file or directory")
    spec = tokenizer_for(args.model, args.tokenizer)
    for flag, path in (("--model", model.path), ("--tokenizer", spec)):
        if path is not None and getattr(args, "overwrite", False) and _inside(path, args.out):
            raise InputError(
                f"{flag} {path} is inside --out {args.out}, which --overwrite deletes: copy "
                f"it elsewhere first, or choose another --out"
            )
    if spec is None:
        return  # the corpus trains a BPE; a preset grows to it
    tok, _, _ = load_tokenizer(spec)
    check_fits(model, token_id_bound=token_id_bound(tok), seq_len=args.seq_len)


def _check_proxy(proxy_model: str | None, model: ModelSpec, args: argparse.Namespace) -> None:
    """scorer proxy: the proxy (a base: one by its preset) costs at most 1/5 of the learner,
    and a proxy directory's tokenizer is the learner's when the learner's is known here (a
    BPE the corpus trains is compared in the run's set-up)."""
    from es_llm.base_models import is_base_spec, parse_base_spec
    from es_llm.drivers.proxy import check_proxy_tokenizer, choose_proxy, spec_config
    from es_llm.model import tokenizer_for

    vocab = model.vocab_size or args.vocab_size
    learner = spec_config(model, vocab_size=vocab, seq_len=args.seq_len)
    base = proxy_model is not None and is_base_spec(proxy_model)
    path = parse_base_spec(proxy_model).preset if base else None
    choice = choose_proxy(
        proxy_model, learner, vocab_size=vocab, seq_len=args.seq_len, proxy_path=path
    )
    tok = tokenizer_for(args.model, args.tokenizer)
    if choice.spec.pretrained and tok is not None:
        from es_llm.data.tokenizer import resolve_tokenizer_file

        check_proxy_tokenizer(choice.name, choice.spec.path, resolve_tokenizer_file(tok)[0])


def _inside(path: str | Path, folder: str | Path) -> bool:
    here, there = Path(path).expanduser().resolve(), Path(folder).expanduser().resolve()
    return here == there or there in here.parents


def _check_data(data: str | None) -> None:
    from es_llm.data.sources import (
        STDLIB_NAMES,
        check_hub_dataset,
        local_files_checked,
        looks_like_path,
        sniff_local_files,
    )

    check_hub_dataset(data)  # no network and no cached copy: one line, in a few seconds
    if data is None or data in STDLIB_NAMES or not looks_like_path(data):
        return  # the standard library, a recipe, or a hub dataset loaded with the corpus
    # a missing path, no data files, or a file or folder that cannot be listed fails here
    path, files, stats = local_files_checked(data)
    sniff_local_files(files)  # a binary or unreadable file fails here
    if path.is_file() and path.suffix.lower() == ".txt" and stats[0][1] <= SMALL_TEXT:
        from es_llm.data.sources import read_local_file

        read_local_file(path, split_text=True)  # too little text to split fails here
    _check_instruct(data, sum(size for _, size, _ in stats))


def _check_instruct(data: str, size: int) -> None:
    """Small local instruction data is read here: a bad record (its form, a message role)
    and a set whose every completion is empty fail before any engine starts."""
    from es_llm.data.instruct import (
        InstructDataError,
        has_completion,
        is_instruct_data,
        local_instruct_source,
    )

    if size > SMALL_INSTRUCT or not is_instruct_data(data):
        return
    records = local_instruct_source(data).load()
    if records and not any(has_completion(r) for r in records):
        raise InstructDataError(
            f"data {data!r}: every one of its {len(records)} instruction records has an empty "
            "completion (no text but white space, or no assistant turn with text), so nothing "
            "can train; give records with completions"
        )


def check_output_dirs(args: argparse.Namespace) -> None:
    """--out (or --resume DIR) and the corpus cache can be written: each is created (or
    exists) and takes a file, tried for real (os.access says yes to root on a read-only
    mount, and no to nothing else): one line each, before any data is read. What is tried
    is removed again, so a run that fails later leaves no empty --out behind."""
    from es_llm.data.sources import CACHE_ENV, default_cache_dir

    resume = getattr(args, "resume", None)
    if resume is not None:
        check_writable_dir(Path(resume), f"--resume {resume}", "the run's folder must be writable")
    elif getattr(args, "out", None) is not None:
        check_writable_dir(Path(args.out), f"--out {args.out}", "choose a writable --out")
    hint = f"pass --cache-dir a writable folder (or set ${CACHE_ENV})"
    if getattr(args, "cache_dir", None):
        check_writable_dir(Path(args.cache_dir), f"--cache-dir {args.cache_dir}", hint)
    else:
        cache = default_cache_dir()
        env = os.environ.get(CACHE_ENV)
        what = f"the cache directory ${CACHE_ENV}" if env else "the default cache directory"
        check_writable_dir(cache, f"{what} {cache}", hint)


def check_writable_dir(path: Path, label: str, hint: str) -> None:
    """``path`` is a folder this process can write, or can be created: a temporary file is
    created in it, or, where it does not exist yet, a temporary folder (holding a file) in
    its nearest existing parent, where the run would create it. Both are removed again.
    Unique names keep ranks that check the same folder at once from meeting."""
    path = path.expanduser()
    base = path
    while not os.path.exists(base) and base != base.parent:
        base = base.parent
    if not base.is_dir():
        where = "it is a file" if base == path else f"{base} is a file"
        raise InputError(f"{label}: {where}, not a directory: {hint}")
    try:
        if base == path:
            fd, name = tempfile.mkstemp(prefix=WRITE_CHECK_PREFIX, dir=path)
            os.close(fd)
            os.unlink(name)
        else:
            folder = tempfile.mkdtemp(prefix=WRITE_CHECK_PREFIX, dir=base)
            try:
                fd, name = tempfile.mkstemp(dir=folder)
                os.close(fd)
                os.unlink(name)
            finally:
                shutil.rmtree(folder, ignore_errors=True)
    except OSError as e:
        what = "a file in it" if base == path else f"it in {base}"
        raise InputError(
            f"{label} is not writable: cannot create {what} ({e.strerror or e}): {hint}"
        ) from e


def _guarded(out: Path) -> bool:
    """Folders --overwrite must never clear: the working directory, home, or one above."""
    here = out.resolve()
    protected = [Path.cwd().resolve(), Path.home().resolve()]
    return any(here == p or here in p.parents for p in protected)


def prepare_out_dir(args: argparse.Namespace) -> None:
    """Refuse a non-empty --out, or clear it for --overwrite (rank 0 only); --resume keeps it."""
    if getattr(args, "resume", None) is not None:
        return
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file, not a directory: choose another --out")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not args.overwrite:
        raise InputError(
            f"--out {out} already holds a run's files: pass --overwrite to delete them first, "
            f"--resume {out} to continue that run, or choose another --out"
        )
    if _guarded(out):
        raise InputError(
            f"--overwrite would delete {out.resolve()}, which holds the working directory or "
            f"the home directory: choose a dedicated --out"
        )
    if os.environ.get("RANK", "0") != "0":
        return  # rank 0 clears it; the others must not race it
    for child in out.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def check_not_finished(args: argparse.Namespace) -> None:
    """`--resume DIR` of a run that finished every planned epoch is refused, before anything
    in DIR is touched: resuming it would train nothing and rewrite its summary from the last
    checkpoint (an earlier evaluation, the final one dropped)."""
    resume = getattr(args, "resume", None)
    if resume is None:
        return
    path = Path(resume) / "summary.json"
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError):
        return  # no summary yet (a killed run): the checkpoint decides
    if isinstance(summary, dict) and summary.get("finished") is True:
        raise InputError(
            f"--resume {resume}: that run is finished ({summary.get('steps')} steps, every "
            f"planned epoch; {path}) and was left unchanged; to train on, start a new run from "
            f"its model: --model {Path(resume) / 'model'}"
        )

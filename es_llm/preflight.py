"""Checks of `es-llm train`'s input that run before any engine or process group exists.

A wrong --config, --model, --data, --tokenizer or --resume is reported in a second, not after
the DeepSpeed engine is up (a model directory that is not a causal LM, a tokenizer whose ids do
not fit the model included); a non-empty --out is refused unless --resume or --overwrite says
what to do with it. Nothing here builds a model or reads the corpus.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from es_llm.errors import InputError

if TYPE_CHECKING:
    from es_llm.model import ModelSpec

SMALL_TEXT = 1 << 20  # a single text file up to this size is split once here, as a check


def check_train_inputs(args: argparse.Namespace) -> None:
    """Raise InputError for the first problem with the run's configs, data or checkpoint."""
    from es_llm.drivers.deepspeed.dsconfig import es_config_for_run, load_ds_config
    from es_llm.model import resolve_model
    from es_llm.sampling.plan import plan_geometry

    ds_config = load_ds_config(args.config)
    es = es_config_for_run(ds_config, getattr(args, "method", None), dict(args.es))
    # the run plan's first step (the rest needs the corpus, which is not read here)
    plan_geometry(ds_config, es, int(os.environ.get("WORLD_SIZE", "1")))
    model = resolve_model(args.model)
    _check_data(args.data)
    _check_tokenizer(model, args)
    if getattr(args, "resume", None) is not None:
        from es_llm.drivers.deepspeed.checkpoint import preflight_resume

        resume = Path(args.resume)
        if not resume.is_dir():
            raise InputError(f"--resume {resume}: no such run directory")
        preflight_resume(resume)  # an intact tag: every file's size and sha256 (see there)


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


def _inside(path: str | Path, folder: str | Path) -> bool:
    here, there = Path(path).expanduser().resolve(), Path(folder).expanduser().resolve()
    return here == there or there in here.parents


def _check_data(data: str | None) -> None:
    from es_llm.data.sources import STDLIB_NAMES, local_source, looks_like_path

    if data is None or data in STDLIB_NAMES or not looks_like_path(data):
        return  # the standard library, or a dataset name resolved when the corpus is built
    from es_llm.data.sources import local_files, sniff_local_files

    local_source(data)  # lists the files: a missing path or no data files fail here
    sniff_local_files(local_files(Path(data).expanduser()))  # a binary file fails here
    path = Path(data).expanduser()
    if path.is_file() and path.suffix.lower() == ".txt" and path.stat().st_size <= SMALL_TEXT:
        from es_llm.data.sources import read_local_file

        read_local_file(path, split_text=True)  # too little text to split fails here


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

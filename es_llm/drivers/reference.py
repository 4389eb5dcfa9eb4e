"""The reference model of method excess: trained once on a clean set, then one no-grad pass.

Why: ES on the excess loss ``l - l_ref`` (es_llm.sampling.methods.excess) needs, for every
training sample, the loss of a small model trained on clean text (RHO-LOSS). This module

1. picks the reference documents: the clean source minus every document that could leak into
   the run's validation set (its split group is a validation group under the corpus split
   rule at the run's --val-share, or its exact text is a validation document's text), counted;
2. trains the reference with the project's own loop (`ESRun`, method uniform) over the same
   process group, on those documents tokenized with the run's tokenizer, so its loss is
   measured on the very token rows being selected; or loads a pretrained Hugging Face
   model directory instead;
3. caches the trained model under ``CACHE/reference/``, keyed by what determines it (the
   reference source, what was excluded, the preset, the tokenizer, the DeepSpeed config,
   seq_len, seed and budget), so a second run reuses it;
4. runs one no-grad pass of it over this rank's training shard with the fused per-sample
   loss (`es_llm.drivers.scoring.scoring_losses`): ``l_ref`` as fp32, 4 bytes a sample.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from es_llm import dist
from es_llm.data.cache import cache_digest, file_lock, lock_path
from es_llm.data.documents import DEFAULT_VAL_SHARE, Document
from es_llm.data.sources import default_cache_dir, resolve_source
from es_llm.data.split import held_out, text_digest
from es_llm.drivers.deepspeed.export import MODEL_DIR
from es_llm.errors import InputError
from es_llm.model import (
    DEFAULT_MODEL_PRESET,
    ModelSpec,
    build_model,
    count_parameters,
    load_model,
    load_model_preset,
    resolve_model,
)

if TYPE_CHECKING:
    from torch import nn

    from es_llm.data.entry import Corpus
    from es_llm.drivers.deepspeed.loop import TrainOptions

__all__ = [
    "DEFAULT_REFERENCE_MODEL",
    "Reference",
    "ReferenceError",
    "ReferenceSpec",
    "disjoint_reference_documents",
    "excluded_fingerprint",
    "is_pretrained_dir",
    "prepare_reference",
    "reference_cache_key",
    "reference_losses",
    "validation_documents",
]

FORMAT_VERSION = 1  # bump when what a cache entry holds, or how it is trained, changes
DEFAULT_REFERENCE_MODEL = DEFAULT_MODEL_PRESET  # the smallest shipped preset
DEFAULT_REFERENCE_EPOCHS = 1


class ReferenceError(InputError):
    """The reference cannot be built from what was given; the message says what to change."""


@dataclass(frozen=True)
class ReferenceSpec:
    """What the user asked for: a clean source and a preset, or a pretrained model directory."""

    data: str | None = None  # --reference-data (any form --data takes)
    model: str = DEFAULT_REFERENCE_MODEL  # --reference-model: a preset, or an HF model dir
    steps: int | None = None  # --reference-steps
    epochs: int | None = None  # --reference-epochs (default 1 when neither is given)

    @property
    def pretrained(self) -> bool:
        return is_pretrained_dir(self.model)

    def budget(self) -> dict[str, int | None]:
        epochs = self.epochs
        if epochs is None:  # steps alone: as many epochs as steps always holds them
            epochs = DEFAULT_REFERENCE_EPOCHS if self.steps is None else self.steps
        return {"epochs": epochs, "steps": self.steps}

    def check(self) -> None:
        """A pretrained directory, or a clean source to train on: one of the two."""
        if self.pretrained:
            if self.data is not None:
                raise ReferenceError(
                    f"--reference-model {self.model!r} is a pretrained model directory: it is "
                    "not trained, so --reference-data has no use; give one of the two"
                )
            if self.steps is not None or self.epochs is not None:
                raise ReferenceError(
                    "--reference-steps/--reference-epochs train a preset reference; "
                    f"{self.model!r} is a pretrained model directory"
                )
        elif self.data is None:
            raise ReferenceError(
                "this method selects by the excess loss over a reference model: give a clean "
                "reference source with --reference-data (any form --data takes), or a "
                "pretrained Hugging Face model directory with --reference-model"
            )


@dataclass
class Reference:
    """A reference model ready for the pass, and what `summary.json` reports about it."""

    model: nn.Module
    info: dict[str, Any] = field(default_factory=dict)


def is_pretrained_dir(model: str) -> bool:
    """Whether `model` names a Hugging Face model directory (it holds a config.json)."""
    p = Path(model).expanduser()
    return p.is_dir() and (p / "config.json").is_file()


# ----------------------------------------------------------------------------- documents
def validation_documents(
    data: str | None,
    val_data: str | None,
    corpus_stats: dict[str, Any],
    val_share: float = DEFAULT_VAL_SHARE,
) -> list[Document]:
    """The run's validation documents, found by the rule its corpus was split with.

    With ``val_data``: that source's validation-group documents at ``val_share``. Otherwise
    ``data``'s: the validation-group documents, or the trailing ``val_documents`` under the
    tail fallback.
    """
    if val_data is not None:
        src = resolve_source(val_data, val_share=val_share)
        return [d for d in src.load() if held_out(d, val_share)]
    docs = resolve_source(data, val_share=val_share).load()
    if corpus_stats.get("split_rule") == "tail":
        n = int(corpus_stats["val_documents"])
        return docs[len(docs) - n :]
    return [d for d in docs if held_out(d, val_share)]


def disjoint_reference_documents(
    reference: list[Document], validation: list[Document], val_share: float = DEFAULT_VAL_SHARE
) -> tuple[list[Document], dict[str, int]]:
    """The reference documents that cannot leak into validation, and how many were dropped.

    A document is dropped when its split group (or key) is a validation group under the
    corpus split rule at ``val_share`` (the same source split the same way puts it on the
    validation side), or when its exact text is the text of a validation document (any
    source).
    """
    val_texts = {text_digest(d.text) for d in validation}
    kept: list[Document] = []
    counts = {"documents": len(reference), "dropped_val_group": 0, "dropped_val_text": 0}
    for d in reference:
        if held_out(d, val_share):
            counts["dropped_val_group"] += 1
        elif text_digest(d.text) in val_texts:
            counts["dropped_val_text"] += 1
        else:
            kept.append(d)
    counts["kept"] = len(kept)
    return kept, counts


def _write_jsonl_atomic(docs: list[Document], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for d in docs:
                f.write(json.dumps({"text": d.text}, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# ----------------------------------------------------------------------------- cache key


def excluded_fingerprint(opts: TrainOptions, corpus_stats: dict[str, Any]) -> dict[str, Any]:
    """What the reference's documents were kept clear of: the run's validation source, the
    rule its corpus was split with and, when it is not the default, the share held out (the
    default keeps the keys of references trained before --val-share existed)."""
    share = opts.val_share
    data = opts.val_data if opts.val_data is not None else opts.data
    return {
        "source": resolve_source(data, val_share=share).fingerprint,
        "split_rule": corpus_stats.get("split_rule"),
        "val_documents": corpus_stats.get("val_documents"),
        **({} if share == DEFAULT_VAL_SHARE else {"val_share": share}),
    }


def reference_cache_key(
    *,
    reference_fingerprint: dict[str, Any],
    excluded_fingerprint: dict[str, Any],
    preset: dict[str, Any],
    tokenizer_sha256: str,
    seq_len: int,
    seed: int,
    budget: dict[str, int | None],
    ds_config: dict[str, Any],
) -> str:
    """16 hex digits naming a trained reference: equal inputs, equal model, the same entry."""
    return cache_digest(
        {
            "v": FORMAT_VERSION,
            "reference": reference_fingerprint,
            "excluded": excluded_fingerprint,
            "preset": preset,
            "tokenizer": tokenizer_sha256,
            "seq_len": seq_len,
            "seed": seed,
            "budget": budget,
            "ds_config": ds_config,
        }
    )[:16]


def _file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def reference_ds_config(ds_config: dict[str, Any]) -> dict[str, Any]:
    """The run's DeepSpeed config for the reference: uniform, and whole parameters on every
    rank (ZeRO-3 becomes 2), so the trained module can be saved and scored as it is."""
    out = copy.deepcopy(ds_config)
    out.pop("evolved_sampling", None)
    zero = out.get("zero_optimization")
    if isinstance(zero, dict) and int(zero.get("stage", 0)) > 2:
        zero["stage"] = 2
    return out


# ----------------------------------------------------------------------------- models
def _load_pretrained(path: str | Path, corpus: Corpus) -> nn.Module:
    """A saved or user-given reference, checked against the run's tokenizer and seq_len."""
    spec = resolve_model(str(path))
    return load_model(spec, vocab_size=corpus.vocab_size, seq_len=corpus.seq_len)


def _param_count(spec: ModelSpec, corpus: Corpus) -> int:
    """Parameters of the model `spec` names at this run's vocabulary, built on no device."""
    if spec.preset is not None:
        kw = {"vocab_size": corpus.vocab_size, "seq_len": corpus.seq_len, "device": "meta"}
        return count_parameters(build_model(spec.preset, **kw))
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        config = AutoConfig.from_pretrained(spec.path, trust_remote_code=False)
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    return count_parameters(model)


def _check_size(reference: str, main: str, corpus: Corpus) -> None:
    """The reference model must not be larger than the trained model (parameter count)."""
    ref_n = _param_count(resolve_model(reference), corpus)
    main_n = _param_count(resolve_model(main), corpus)
    if ref_n > main_n:
        raise ReferenceError(
            f"the reference model has {ref_n} parameters, more than the trained model's "
            f"{main_n}: pick a smaller --reference-model (default {DEFAULT_REFERENCE_MODEL})"
        )


@contextlib.contextmanager
def _own_rng_and_traffic(device: torch.device) -> Iterator[None]:
    """Leave the run's RNG streams and collective counters as they were: the main model's
    initialisation and traffic report do not depend on whether the reference was cached."""
    saved = dict(dist.traffic)
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        yield
    dist.traffic.update(saved)


def _train(
    spec: ReferenceSpec,
    entry: Path,
    docs_path: Path,
    ds_path: Path,
    opts: TrainOptions,
    tokenizer: str,
    seq_len: int,
) -> dict[str, Any]:
    """Train the reference with the project's loop on every rank (it exports the model)."""
    from es_llm.drivers.deepspeed.loop import ESRun, TrainOptions

    budget = spec.budget()
    ref_opts = TrainOptions(
        out=entry / "run",
        config=str(ds_path),
        model=spec.model,
        data=str(docs_path),
        tokenizer=tokenizer,
        cache_dir=opts.cache_dir,
        method="uniform",
        epochs=int(budget["epochs"] or 1),
        max_steps=budget["steps"],
        seed=opts.seed,
        seq_len=seq_len,
        max_val_samples=opts.max_val_samples,  # its own held-out rows: as many as the run's
        # its curve is not used: evaluate at the start, epoch ends and the end only (10
        # interval points cost ~14 s of a 32-step CPU reference's 60 s on 2026-12-03)
        eval_points=0,
        progress=opts.progress,
    )
    run = ESRun(ref_opts)
    run.setup()
    summary = run.run()  # leaves the trained model in entry/run/model (export_model)
    return {
        "steps": summary["steps"],
        "train_sequences": summary["train_samples"],
        "val_loss": summary["final_val_loss"],
        "train_wall_clock_s": summary["wall_clock_s"],
    }


def _build(
    spec: ReferenceSpec,
    entry: Path,
    key: str,
    opts: TrainOptions,
    corpus: Corpus,
    ds_config: dict[str, Any],
    ref_src: Any,
    device: torch.device,
    t0: float,
    c0: float,
) -> None:
    """Pick the documents (rank 0), train on every rank, write the entry (rank 0)."""
    docs_path, ds_path = entry / "documents.jsonl", entry / "ds_config.json"
    counts: dict[str, int] = {}
    if dist.rank() == 0:
        val_docs = validation_documents(opts.data, opts.val_data, corpus.stats, opts.val_share)
        kept, counts = disjoint_reference_documents(ref_src.load(), val_docs, opts.val_share)
        if kept:
            _write_jsonl_atomic(kept, docs_path)
            ds_path.write_text(json.dumps(reference_ds_config(ds_config), indent=2))
    # every rank learns whether rank 0 found documents to train on (no rank left waiting)
    if dist.all_reduce_min_int(0 if dist.rank() == 0 and not counts["kept"] else 1) == 0:
        raise ReferenceError(
            f"reference data {spec.data!r}: every one of its documents is a validation "
            "document of this run (same split group or same text); use a separate clean "
            "source"
        )
    tokenizer = str(corpus.tokenizer_path)
    with _own_rng_and_traffic(device):
        trained = _train(spec, entry, docs_path, ds_path, opts, tokenizer, corpus.seq_len)
    if dist.rank() == 0:
        meta = {
            "format_version": FORMAT_VERSION,
            "key": key,
            "model": spec.model,
            "data": spec.data,
            "budget": spec.budget(),
            "disjoint": counts,
            "train_s": time.perf_counter() - t0,
            "train_cpu_s": time.process_time() - c0,  # rank 0's process CPU time
            **trained,
        }
        tmp = entry / "meta.json.tmp"
        tmp.write_text(json.dumps(meta, indent=2))
        os.replace(tmp, entry / "meta.json")  # last: an entry with meta.json is whole
    dist.barrier()


def prepare_reference(
    spec: ReferenceSpec,
    *,
    opts: TrainOptions,
    corpus: Corpus,
    ds_config: dict[str, Any],
    device: torch.device,
) -> Reference:
    """The reference model on `device` (eval mode, no grad), trained or loaded from the cache.

    A collective: every rank calls it. ``info["train_s"]`` is the wall-clock of training the
    reference (corpus build, training, its evaluations), also when the entry was cached (the
    cost of the reference, paid once); ``info["cached"]`` says whether this run reused it.
    """
    spec.check()
    t0, c0 = time.perf_counter(), time.process_time()
    if spec.pretrained:
        _check_size(spec.model, opts.model, corpus)
        model = _load_pretrained(spec.model, corpus)
        info: dict[str, Any] = {
            "model": str(Path(spec.model).expanduser().resolve()),
            "pretrained": True,
            "data": None,
            "cached": False,
            "train_s": 0.0,
            "train_cpu_s": 0.0,
            "load_s": time.perf_counter() - t0,
        }
        return Reference(model.to(device).eval().requires_grad_(False), info)

    preset = load_model_preset(spec.model)
    _check_size(spec.model, opts.model, corpus)
    if corpus.tokenizer_path is None:
        raise RuntimeError("the corpus has no tokenizer file for the reference to use")
    ref_src = resolve_source(spec.data, val_share=opts.val_share)
    key = reference_cache_key(
        reference_fingerprint=ref_src.fingerprint,
        excluded_fingerprint=excluded_fingerprint(opts, corpus.stats),
        preset=preset,
        tokenizer_sha256=_file_sha256(corpus.tokenizer_path),
        seq_len=corpus.seq_len,
        seed=opts.seed,
        budget=spec.budget(),
        ds_config=reference_ds_config(ds_config),
    )
    cache = Path(opts.cache_dir).expanduser() if opts.cache_dir else default_cache_dir()
    entry = cache / "reference" / f"{ref_src.name}-{key}"
    meta_path = entry / "meta.json"
    lock = file_lock(lock_path(cache, f"reference-{key}"))
    with lock if dist.rank() == 0 else contextlib.nullcontext():
        # rank 0 holds the entry's lock from here to the end of the build (another run with
        # the same reference waits, then finds it built); its ranks follow its answer
        cached = dist.all_reduce_min_int(int(meta_path.is_file())) == 1
        if not cached:
            _build(spec, entry, key, opts, corpus, ds_config, ref_src, device, t0, c0)
    meta = json.loads(meta_path.read_text())
    model = _load_pretrained(entry / "run" / MODEL_DIR, corpus)
    info = {
        "model": spec.model,
        "pretrained": False,
        "data": spec.data,
        "cached": cached,
        "cache_entry": str(entry),
        "train_s": float(meta["train_s"]),
        "train_cpu_s": float(meta["train_cpu_s"]),
        "steps": meta["steps"],
        "val_loss": meta["val_loss"],
        "disjoint": meta["disjoint"],
    }
    return Reference(model.to(device).eval().requires_grad_(False), info)


# ----------------------------------------------------------------------------- the pass
def reference_losses(
    model: nn.Module,
    dataset: Any,
    *,
    lo: int,
    hi: int,
    micro_batch: int,
    device: torch.device,
    ignore_index: int = -100,
) -> torch.Tensor:
    """fp32 [hi - lo] on `device`: the reference's mean loss of training rows lo..hi-1 (the
    global ids of this rank's shard), NaN for a row without label tokens. No grad.

    Rows with a ``labels`` column (instruction data) are scored on their label tokens only,
    the tokens the trained model's loss and the selection's ``l`` count."""
    from es_llm.drivers.scoring import scoring_losses

    if not 0 <= lo <= hi <= len(dataset):
        raise ValueError(f"rows [{lo}, {hi}) are outside the dataset of {len(dataset)}")
    columns = [c for c in ("input_ids", "labels") if c in dataset.column_names]
    rows = dataset.with_format("numpy", columns=columns)
    out = torch.empty(hi - lo, dtype=torch.float32, device=device)
    was_training = model.training
    model.eval()
    try:
        for i in range(lo, hi, micro_batch):
            j = min(hi, i + micro_batch)
            chunk = rows[i:j]
            batch = np.asarray(chunk["input_ids"], dtype=np.int64)
            tokens = torch.from_numpy(batch).to(device, non_blocking=True)
            labels = None
            if "labels" in columns:
                labels = np.asarray(chunk["labels"], dtype=np.int64)
                labels = torch.from_numpy(labels).to(device, non_blocking=True)
            s, c = scoring_losses(model, tokens, ignore_index=ignore_index, labels=labels)
            loss = s.float() / c.float().clamp(min=1)
            out[i - lo : j - lo] = torch.where(c > 0, loss, torch.full_like(loss, float("nan")))
    finally:
        model.train(was_training)
    return out


def spec_from_options(opts: TrainOptions) -> ReferenceSpec:
    """The reference a run's flags ask for (`--reference-*`)."""
    return ReferenceSpec(
        data=opts.reference_data,
        model=opts.reference_model,
        steps=opts.reference_steps,
        epochs=opts.reference_epochs,
    )


def reference_for_run(
    opts: TrainOptions,
    corpus: Corpus,
    ds_config: dict[str, Any],
    *,
    lo: int,
    hi: int,
    micro_batch: int,
    device: torch.device,
    ignore_index: int = -100,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """(l_ref of this rank's training rows lo..hi-1, fp32 on `device`; the summary's report).

    A collective. The report holds ``train_s`` (training the reference, or 0 for a pretrained
    one), ``pass_s`` (the slowest rank's pass) and ``cached``; the model is freed after the pass.
    """
    spec = spec_from_options(opts)
    ref = prepare_reference(spec, opts=opts, corpus=corpus, ds_config=ds_config, device=device)
    dist.barrier()
    t0, c0 = time.perf_counter(), time.process_time()
    losses = reference_losses(
        ref.model,
        corpus.train,
        lo=lo,
        hi=hi,
        micro_batch=micro_batch,
        device=device,
        ignore_index=ignore_index,
    )
    finite = torch.isfinite(losses)
    kept = torch.where(finite, losses, torch.zeros_like(losses))
    stats = torch.stack([kept.double().sum(), finite.double().sum()]).tolist()
    pass_cpu_s = time.process_time() - c0
    dist.barrier()
    pass_s = time.perf_counter() - t0
    total, count = dist.all_reduce_sum([stats[0], stats[1]])
    info = dict(ref.info)
    info["pass_s"] = pass_s
    info["pass_cpu_s"] = pass_cpu_s
    info["train_rows_mean_loss"] = total / count if count > 0 else float("nan")
    del ref
    return losses, info

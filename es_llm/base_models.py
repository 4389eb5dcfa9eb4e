"""Pre-trained bases for the post-training regime, cached like the corpus: ``--model base:...``.

``base:PRESET[,steps=N]`` names a model pre-trained from the preset on the embedded stdlib
corpus (no download) with plain uniform DeepSpeed training: the run's ``--config`` (its ES
section ignored), ``--seq-len``, ``--vocab-size`` (a BPE trained on the stdlib, saved with the
model) and ``--seed``, for N optimizer steps (default ``DEFAULT_STEPS``). The first run that
names it pre-trains it once, as a child ``es-llm train`` (one process), and keeps the
exported Hugging Face directory (``OUT/model``) in ``CACHE/base-models/<key>/``; every later
run with the same key (source, preset, tokenizer, seq_len, seed, steps, config) reuses it.
``--model base:...`` is then replaced by that directory, so the run fine-tunes it with its
own tokenizer, as ``--model DIR`` does.

The base pre-trains on the train side of the stdlib split at the run's ``--val-share``: the
stdlib's files and ``instruct:stdlib-functions``'s records share their split groups (the file),
so no file the fine-tuning validates on was pre-trained on. A share other than the default is
part of the key (the default keeps the keys of bases built before --val-share existed).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from es_llm.data.documents import DEFAULT_VAL_SHARE, check_val_share
from es_llm.errors import InputError

BASE_PREFIX = "base:"
BASE_SOURCE = "stdlib"
DEFAULT_STEPS = 2000
BASE_VAL_SAMPLES = 256  # the pre-training run validates on the first held-out rows only
PRETRAIN_SUMMARY = "pretrain_summary.json"  # the base's pre-training summary.json, kept beside
BASE_VERSION = 1  # bump when what a base holds changes
# Launcher variables a rank process has: the child pre-training run is a job of its own.
LAUNCH_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
              "MASTER_PORT", "GROUP_RANK", "ROLE_RANK", "CROSS_RANK", "CROSS_SIZE",
              "TORCHELASTIC_RUN_ID")  # fmt: skip


class BaseModelError(InputError):
    """A ``base:`` spec that cannot be read, or a pre-training run that did not finish."""


@dataclass(frozen=True)
class BaseSpec:
    preset: str
    steps: int = DEFAULT_STEPS


def is_base_spec(model: str | None) -> bool:
    return isinstance(model, str) and model.strip().lower().startswith(BASE_PREFIX)


def parse_base_spec(text: str) -> BaseSpec:
    body = text.strip()[len(BASE_PREFIX) :]
    preset, *items = [p.strip() for p in body.split(",")]
    grammar = f"--model {BASE_PREFIX}PRESET[,steps=N], e.g. {BASE_PREFIX}gpt2-tiny,steps=500"
    if not preset:
        raise BaseModelError(f"{text!r} names no preset; expected {grammar}")
    steps = DEFAULT_STEPS
    for item in items:
        key, _, value = item.partition("=")
        if key.strip() != "steps" or not value.strip().isdigit() or int(value) < 1:
            raise BaseModelError(f"{text!r}: cannot read {item!r}; expected {grammar}")
        steps = int(value)
    return BaseSpec(preset, steps)


def base_key(
    spec: BaseSpec,
    *,
    config: str,
    seq_len: int,
    vocab_size: int,
    seed: int,
    val_share: float = DEFAULT_VAL_SHARE,
) -> dict:
    """Everything the base's weights depend on (its cache key is a digest of this)."""
    from es_llm.data.sources import resolve_source
    from es_llm.drivers.deepspeed.dsconfig import load_ds_config
    from es_llm.model import load_model_preset

    return {
        "v": BASE_VERSION,
        "source": resolve_source(BASE_SOURCE).fingerprint,
        "preset": load_model_preset(spec.preset),
        "tokenizer": {"trained_bpe": vocab_size},
        "seq_len": seq_len,
        "seed": seed,
        "steps": spec.steps,
        "config": load_ds_config(config),
        "val_samples": BASE_VAL_SAMPLES,
        **({} if val_share == DEFAULT_VAL_SHARE else {"val_share": val_share}),
    }


def _child_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV}


def _pretrain(spec: BaseSpec, out: Path, cache: Path, *, config: str, seq_len: int,
              vocab_size: int, seed: int, val_share: float) -> None:  # fmt: skip
    cmd = [
        sys.executable, "-m", "es_llm.cli", "train",
        "--config", config, "--method", "uniform", "--model", spec.preset,
        "--data", BASE_SOURCE, "--seq-len", str(seq_len), "--vocab-size", str(vocab_size),
        "--seed", str(seed), "--max-steps", str(spec.steps), "--epochs", "1000",
        "--max-val-samples", str(BASE_VAL_SAMPLES), "--val-share", repr(val_share),
        "--cache-dir", str(cache), "--out", str(out), "--no-progress",
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=_child_env(), capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise BaseModelError(
            f"pre-training the base {spec.preset} ({spec.steps} steps) failed with exit "
            f"{proc.returncode}: {tail}; its output is in {out}"
        )
    if not (out / "model" / "config.json").is_file():
        raise RuntimeError(f"the pre-training run finished but left no {out / 'model'}")


def ensure_base_model(
    text: str,
    *,
    config: str,
    seq_len: int,
    vocab_size: int,
    seed: int,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    val_share: float = DEFAULT_VAL_SHARE,
) -> Path:
    """The cached base's Hugging Face directory, pre-training it first when it is missing.

    Safe from many ranks at once: one builds (under the entry's lock), the others wait.
    """
    from es_llm.data.cache import build_once, cache_digest, lock_path
    from es_llm.data.sources import default_cache_dir

    spec = parse_base_spec(text)
    val_share = check_val_share(val_share)  # a bad --val-share: one line, before pre-training
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    key = base_key(spec, config=config, seq_len=seq_len, vocab_size=vocab_size, seed=seed,
                   val_share=val_share)  # fmt: skip
    digest = cache_digest(key)[:16]
    name = f"{BASE_SOURCE}-{Path(spec.preset).stem}-T{seq_len}-s{spec.steps}-{digest}"
    entry = cache / "base-models" / name

    def announce() -> None:
        if progress:
            print(
                f"es-llm: pre-training the base {spec.preset} on {BASE_SOURCE} once "
                f"({spec.steps} steps) -> {entry}",
                file=sys.stderr,
                flush=True,
            )

    def pretrain(tmp: Path) -> Path:
        _pretrain(spec, tmp / "run", cache, config=config, seq_len=seq_len,
                  vocab_size=vocab_size, seed=seed, val_share=val_share)  # fmt: skip
        model = tmp / "run" / "model"
        shutil.copyfile(tmp / "run" / "summary.json", model / PRETRAIN_SUMMARY)
        (model / "base_key.json").write_text(json.dumps(key, indent=1, default=str))
        return model

    lock = lock_path(cache, f"base-{digest}")
    build_once(entry, marker="config.json", lock=lock, build=pretrain, announce=announce)
    return entry


def base_for_run(text: str, run, *, progress: bool) -> Path:
    """`ensure_base_model` for a run's settings: ``run`` is parsed flags or `TrainOptions`
    (its config, seq_len, vocab_size, seed, cache_dir and val_share key the base)."""
    return ensure_base_model(
        text,
        config=run.config,
        seq_len=run.seq_len,
        vocab_size=run.vocab_size,
        seed=run.seed,
        cache_dir=run.cache_dir,
        progress=progress,
        val_share=getattr(run, "val_share", DEFAULT_VAL_SHARE),
    )


def resolve_model_arg(args) -> None:
    """Replace ``args.model`` ``base:...`` by the cached base's directory (built once), and
    default ``args.tokenizer`` to that directory's tokenizer. Other ``--model`` values stay."""
    if not is_base_spec(getattr(args, "model", None)):
        return
    entry = base_for_run(args.model, args, progress=not getattr(args, "no_progress", False))
    args.model = str(entry)
    if args.tokenizer is None:
        args.tokenizer = str(entry)

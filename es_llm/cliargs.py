"""Command-line pieces shared by `es-llm train` (`es_llm.cli`) and `es-llm compare`.

Why a module of its own: both commands take the same run flags and build the same
`TrainOptions` from them. Keeping the flags, their value parsers and the one
flags -> options function here lets `es_llm.cli` and `es_llm.tools.compare` import them without
importing each other.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from es_llm.sampling.config import METHODS, SCORERS

if TYPE_CHECKING:  # the training loop imports torch and deepspeed: only when options are built
    from es_llm.drivers.deepspeed.loop import TrainOptions

__all__ = [
    "add_reference_arguments",
    "add_run_arguments",
    "options_from_args",
    "parse_key_value",
    "parse_method_list",
    "positive_int",
    "share_value",
]


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        v = int(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from e
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def share_value(text: str) -> float | str:
    """argparse type of --val-share: the number, or the text itself when it is none, so the
    range check (``documents.check_val_share``, before the data loads) says what is wrong in
    one line instead of argparse's usage block."""
    try:
        return float(text)
    except ValueError:
        return text


def parse_key_value(text: str) -> tuple[str, Any]:
    """`KEY=VALUE` -> (KEY, VALUE): the value read as JSON, else kept as the raw string.

    The one parser of ES overrides: `--es` and each item of compare's `--variant`.
    """
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip(), value


def parse_method_list(text: str) -> list[str]:
    """`uniform,es,prune` -> the names, each checked against `config.METHODS`, none twice."""
    names = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in names if m not in METHODS]
    if bad or not names:
        raise argparse.ArgumentTypeError(
            f"unknown method(s) {', '.join(bad) or repr(text)}; choose from {', '.join(METHODS)}"
        )
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"a method is listed twice: {text!r}")
    return names


def add_run_arguments(p: argparse.ArgumentParser, *, with_method: bool = True) -> None:
    """Flags shared by `train` and `compare`."""
    if with_method:
        p.add_argument(
            "--method",
            choices=METHODS,
            default=None,
            help=f"sampling method, one of {', '.join(METHODS)}; overrides "
            "evolved_sampling.method of the DeepSpeed config. Default: the config's method, or "
            "plain uniform training when the config has no evolved_sampling section",
        )
        p.add_argument(
            "--scorer",
            choices=SCORERS,
            default=None,
            help="what supplies the losses a selection step weighs: 'learner' (a no-grad "
            "forward of the meta-batch), 'stale' (no forward: each sample's stored score "
            "and last training loss), or 'proxy' (a small model's no-grad forward; it learns "
            "online from the trained samples; docs/algorithm.md); overrides "
            "evolved_sampling.scorer. Default: the config's scorer, else learner",
        )
        p.add_argument(
            "--proxy-model",
            default=None,
            help="the proxy scorer's model (with --scorer proxy): a preset, base:PRESET[,steps=N] "
            "(pre-trained once and cached), or a local Hugging Face directory with the "
            "learner's tokenizer; at most 1/5 of the learner's FLOPs per token. Overrides "
            "evolved_sampling.proxy_model. Default: the config's, else the largest of "
            "gpt2-tiny, gpt2-nano within 1/5 of the learner",
        )
    p.add_argument(
        "--config",
        default="cpu_tiny",
        help="DeepSpeed JSON config (a path, or a name in es_llm/configs/ds/). Its 'evolved_sampling' "
        "section configures ES (default: %(default)s)",
    )
    p.add_argument(
        "--model",
        default="gpt2-tiny",
        help="model preset (a JSON path, or a name in es_llm/configs/models/), started from random "
        "weights, or a local Hugging Face model directory (any causal LM "
        "AutoModelForCausalLM loads), started from its weights with its own tokenizer; see "
        "docs/models.md; or 'base:PRESET[,steps=N]': that preset pre-trained once on the "
        "stdlib (plain training, this run's config, seq-len, vocab-size and seed) and cached, "
        "to fine-tune; see docs/finetuning.md (default: %(default)s)",
    )
    p.add_argument(
        "--data",
        default=None,
        help="training data: 'stdlib' (default: the Python standard library sources of this "
        "interpreter, no download), a local .txt/.jsonl/.json/.parquet file or directory, or a "
        "Hugging Face hub dataset 'name' or 'name:config', or a data recipe such as "
        "'recipe:code=1,junk=0.3' (embedded mixtures; see docs/regimes.md). Instruction data "
        "(one record per sample, loss on the completion only; see docs/finetuning.md): files "
        "of prompt/completion or messages records, or 'instruct:stdlib-functions' (embedded)",
    )
    p.add_argument(
        "--val-data",
        default=None,
        help="validate on this separate source (same forms as --data), e.g. 'recipe:code=1' "
        "while --data has junk; its held-out documents only, never a training document "
        "(default: hold out part of --data)",
    )
    p.add_argument(
        "--val-share",
        type=share_value,
        default=0.05,
        metavar="FRACTION",
        help="share of the data held out for validation, in (0, 0.5], by split group "
        "(a file, a record's group): 0.05 is the original rule and keeps every cache; a larger "
        "share holds out a superset of a smaller one's groups; with --val-data, training "
        "uses --data's train side and validation --val-data's held-out side, both at this "
        "share; see docs/usage.md (default: %(default)s)",
    )
    p.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer.json or local Hugging Face tokenizer directory; its token ids must "
        "fit the model (default: a --model directory's own tokenizer, else a byte-level BPE "
        "trained on the training data, cached)",
    )
    p.add_argument(
        "--cache-dir",
        default=None,
        help="where tokenizers and packed datasets are cached (default: $ES_LLM_CACHE or "
        "~/.cache/es_llm)",
    )
    p.add_argument("--epochs", type=positive_int, default=2, help="epochs (default: %(default)s)")
    p.add_argument(
        "--max-steps",
        type=positive_int,
        default=None,
        help="stop after this many optimizer steps (default: run all epochs)",
    )
    p.add_argument("--seed", type=int, default=0, help="run seed (default: %(default)s)")
    p.add_argument(
        "--seq-len",
        type=positive_int,
        default=128,
        help="tokens per sequence (default: %(default)s)",
    )
    p.add_argument(
        "--vocab-size",
        type=positive_int,
        default=4096,
        help="vocabulary of the trained BPE tokenizer (default: %(default)s)",
    )
    p.add_argument(
        "--max-train-samples",
        type=positive_int,
        default=None,
        help="use only the first N training sequences (default: all)",
    )
    p.add_argument(
        "--max-val-samples",
        type=positive_int,
        default=None,
        help="use only the first N validation sequences (default: all)",
    )
    p.add_argument(
        "--es",
        action="append",
        type=parse_key_value,
        default=[],
        metavar="KEY=VALUE",
        help="override one field of the evolved_sampling section, e.g. --es selection_ratio=0.75 "
        "(repeatable; values are JSON)",
    )
    add_reference_arguments(p)
    p.add_argument(
        "--no-progress", action="store_true", help="no progress bar (logs stay clean in CI)"
    )


def add_reference_arguments(p: argparse.ArgumentParser) -> None:
    """The reference model of the methods that select by the excess loss (excess*)."""
    g = p.add_argument_group(
        "reference model (methods excess, excess_prune; other methods ignore these flags)"
    )
    g.add_argument(
        "--reference-data",
        default=None,
        help="clean source the reference model is trained on (any form --data takes), e.g. "
        "'recipe:code=1'; its documents in a validation group or with a validation text "
        "are dropped. The trained reference is cached",
    )
    g.add_argument(
        "--reference-model",
        default="gpt2-tiny",
        help="reference model preset, no larger than --model, trained on --reference-data; "
        "or a pretrained Hugging Face model directory using the run's tokenizer (then no "
        "--reference-data) (default: %(default)s)",
    )
    g.add_argument(
        "--reference-steps",
        type=positive_int,
        default=None,
        help="train the reference for at most this many optimizer steps",
    )
    g.add_argument(
        "--reference-epochs",
        type=positive_int,
        default=None,
        help="train the reference for this many epochs (default: 1 unless --reference-steps)",
    )


def options_from_args(args: argparse.Namespace, **changes: Any) -> TrainOptions:
    """The one place a `TrainOptions` is built from parsed flags (`train`, compare's runs).

    A flag whose dest is an option's field name fills that field (so a new option needs only
    its flag); four differ: `--out`/`--resume DIR` give `out` and `resume`, `--es` gives
    `es_overrides`, `--no-progress` gives `progress`. Fields without a flag in this command
    (compare has no --method or --save-every) keep their defaults, and `changes` replaces
    fields last, e.g. compare's per-run method, output directory and budgets.
    """
    from es_llm.drivers.deepspeed.loop import TrainOptions

    given = vars(args)
    values = {f.name: given[f.name] for f in dataclasses.fields(TrainOptions) if f.name in given}
    resume = given.get("resume")
    values["out"] = Path(resume or given["out"])
    values["resume"] = resume is not None
    values["es_overrides"] = dict(given.get("es") or [])
    values["progress"] = not given.get("no_progress", False)
    values.update(changes)
    return TrainOptions(**values)


ENGINES = ("deepspeed", "megatron")


def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    """`train`'s engine and, for Megatron-core, its parallel sizes (docs/megatron.md)."""
    g = p.add_argument_group("engine (the Megatron-core driver: docs/megatron.md)")
    g.add_argument(
        "--engine",
        choices=ENGINES,
        default="deepspeed",
        help="the training engine: deepspeed, or megatron (Megatron-core's GPTModel, DDP and "
        "optimizer; needs the 'megatron' extra; launch several ranks with `torchrun "
        "--nproc_per_node N -m es_llm.cli train --engine megatron ...`) (default: %(default)s)",
    )
    g.add_argument(
        "--tensor-parallel-size",
        type=positive_int,
        default=None,
        metavar="TP",
        help="--engine megatron: ranks that split each layer (default: the config's "
        "megatron.tensor_parallel_size, else 1); the batch splits over world / TP ranks",
    )
    g.add_argument(
        "--pipeline-parallel-size",
        type=positive_int,
        default=None,
        metavar="PP",
        help="--engine megatron: pipeline stages; only 1 is supported (default: the config's "
        "megatron.pipeline_parallel_size, else 1)",
    )

"""`es-llm compare`: its flags, and one comparison from plan to report.

The run flags are `train`'s own (`es_llm.cliargs`); the options of every run are built once
from them and changed per run (method, length, budget, directory).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Any

from es_llm.cliargs import (
    add_run_arguments,
    options_from_args,
    parse_key_value,
    parse_method_list,
    positive_int,
)
from es_llm.sampling.config import METHODS
from es_llm.tools.compare.metrics import (
    MATCHED,
    TARGET_LOSS_SLACK,
    TARGET_SPEEDUP,
    comparison_methods,
    grid_summary,
)
from es_llm.tools.compare.planning import (
    EVALS_PER_RUN,
    Variant,
    match_reference,
    matched_spec,
    plan_runs,
    variants,
)

__all__ = [
    "DEFAULT_METHODS",
    "add_parser",
    "compare_once",
    "parse_grid",
    "parse_variant",
    "run_from_args",
]

# The paper's methods and the baseline, uniform first (it sets the target). Every name in
# config.METHODS is accepted; these run when --methods is not given.
DEFAULT_METHODS = ("uniform", "es", "eswp", "prune")


def parse_variant(text: str) -> Variant:
    """`NAME:METHOD[:KEY=VALUE,KEY=VALUE]`, e.g. `es-r875:es:selection_ratio=0.875,tau=0.5`."""
    parts = text.split(":", 2)
    if len(parts) < 2 or not parts[0] or parts[1] not in METHODS:
        raise argparse.ArgumentTypeError(
            f"--variant expects NAME:METHOD[:KEY=VALUE,...] with METHOD in {', '.join(METHODS)}, "
            f"got {text!r}"
        )
    if parts[0] in (MATCHED, *METHODS):
        raise argparse.ArgumentTypeError(f"--variant name {parts[0]!r} is taken by a method")
    items = parts[2].split(",") if len(parts) == 3 and parts[2] else []
    overrides = dict(parse_key_value(item) for item in items)
    return Variant(parts[0], parts[1], overrides)


def parse_grid(text: str) -> list[int]:
    """`1,3,16` -> the epoch budgets of --epochs-grid."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(
            f"--epochs-grid expects integers like 1,3,16: {text!r}"
        ) from e
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"--epochs-grid expects positive integers: {text!r}")
    return values


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "compare",
        help="run uniform, ES, ESWP, prune, ... side by side and compare time to uniform's loss",
        description="Train every method on the same data, model, seed and epoch budget, one "
        "after another (plus 'uniform-matched': uniform given the reference method's training "
        "time), and write DIR/compare.json, DIR/compare.md and DIR/compare.png. Each run's own "
        "output lies in DIR/<name>/.",
    )
    add_run_arguments(p, with_method=False)
    p.set_defaults(max_val_samples=128)
    p.add_argument(
        "--methods",
        type=parse_method_list,
        default=list(DEFAULT_METHODS),
        help=f"comma-separated, from {', '.join(METHODS)} (default: "
        f"{','.join(DEFAULT_METHODS)}; uniform always runs: it sets the target)",
    )
    p.add_argument(
        "--variant",
        type=parse_variant,
        action="append",
        default=[],
        metavar="NAME:METHOD[:KEY=VALUE,...]",
        help="an extra run with its own ES overrides, e.g. es-r875:es:selection_ratio=0.875 "
        "(repeatable)",
    )
    p.add_argument("--out", default="runs/compare", help="output directory (default: %(default)s)")
    p.add_argument(
        "--world-size",
        type=positive_int,
        default=1,
        help="data-parallel ranks per run; >1 runs each method through the deepspeed launcher "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--eval-every",
        type=positive_int,
        default=None,
        help=f"evaluate every N steps (default: about {EVALS_PER_RUN} evaluations per run)",
    )
    p.add_argument(
        "--epochs-grid",
        type=parse_grid,
        default=None,
        help="run the whole comparison at each of these epoch budgets, e.g. 1,3,16 "
        "(DIR/epochs_<E>/, DIR/grid.json); overrides --epochs",
    )
    p.add_argument(
        "--match",
        default=None,
        help="the run whose training time uniform-matched gets (default: es, else the first "
        "non-uniform run)",
    )
    p.add_argument(
        "--match-clock",
        choices=["wall", "cpu"],
        default="wall",
        help="budget uniform-matched by wall-clock or by process CPU time (use cpu on a shared "
        "machine) (default: %(default)s)",
    )
    p.add_argument("--no-matched", action="store_true", help="skip the uniform-matched run")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors")
    return p


def _say(args: argparse.Namespace, text: str) -> None:
    if not args.quiet:
        print(text, flush=True)


def _step_records(run_dir: Path) -> list[dict[str, Any]]:
    from es_llm.drivers.deepspeed.metrics import read_jsonl

    path = run_dir / "metrics.jsonl"
    return [r for r in read_jsonl(path) if r.get("type") == "step"] if path.exists() else []


def compare_once(args: argparse.Namespace, out: Path, command: str) -> dict[str, Any]:
    """All runs at `args.epochs`; writes OUT/compare.{json,md,png} and returns compare.json."""
    from es_llm.data import load_corpus
    from es_llm.drivers.deepspeed.metrics import write_json_atomic
    from es_llm.model import tokenizer_for
    from es_llm.tools.compare.report import markdown_report, plot_comparison, print_table
    from es_llm.tools.compare.runner import load_avg, machine_info, run_one

    runs = variants(args.methods, args.variant)
    ref = match_reference(runs, args.match, enabled=not args.no_matched)
    out.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    corpus = load_corpus(  # builds the cache once, before the children need it
        args.data, seq_len=args.seq_len, cache_dir=args.cache_dir, vocab_size=args.vocab_size,
        val_data=args.val_data,
        max_train_samples=args.max_train_samples, max_val_samples=args.max_val_samples,
        tokenizer=tokenizer_for(args.model, args.tokenizer), progress=not args.no_progress,
    )  # fmt: skip
    n_train = len(corpus.train)
    _say(args, f"es-llm compare: {len(runs)} runs x {args.epochs} epochs, {n_train} "
         f"training sequences, {args.world_size} rank(s) -> {out}")  # fmt: skip
    base = options_from_args(args)  # every run's options: these, changed per run
    specs = plan_runs(
        args.config, runs, base.es_overrides, n_train=n_train, world=args.world_size,
        epochs=args.epochs, max_steps=args.max_steps, requested_eval_every=args.eval_every,
    )  # fmt: skip
    summaries: dict[str, dict[str, Any]] = {}
    for spec in specs:
        summaries[spec.name] = run_one(base, spec, out, world=args.world_size, quiet=args.quiet)
    if ref is not None:
        specs.append(
            matched_spec(
                summaries["uniform"],
                summaries[ref],
                clock=args.match_clock,
                epochs=args.epochs,
                requested_eval_every=args.eval_every,
            )
        )
        summaries[MATCHED] = run_one(base, specs[-1], out, world=args.world_size, quiet=args.quiet)
    plans = {spec.name: spec for spec in specs}

    methods = comparison_methods(
        summaries, {name: _step_records(out / name) for name in summaries}, matched_to=ref
    )
    for name, rec in methods.items():
        rec["run_dir"] = name
        rec["eval_every"] = plans[name].eval_every
        if name == MATCHED:
            rec["match_clock"] = args.match_clock
    machine["threads_per_rank"] = summaries["uniform"]["threads_per_rank"]
    machine["load_average_end"] = load_avg()
    result = {
        "methods": methods,
        "target_val_loss": summaries["uniform"]["final_val_loss"],
        "target": {
            "what": "uniform's final validation loss",
            "issue_goal": f"time_to_target_ratio <= {TARGET_SPEEDUP} and final_val_loss <= "
            f"target x {1 + TARGET_LOSS_SLACK}",
        },
        "epochs": args.epochs,
        "world_size": args.world_size,
        "seed": args.seed,
        "train_samples": n_train,
        "val_samples": len(corpus.val),
        "config": args.config,
        "model": args.model,
        "data": args.data or "stdlib",
        "val_data": args.val_data,
        "data_composition": corpus.composition,
        "es_overrides": base.es_overrides,
        "matched_to": ref,
        "match_clock": args.match_clock,
        "machine": machine,
        "command": command,
    }
    write_json_atomic(out / "compare.json", result)
    md = markdown_report(result)
    (out / "compare.md").write_text(md)
    plot_comparison(result, out / "compare.png")
    if not args.quiet:
        print_table(md)
    return result


def run_from_args(args: argparse.Namespace, argv: list[str] | None = None) -> int:
    """`es-llm compare`: one comparison, or one per epoch budget with --epochs-grid."""
    from es_llm.drivers.deepspeed.metrics import write_json_atomic
    from es_llm.tools.compare.report import grid_markdown, print_table

    command = shlex.join(["es-llm", *(sys.argv[1:] if argv is None else argv)])
    out = Path(args.out)
    if not args.epochs_grid:
        compare_once(args, out, command)
        return 0
    results: dict[int, dict[str, Any]] = {}
    for epochs in args.epochs_grid:
        sub = argparse.Namespace(**{**vars(args), "epochs": epochs})
        _say(args, f"== {epochs} epoch(s)")
        results[epochs] = compare_once(sub, out / f"epochs_{epochs}", command)
    grid = grid_summary(results)
    grid["command"] = command
    grid["machine"] = results[args.epochs_grid[-1]]["machine"]
    write_json_atomic(out / "grid.json", grid)
    md = grid_markdown(grid)
    (out / "grid.md").write_text(md)
    if not args.quiet:
        print("\nSaving at each epoch budget:\n", flush=True)
        print_table(md)
    return 0

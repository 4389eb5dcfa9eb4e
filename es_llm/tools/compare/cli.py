"""`es-llm compare`: its flags, and one comparison from plan to report.

The run flags are `train`'s own (`es_llm.cliargs`); the options of every run are built once
from them and changed per run (method, length, budget, directory).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from es_llm.cliargs import (
    add_run_arguments,
    options_from_args,
    parse_key_value,
    parse_method_list,
    positive_int,
)
from es_llm.sampling.config import METHODS
from es_llm.tools.compare.metrics import (
    GOAL_LOSS_SLACK,
    GOAL_TIME_SHARE,
    MATCHED,
    TARGETS,
    comparison_methods,
    grid_summary,
    median_methods,
    median_or_none,
    round_view,
    target_loss,
)
from es_llm.tools.compare.planning import (
    EVALS_PER_RUN,
    RunSpec,
    Variant,
    match_reference,
    matched_spec,
    plan_runs,
    variants,
)
from es_llm.tools.compare.seeds import median_over_seeds, seed_list, seeds_block

if TYPE_CHECKING:
    from es_llm.drivers.deepspeed.loop import TrainOptions

__all__ = [
    "DEFAULT_METHODS",
    "Progress",
    "add_parser",
    "compare_once",
    "compare_seeds",
    "parse_grid",
    "parse_variant",
    "rotated",
    "run_from_args",
    "run_rounds",
]

# The paper's methods and the baseline, uniform first (it sets the target). Every name in
# config.METHODS is accepted; these run when --methods is not given.
DEFAULT_METHODS = ("uniform", "es", "eswp", "prune")


EPOCHS_X = "epochs_x"  # a --variant key that is not an ES field: this run's epochs multiplier


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
    overrides = dict(parse_key_value(item) for item in _join_values(items))
    epochs_x = overrides.pop(EPOCHS_X, 1)
    if not isinstance(epochs_x, int) or isinstance(epochs_x, bool) or epochs_x < 1:
        raise argparse.ArgumentTypeError(
            f"--variant {parts[0]}: {EPOCHS_X} must be a positive integer, got {epochs_x!r}"
        )
    return Variant(parts[0], parts[1], overrides, epochs_x)


def _join_values(items: list[str]) -> list[str]:
    """Comma-separated KEY=VALUE items, where an item whose key is not an `evolved_sampling`
    field continues the previous value: `proxy_model=base:gpt2-tiny,steps=200` is one item."""
    from es_llm.sampling.config import EvolvedSamplingConfig

    fields = set(EvolvedSamplingConfig.model_fields) | {EPOCHS_X}
    out: list[str] = []
    for item in items:
        key = item.split("=", 1)[0].strip()
        if out and key not in fields:
            out[-1] = f"{out[-1]},{item}"
        else:
            out.append(item)
    return out


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
        "output lies in DIR/<name>/ (DIR/seed_<S>/<name>/ with --seeds N > 1).",
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
    p.add_argument(
        "--target",
        choices=TARGETS,
        default="best",
        help="the loss every run is timed to: uniform's best validation loss (default; "
        "multi-epoch runs over-fit, so the final one can be higher) or its final one",
    )
    p.add_argument(
        "--repeats",
        type=positive_int,
        default=1,
        help="run the whole comparison N times, interleaved (the method order rotated each "
        "round), and report the median per method: time ratios to trust on a shared "
        "machine (default: %(default)s)",
    )
    p.add_argument(
        "--seeds",
        type=positive_int,
        default=1,
        metavar="N",
        help="run every method (variants and uniform-matched too) at N seeds, --seed to "
        "--seed+N-1 (DIR/seed_<S>/ each); compare.md gives each method's mean and sample "
        "standard deviation over the seeds and calls a difference smaller than that spread "
        "'no difference'; combines with --repeats (the rounds run at each seed) "
        "(default: %(default)s)",
    )
    p.add_argument("--quiet", action="store_true", help="print nothing but errors")
    return p


def _say(args: argparse.Namespace, text: str) -> None:
    if not args.quiet:
        print(text, flush=True)


def _step_records(run_dir: Path) -> list[dict[str, Any]]:
    from es_llm.drivers.deepspeed.metrics import read_jsonl

    path = run_dir / "metrics.jsonl"
    return [r for r in read_jsonl(path) if r.get("type") == "step"] if path.exists() else []


def rotated(items: list[Any], by: int) -> list[Any]:
    """`items` rotated left by `by` (the run order of round `by` of --repeats)."""
    if not items:
        return []
    k = by % len(items)
    return items[k:] + items[:k]


@dataclass
class Progress:
    """The "[3/12]" label of each run's first line, counted over every round (and seed);
    `note` ("seed 1") is added inside the brackets when given."""

    total: int
    done: int = 0
    note: str = ""

    def next(self) -> str:
        self.done += 1
        return f"[{self.done}/{self.total}{', ' + self.note if self.note else ''}]"


def runs_per_round(args: argparse.Namespace) -> list[str]:
    """The names of one round's runs, uniform-matched last (it needs the others' times)."""
    runs = variants(args.methods, args.variant)
    ref = match_reference(runs, args.match, enabled=not args.no_matched)
    return [v.name for v in runs] + ([MATCHED] if ref is not None else [])


def run_rounds(
    args: argparse.Namespace,
    specs: list[RunSpec],
    ref: str | None,
    out: Path,
    run: Callable[[RunSpec, Path, str], dict[str, Any]],
    progress: Progress | None = None,
) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """`args.repeats` rounds of the runs, each a record of compare.json per run; and every
    run's machine conditions ("NAME" or "NAME (round R)").

    `run(spec, directory, label)` trains one run and returns its summary (with "conditions").
    Rounds of --repeats go into OUT/round_<r>/ (one round: OUT/ itself). Each round runs
    every method once, in the order rotated by one per round, so that a slow spell of the
    machine does not always hit the same method; uniform-matched runs last in its round,
    budgeted by that round's uniform and reference runs. `progress` counts the runs for
    their labels (default: these rounds' runs).
    """
    if progress is None:
        progress = Progress((len(specs) + (ref is not None)) * args.repeats)
    rounds: list[dict[str, Any]] = []
    conditions: dict[str, dict[str, Any]] = {}
    for r in range(args.repeats):
        where = out if args.repeats == 1 else out / f"round_{r + 1}"
        tag = "" if args.repeats == 1 else f" (round {r + 1})"
        summaries: dict[str, dict[str, Any]] = {}
        plans = {}
        for spec in rotated(specs, r):
            summaries[spec.name] = run(spec, where, progress.next())
            plans[spec.name] = spec
        if ref is not None:
            plans[MATCHED] = matched_spec(
                summaries["uniform"], summaries[ref], clock=args.match_clock,
                epochs=args.epochs, requested_eval_every=args.eval_every,
            )  # fmt: skip
            summaries[MATCHED] = run(plans[MATCHED], where, progress.next())
        order = [s.name for s in specs] + ([MATCHED] if ref is not None else [])
        summaries = {name: summaries[name] for name in order}
        methods = comparison_methods(
            summaries,
            {name: _step_records(where / name) for name in summaries},
            matched_to=ref,
            target=args.target,
        )
        for name, rec in methods.items():
            rec["run_dir"] = str((where / name).relative_to(out))
            rec["eval_every"] = plans[name].eval_every
            rec["conditions"] = summaries[name]["conditions"]
            conditions[name + tag] = summaries[name]["conditions"]
            if name == MATCHED:
                spec = plans[MATCHED]
                budget = spec.max_wall_clock_s or spec.max_cpu_time_s
                clock_key = "wall_clock_s" if spec.max_wall_clock_s else "cpu_time_s"
                rec["match_clock"] = args.match_clock
                rec["budget_s"] = budget
                rec["budget_used"] = rec[clock_key] / budget if budget else None
        rounds.append(
            {
                "order": [s.name for s in rotated(specs, r)] + ([MATCHED] if ref else []),
                "target_val_loss": target_loss(summaries["uniform"], args.target),
                "methods": methods,
                "summaries": summaries,
            }
        )
    return rounds, conditions


def base_options(args: argparse.Namespace) -> TrainOptions:
    """Every run's training options before its own changes.

    Every evaluation covers the whole validation split (`--max-val-samples`, default 128):
    the runs are timed to a loss along their curves and compared by their final loss, so
    the curve points and the final loss must be losses on the same rows. (`es-llm train`
    evaluates a 256-sequence subset along the way and the whole split at the end.)
    """
    if args.max_val_samples is None:
        return options_from_args(args)
    return options_from_args(args, eval_subset=args.max_val_samples)


def compare_once(
    args: argparse.Namespace,
    out: Path,
    command: str,
    corpus: Any,
    *,
    progress: Progress | None = None,
    show: bool = True,
) -> dict[str, Any]:
    """All runs at `args.epochs` and `args.seed`, `args.repeats` times; writes
    OUT/compare.{json,md,png} and returns compare.json (the tables printed when `show`).

    The rounds are `run_rounds`'s; with several, each method's record is the median one
    (`median_methods`).
    """
    from es_llm.tools.compare.conditions import differing_conditions
    from es_llm.tools.compare.runner import load_avg, machine_info, run_one

    runs = variants(args.methods, args.variant)
    ref = match_reference(runs, args.match, enabled=not args.no_matched)
    out.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    n_train = len(corpus.train)
    base = base_options(args)  # every run's options: these, changed per run
    specs = plan_runs(
        args.config, runs, base.es_overrides, n_train=n_train, world=args.world_size,
        epochs=args.epochs, max_steps=args.max_steps, requested_eval_every=args.eval_every,
    )  # fmt: skip

    def run(spec: RunSpec, where: Path, label: str) -> dict[str, Any]:
        return run_one(base, spec, where, world=args.world_size, quiet=args.quiet, label=label)

    rounds, conditions = run_rounds(args, specs, ref, out, run, progress)
    summaries = rounds[-1]["summaries"]
    if args.repeats == 1:
        methods = rounds[0]["methods"]
    else:
        methods = median_methods([rd["methods"] for rd in rounds])
    machine["threads_per_rank"] = summaries["uniform"]["threads_per_rank"]
    machine["load_average_end"] = load_avg()
    warnings = differing_conditions(conditions, machine["cpu_count"] or 1)
    target = result_target(rounds)
    result = {
        "methods": methods,
        "target_val_loss": target,
        "target": {
            "kind": args.target,
            "what": f"uniform's {args.target} validation loss",
            "goal": f"time_to_target_ratio <= {GOAL_TIME_SHARE} and {args.target}_val_loss <= "
            f"target x {1 + GOAL_LOSS_SLACK}",
        },
        "repeats": args.repeats,
        "rounds": [
            {
                "order": rd["order"],
                "target_val_loss": rd["target_val_loss"],
                "methods": {k: round_view(v) for k, v in rd["methods"].items()},
            }
            for rd in rounds
        ]
        if args.repeats > 1
        else None,  # fmt: skip
        "conditions": conditions,
        "conditions_differ": warnings,
        "epochs": args.epochs,
        "world_size": args.world_size,
        "seed": args.seed,
        "train_samples": n_train,
        "val_samples": len(corpus.val),
        "config": args.config,
        "model": args.model,
        "data": args.data or "stdlib",
        "val_data": args.val_data,
        "val_share": args.val_share,
        "data_composition": corpus.composition,
        "es_overrides": base.es_overrides,
        "matched_to": ref,
        "match_clock": args.match_clock,
        "machine": machine,
        "command": command,
        "seeds": seeds_block([args.seed], [methods]),
        "per_seed": [_seed_view(args.seed, ".", target, methods)],
    }
    write_outputs(result, out, show=show and not args.quiet)
    return result


def result_target(rounds: list[dict[str, Any]]) -> float | None:
    """The comparison's target: its round's, or the median of its rounds'."""
    targets = [rd["target_val_loss"] for rd in rounds]
    return targets[0] if len(targets) == 1 else median_or_none(targets)


def _seed_view(
    seed: int, run_dir: str, target: float | None, methods: dict[str, Any]
) -> dict[str, Any]:
    """One seed's entry of compare.json "per_seed": its target and its runs' headline
    numbers (medians over the rounds with --repeats; the full records are in its
    directory's compare.json)."""
    return {
        "seed": seed,
        "run_dir": run_dir,
        "target_val_loss": target,
        "methods": {name: round_view(rec) for name, rec in methods.items()},
    }


def _in_seed_dir(rd: dict[str, Any], seed: int) -> dict[str, Any]:
    """A seed's round in the multi-seed compare.json: its seed, run_dir under seed_<S>/."""
    methods = {n: {**v, "run_dir": f"seed_{seed}/{v['run_dir']}"} for n, v in rd["methods"].items()}
    return {**rd, "seed": seed, "methods": methods}


def write_outputs(result: dict[str, Any], out: Path, *, show: bool) -> None:
    """OUT/compare.json, compare.md and compare.png; the tables printed when `show`."""
    from es_llm.drivers.deepspeed.metrics import write_json_atomic
    from es_llm.tools.compare.report import markdown_report, plot_comparison, print_table

    write_json_atomic(out / "compare.json", result)
    md = markdown_report(result)
    (out / "compare.md").write_text(md)
    plot_comparison(result, out / "compare.png")
    if show:
        print("", flush=True)
        print_table(md)


def compare_seeds(args: argparse.Namespace, out: Path, command: str, corpus: Any) -> dict[str, Any]:
    """The comparison at each of `args.seeds` seeds (from `args.seed`): one seed is
    `compare_once` in OUT itself (today's layout); several are one `compare_once` each in
    OUT/seed_<S>/ (a complete comparison of that seed, uniform-matched budgeted by that
    seed's reference run), then OUT/compare.{json,md,png} over all of them: "methods" the
    medians over the seeds, "seeds" the means, spreads and verdicts, "per_seed" each seed's
    numbers."""
    from es_llm.tools.compare.conditions import differing_conditions

    seeds = seed_list(args.seed, args.seeds)
    if len(seeds) == 1:
        return compare_once(args, out, command, corpus)
    progress = Progress(len(runs_per_round(args)) * args.repeats * len(seeds))
    results: dict[int, dict[str, Any]] = {}
    for i, seed in enumerate(seeds, start=1):
        _say(args, f"== seed {seed} ({i}/{len(seeds)})")
        progress.note = f"seed {seed}"
        sub = argparse.Namespace(**{**vars(args), "seed": seed, "seeds": 1})
        results[seed] = compare_once(
            sub, out / f"seed_{seed}", command, corpus, progress=progress, show=False
        )
    first, last = results[seeds[0]], results[seeds[-1]]
    conditions = {
        f"{name} [seed {s}]": c
        for s, res in results.items()
        for name, c in res["conditions"].items()
    }
    machine = {**first["machine"], "load_average_end": last["machine"]["load_average_end"]}
    rounds = [_in_seed_dir(rd, s) for s, res in results.items() for rd in res["rounds"] or []]
    result = {
        **first,
        "methods": median_over_seeds(results, repeats=args.repeats),
        "target_val_loss": median_or_none([res["target_val_loss"] for res in results.values()]),
        "rounds": rounds or None,
        "conditions": conditions,
        "conditions_differ": differing_conditions(conditions, machine["cpu_count"] or 1),
        "seed": seeds[0],
        "machine": machine,
        "seeds": seeds_block(seeds, [res["methods"] for res in results.values()]),
        "per_seed": [{**res["per_seed"][0], "run_dir": f"seed_{s}"} for s, res in results.items()],
    }
    write_outputs(result, out, show=not args.quiet)
    return result


def _load(args: argparse.Namespace) -> Any:
    """The comparison's corpus, tokenized as its runs will be (a --model directory's own
    tokenizer by default); builds the cache once, before the children need it."""
    from es_llm.data import load_corpus
    from es_llm.model import tokenizer_for

    return load_corpus(
        args.data, seq_len=args.seq_len, cache_dir=args.cache_dir, vocab_size=args.vocab_size,
        val_data=args.val_data, val_share=args.val_share,
        max_train_samples=args.max_train_samples, max_val_samples=args.max_val_samples,
        tokenizer=tokenizer_for(args.model, args.tokenizer), progress=not args.no_progress,
    )  # fmt: skip


def header(args: argparse.Namespace, n_train: int, out: Path) -> str:
    """The one line printed before the first run: every run counted, uniform-matched too."""
    names = runs_per_round(args)
    budgets = args.epochs_grid or [args.epochs]
    runs = len(names) * args.repeats * len(budgets) * args.seeds
    rounds = f" x {args.repeats} rounds" if args.repeats > 1 else ""
    if args.seeds > 1:
        rounds += f" x {args.seeds} seeds {', '.join(map(str, seed_list(args.seed, args.seeds)))}"
    if len(budgets) > 1:
        epochs = f"at each of {len(budgets)} epoch budgets"
        length = f"epochs {', '.join(str(e) for e in budgets)}"
    else:
        epochs, length = "", f"{budgets[0]} epoch(s)"
    return (
        f"es-llm compare: {runs} runs ({', '.join(names)}{rounds}{' ' if epochs else ''}"
        f"{epochs}), {length}, {n_train} training sequences, {args.world_size} rank(s), "
        f"target uniform's {args.target} validation loss -> {out}"
    )


def resolve_proxy_bases(args: argparse.Namespace) -> None:
    """Replace every ``proxy_model: base:...`` of `--es` and `--variant` by its cached base's
    directory, built once at the comparison's seed (as `--model base:` is): the runs of
    every seed share one proxy base, and its pre-training is reported beside each share of
    uniform's time, not charged to one run."""
    from es_llm.base_models import base_for_run, is_base_spec

    def built(value: Any) -> Any:
        if not isinstance(value, str) or not is_base_spec(value):
            return value
        return str(base_for_run(value, args, progress=not args.no_progress))

    args.es = [(k, built(v) if k == "proxy_model" else v) for k, v in args.es]
    for v in args.variant:
        if "proxy_model" in v.overrides:
            v.overrides["proxy_model"] = built(v.overrides["proxy_model"])


def run_from_args(args: argparse.Namespace, argv: list[str] | None = None) -> int:
    """`es-llm compare`: one comparison, or one per epoch budget with --epochs-grid."""
    from es_llm.base_models import resolve_model_arg
    from es_llm.data.documents import check_val_share
    from es_llm.drivers.deepspeed.metrics import write_json_atomic
    from es_llm.preflight import check_output_dirs
    from es_llm.tools.compare.report import grid_markdown, print_table

    command = shlex.join(["es-llm", *(sys.argv[1:] if argv is None else argv)])
    out = Path(args.out)
    runs_per_round(args)  # a bad --match or duplicate name: one line, before the data loads
    check_val_share(args.val_share)  # a bad --val-share: one line, before the data loads
    if args.no_progress:  # the libraries' bars too, here and in the workers it starts
        from es_llm.quiet import quiet_progress_bars

        quiet_progress_bars()
    check_output_dirs(args)  # an --out or cache directory that cannot be written: the same
    resolve_model_arg(args)  # --model base:...: every run fine-tunes the one cached base
    resolve_proxy_bases(args)  # proxy_model base:...: every seed and run scores with one base
    corpus = _load(args)
    _say(args, header(args, len(corpus.train), out))
    if not args.epochs_grid:
        compare_seeds(args, out, command, corpus)
        return 0
    results: dict[int, dict[str, Any]] = {}
    for epochs in args.epochs_grid:
        sub = argparse.Namespace(**{**vars(args), "epochs": epochs})
        _say(args, f"== {epochs} epoch(s)")
        results[epochs] = compare_seeds(sub, out / f"epochs_{epochs}", command, corpus)
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

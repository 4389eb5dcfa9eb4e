"""The `es-llm` command line: train, bench (and compare, see `es_llm.tools.compare`).

Thin by design: parse flags, build options, call the layer below. Errors that come from the
user's input (config, data, batch sizes) are printed as one line without a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from es_llm.cliargs import (
    add_engine_arguments,
    add_run_arguments,
    options_from_args,
    positive_int,
)
from es_llm.cuda_env import fix_torch_cuda_arch_list
from es_llm.drivers.deepspeed.stopping import RunStopped
from es_llm.errors import InputError


def _train_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="pre-train a causal LM with Evolved Sampling through DeepSpeed or Megatron-core",
        description="Pre-train a causal LM with ES/ESWP through a DeepSpeed engine (or "
        "Megatron-core with --engine megatron). Writes OUT/metrics.jsonl, OUT/summary.json and "
        "OUT/loss_curve.png. Run on several ranks with `deepspeed --num_gpus N --module "
        "es_llm.cli train ...`, or `torchrun --nproc_per_node N -m es_llm.cli train --engine "
        "megatron ...`.",
    )
    add_run_arguments(p)
    add_engine_arguments(p)
    p.add_argument("--out", default="runs/train", help="output directory (default: %(default)s)")
    p.add_argument(
        "--eval-every",
        type=positive_int,
        default=None,
        help="evaluate the fixed validation subset every N steps (default: at --eval-points "
        "steps spread over the run); the start, each epoch end and the end are evaluated too, "
        "the end on the whole validation split",
    )
    p.add_argument(
        "--eval-points",
        type=positive_int,
        default=10,
        help="without --eval-every: evaluate the fixed validation subset at about this many "
        "steps spread evenly over the planned run (default: %(default)s)",
    )
    p.add_argument(
        "--eval-subset",
        type=positive_int,
        default=256,
        metavar="N",
        help="the fixed validation subset: the first N validation sequences, evaluated during "
        "the run and at a signalled stop; the whole split is evaluated at the end "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--save-every",
        type=positive_int,
        default=None,
        help="save a checkpoint (DeepSpeed's files + the ES state of every rank) to "
        "OUT/checkpoints/global_step<N>/ every N steps, at a stop and at the end "
        "(default: no checkpoints)",
    )
    p.add_argument(
        "--no-save-on-stop",
        dest="save_on_stop",
        action="store_false",
        help="on SIGINT/SIGTERM, stop without writing a checkpoint (by default the run writes "
        "one at the step it stopped at, so --resume continues from there)",
    )
    p.add_argument(
        "--resume",
        default=None,
        metavar="DIR",
        help="continue the run in DIR (its --out) from the newest complete checkpoint in "
        "DIR/checkpoints/, appending to DIR/metrics.jsonl; give the same flags and config as "
        "the original run (a different run configuration is an error)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="delete the contents of an existing, non-empty --out first (without it, and "
        "without --resume, a non-empty --out is refused)",
    )
    p.add_argument(
        "--stop-after",
        type=positive_int,
        default=None,
        metavar="STEP",
        help="stop after optimizer step STEP (checkpointed with --save-every) without changing "
        "the planned schedule, unlike --max-steps; resume later with --resume",
    )


def _bench_parser(sub: argparse._SubParsersAction, argv: list[str]) -> None:
    p = sub.add_parser("bench", help="microbenchmarks (kernels, score table, proxy scorer)")
    bsub = p.add_subparsers(dest="what", required=True)
    pk = bsub.add_parser(
        "kernels",
        help="per-sample loss / scoring kernels vs PyTorch eager, torch.compile and Liger",
        description="Time the scoring kernels; writes OUT/kernels_bench.json.",
    )
    if "kernels" in argv:  # its flags live with the kernels, which import torch: only when asked
        from es_llm.kernels import bench as kbench

        kbench.add_arguments(pk)
    _add_verbose(pk)
    ps = bsub.add_parser(
        "scores",
        help="the score table at scale: ESWP epoch plan and per-step update",
        description="Build a score shard of N samples and time the epoch plan and the per-step "
        "update; writes OUT/scores_bench.json.",
    )
    ps.add_argument(
        "--num-samples",
        type=positive_int,
        default=10**8,
        help="samples in the score shard (default: 10^8)",
    )
    ps.add_argument(
        "--meta-batch",
        type=positive_int,
        default=1024,
        help="samples scored per step (default: %(default)s)",
    )
    ps.add_argument(
        "--repeats",
        type=positive_int,
        default=3,
        help="timed repetitions, the median is reported (default: %(default)s)",
    )
    ps.add_argument("--out", default="runs/bench", help="output directory (default: %(default)s)")
    _add_verbose(ps)
    pp = bsub.add_parser(
        "proxy",
        help="the proxy scorer's cost against the learner's scoring forward",
        description="Time, per sample, the learner's scoring forward and training step and "
        "the proxy's scoring forward and online update (random rows, one process, no "
        "DeepSpeed); writes OUT/proxy_bench.json.",
    )
    from es_llm.tools.bench_proxy import add_arguments as proxy_arguments

    proxy_arguments(pp)
    _add_verbose(pp)


def _add_verbose(p: argparse.ArgumentParser, *, top: bool = False) -> None:
    p.add_argument(
        "--verbose",
        action="store_true",
        # only the top level sets the default, so `es-llm --verbose train` is not undone
        default=False if top else argparse.SUPPRESS,
        help="show every DeepSpeed log line, also the known-harmless warnings that are "
        "filtered by default",
    )


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser; ``argv`` only decides whether the kernel benchmark's flags are loaded."""
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        prog="es-llm",
        description="Evolved Sampling (ES/ESWP) for LLM pre-training on DeepSpeed",
    )
    # the deepspeed launcher passes --local_rank to every rank
    parser.add_argument(
        "--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS
    )
    _add_verbose(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    _bench_parser(sub, argv)
    from es_llm.tools import compare

    compare.add_parser(sub)
    for p in sub.choices.values():
        _add_verbose(p)
    return parser


def _cmd_train(args: argparse.Namespace) -> int:
    from es_llm.base_models import resolve_model_arg
    from es_llm.ds_ops import announce_deepspeed_op_build, quiet_cached_op
    from es_llm.preflight import check_not_finished, check_train_inputs, prepare_out_dir

    check_not_finished(args)  # --resume of a finished run: one line, nothing changed
    if args.engine == "megatron":
        return _cmd_train_megatron(args)
    for flag, value in (("--tensor-parallel-size", args.tensor_parallel_size),
                        ("--pipeline-parallel-size", args.pipeline_parallel_size)):  # fmt: skip
        if value is not None:
            raise InputError(f"{flag} needs --engine megatron (DeepSpeed trains data-parallel)")
    resolve_model_arg(args)  # --model base:...: the cached pre-trained base (built once)
    check_train_inputs(args)  # every input problem, before any engine or process group
    _check_monitors(args.config)
    prepare_out_dir(args)
    from es_llm.drivers.deepspeed.loop import train
    from es_llm.quiet import verbose_requested

    opts = options_from_args(args)
    announce_deepspeed_op_build()
    with quiet_cached_op(verbose=verbose_requested()):
        summary = train(opts)
    if int(os.environ.get("RANK", "0")) == 0:
        keys = ("method", "world_size", "steps", "epochs", "bp_samples", "scored_samples")
        print(json.dumps({k: summary[k] for k in keys}))
        of = summary.get("final_val") or {}
        what = f" ({of['set']} validation set, {of['sequences']} sequences)" if of else ""
        print(
            f"final validation loss {summary['final_val_loss']:.4f}{what} after "
            f"{summary['wall_clock_s']:.1f}s of training; results in {opts.out}/"
        )
    return 0


def _cmd_train_megatron(args: argparse.Namespace) -> int:
    """`train --engine megatron`: every input check before any process group, then the run."""
    from es_llm.drivers.megatron.checks import require_megatron

    require_megatron()  # first: without megatron-core nothing else matters
    from es_llm.drivers.megatron.train import megatron_setup, train
    from es_llm.preflight import check_train_inputs, prepare_out_dir

    opts = options_from_args(args)
    world_env = os.environ.get("WORLD_SIZE")
    sizes = dict(tp=args.tensor_parallel_size, pp=args.pipeline_parallel_size)
    setup = megatron_setup(opts, **sizes, world_size=int(world_env or 1))
    # the shared checks (data, tokenizer, --out, --resume) see the data-parallel size: the
    # batch splits over those ranks, not over the tensor-parallel peers
    os.environ["WORLD_SIZE"] = str(setup.sizes.dp)
    try:
        check_train_inputs(args)
    finally:
        if world_env is None:
            del os.environ["WORLD_SIZE"]
        else:
            os.environ["WORLD_SIZE"] = world_env
    prepare_out_dir(args)
    summary = train(
        opts,
        tensor_parallel_size=args.tensor_parallel_size,
        pipeline_parallel_size=args.pipeline_parallel_size,
    )
    if int(os.environ.get("RANK", "0")) == 0:
        keys = ("engine", "method", "world_size", "tensor_parallel_size", "steps", "bp_samples")
        print(json.dumps({k: summary[k] for k in keys}))
        print(
            f"final validation loss {summary['final_val_loss']:.4f} after "
            f"{summary['wall_clock_s']:.1f}s of training; results in {opts.out}/"
        )
    return 0


def _check_monitors(config: str) -> None:
    """A monitor section (tensorboard, wandb, ...) whose package is missing fails here."""
    from es_llm.drivers.deepspeed.dsconfig import load_ds_config
    from es_llm.drivers.deepspeed.monitor import check_monitor_packages

    check_monitor_packages(load_ds_config(config))


def _cmd_bench(args: argparse.Namespace) -> int:
    if args.what == "kernels":
        from es_llm.kernels import bench as kbench

        kbench.run(args)
        return 0
    if args.what == "proxy":
        from es_llm.tools import bench_proxy

        bench_proxy.run(args)
        return 0
    from es_llm.tools.bench_scores import run_scores_bench

    run_scores_bench(
        num_samples=args.num_samples,
        meta_batch=args.meta_batch,
        repeats=args.repeats,
        out_dir=args.out,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    fix_torch_cuda_arch_list()  # before DeepSpeed JIT-builds any op (FusedAdam)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    from es_llm.quiet import quiet_deepspeed

    quiet_deepspeed(verbose=args.verbose)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    try:
        if args.command == "train":
            return _cmd_train(args)
        if args.command == "bench":
            return _cmd_bench(args)
        if args.command == "compare":
            from es_llm.tools import compare

            return compare.run_from_args(args, argv)
        parser.error(f"unknown command {args.command!r}")
    except RunStopped as e:  # a requested stop, carried out: not an error
        if os.environ.get("RANK") in (None, "0"):
            print("es-llm: " + e.message, file=sys.stderr)
        return e.exit_code
    except InputError as e:
        rank = os.environ.get("RANK")
        prefix = f"es-llm (rank {rank}): error: " if rank not in (None, "0") else "es-llm: error: "
        print(prefix + str(e).strip(), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

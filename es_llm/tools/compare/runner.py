"""Each run of a comparison in its own process, followed while it trains, and the machine the
runs were timed on.

Why processes: DeepSpeed keeps process-group state between engines, and `--world-size N`
needs the deepspeed launcher anyway. The parent writes the run's `TrainOptions` (built once
from the flags, then changed per run) to DIR/<name>/run_spec.json; the child
(`python -m es_llm.tools.compare --worker FILE`, on every rank) trains from it. Threads per rank
are left to the training loop (`es_llm.dist.share_cpu_threads`, which honours
OMP_NUM_THREADS); the child records the count it trained with in DIR/<name>/worker.json.
While the child trains, the parent follows its metrics.jsonl (`live`) and samples the load
average; just before it starts, it times the calibration (`conditions`).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from es_llm.errors import InputError
from es_llm.tools.compare.planning import RunSpec

if TYPE_CHECKING:
    from es_llm.drivers.deepspeed.loop import TrainOptions

__all__ = ["load_avg", "machine_info", "run_one", "wait_for_child", "worker_main"]

SPEC_FILE = "run_spec.json"
WORKER_FILE = "worker.json"
INPUT_ERROR_PREFIX = "es-llm compare worker: input error: "


def run_options(base: TrainOptions, spec: RunSpec, out: Path) -> TrainOptions:
    """The comparison's shared options with this run's fields (a `RunSpec` names them as
    `TrainOptions` does), its ES overrides on top of the shared ones, and its directory."""
    fields = dataclasses.asdict(spec)
    name = fields.pop("name")
    fields["es_overrides"] = {**base.es_overrides, **fields["es_overrides"]}
    return dataclasses.replace(base, out=out / name, progress=False, **fields)


def _child_command(spec_file: Path, world: int) -> list[str]:
    if world == 1:
        return [sys.executable, "-m", "es_llm.tools.compare", "--worker", str(spec_file)]
    from es_llm.dist import _free_port

    return [
        sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(world),
        "--master_port", str(_free_port()), "--module", "es_llm.tools.compare",
        "--worker", str(spec_file),
    ]  # fmt: skip


def wait_for_child(proc: subprocess.Popen, on_poll: Callable[[], None], poll_s: float) -> None:
    """Call `on_poll` every `poll_s` until `proc` exits; never leave it running behind us.

    Ctrl-C reaches the child as well (same process group). A SIGTERM sent to this process
    alone (`kill`, a job scheduler) would end Python without running `finally`, leaving the
    child to train on, orphaned: here it raises SystemExit(143) instead, and the child is
    asked to stop (SIGTERM: its clean stop) and waited for.
    """
    in_main = threading.current_thread() is threading.main_thread()

    def on_sigterm(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, on_sigterm) if in_main else None
    try:
        while proc.poll() is None:
            on_poll()
            time.sleep(poll_s)
    finally:
        if proc.poll() is None:  # interrupted here: do not leave the child training
            proc.terminate()
            proc.wait()
        if in_main:
            signal.signal(signal.SIGTERM, previous)


def run_one(
    base: TrainOptions,
    spec: RunSpec,
    out: Path,
    *,
    world: int,
    quiet: bool = False,
    label: str = "",
    poll_s: float = 0.5,
) -> dict[str, Any]:
    """Train one run in child process(es); return its summary.json, plus "threads_per_rank"
    and "conditions" (the calibration timed just before it and the load average during it).

    While the child trains, its metrics.jsonl is followed and each evaluation printed as one
    line (unless `quiet`); `label` ("[2/5]") prefixes the run's first line.
    """
    from es_llm.tools.compare.conditions import LoadSampler, calibrate
    from es_llm.tools.compare.live import MetricsFollower, done_line, eval_line

    opts = run_options(base, spec, out)
    run_dir = Path(opts.out)
    run_dir.mkdir(parents=True, exist_ok=True)
    for stale in ("metrics.jsonl", "summary.json", WORKER_FILE):  # a previous run's, if any
        (run_dir / stale).unlink(missing_ok=True)
    spec_file = run_dir / SPEC_FILE
    options = {**dataclasses.asdict(opts), "out": str(opts.out)}
    spec_file.write_text(json.dumps({"spec": dataclasses.asdict(spec), "options": options}))
    log = run_dir / "run.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    calibration_s = calibrate()
    loads = LoadSampler()
    follower = MetricsFollower(run_dir / "metrics.jsonl")
    best: dict[str, Any] | None = None
    shown: tuple[int, float] | None = None

    def follow() -> None:
        nonlocal best, shown
        for rec in follower.poll():
            if rec.get("type") != "eval" or rec.get("val_loss") is None:
                continue
            if best is None or rec["val_loss"] < best["val_loss"]:
                best = rec
            # an epoch's end that is also an interval (or the stop) is evaluated twice: once
            # on screen
            if not quiet and (rec["step"], rec["val_loss"]) != shown:
                print(eval_line(spec.name, rec, best["val_loss"]), flush=True)
            shown = (rec["step"], rec["val_loss"])

    if not quiet and label:
        budget = spec.max_wall_clock_s or spec.max_cpu_time_s
        clock = "wall" if spec.max_wall_clock_s else "CPU"
        print(
            f"{label} {spec.name} ({spec.method}, {spec.epochs} epoch(s), evaluation every "
            f"{spec.eval_every} steps"
            + (f", {spec.max_steps} steps" if spec.max_steps else "")
            + (f", budget {budget:.1f}s {clock}" if budget else "")
            + f", calibration {1000 * calibration_s:.1f} ms) -> {run_dir}",
            flush=True,
        )
    t0 = time.perf_counter()
    with log.open("w") as fh:
        proc = subprocess.Popen(
            _child_command(spec_file, world), stdout=fh, stderr=subprocess.STDOUT, env=env
        )

        def on_poll() -> None:
            loads.sample()
            follow()

        wait_for_child(proc, on_poll, poll_s)
    follow()
    if proc.returncode != 0:
        tail = log.read_text(errors="replace").splitlines()[-25:]
        said = [line for line in tail if line.startswith(INPUT_ERROR_PREFIX)]
        if said:  # the run refused its input: that one line, not a traceback
            raise InputError(f"run {spec.name!r}: {said[-1].removeprefix(INPUT_ERROR_PREFIX)}")
        raise RuntimeError(
            f"run {spec.name!r} failed (exit {proc.returncode}); last lines of {log}:\n"
            + "\n".join(tail)
        )
    summary = json.loads((run_dir / "summary.json").read_text())
    worker = json.loads((run_dir / WORKER_FILE).read_text())
    summary["threads_per_rank"] = worker["torch_threads"]
    summary["conditions"] = {"calibration_s": calibration_s, **loads.summary()}
    if not quiet:
        line = done_line(spec.name, summary, best, time.perf_counter() - t0)
        budget = spec.max_wall_clock_s or spec.max_cpu_time_s
        if budget:
            used = summary["wall_clock_s" if spec.max_wall_clock_s else "cpu_time_s"] / budget
            line += f"; it used {100 * used:.0f}% of its budget"
        print(line, flush=True)
    return summary


def worker_main(argv: list[str]) -> int:
    """One training run from a run_spec.json: what `run_one` starts, on every rank."""
    p = argparse.ArgumentParser(prog="python -m es_llm.tools.compare")
    p.add_argument("--worker", required=True, metavar="RUN_SPEC_JSON")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None)
    a = p.parse_args(argv)
    if a.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(a.local_rank))
    import torch

    from es_llm.drivers.deepspeed.loop import TrainOptions, train

    options = json.loads(Path(a.worker).read_text())["options"]
    opts = TrainOptions(**{**options, "out": Path(options["out"])})
    try:
        train(opts)
    except InputError as e:
        print(INPUT_ERROR_PREFIX + str(e).strip().replace("\n", " "), file=sys.stderr, flush=True)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        (opts.out / WORKER_FILE).write_text(json.dumps({"torch_threads": torch.get_num_threads()}))
    return 0


def load_avg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine_info() -> dict[str, Any]:
    """Enough to judge the timings: the CPU, thread settings, versions and the load."""
    import torch

    try:
        import deepspeed

        ds_version = deepspeed.__version__
    except ImportError:  # pragma: no cover - deepspeed is a dependency
        ds_version = None
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "threads_per_rank": None,  # what the runs trained with, filled in from worker.json
        "python": platform.python_version(),
        "torch": torch.__version__,
        "deepspeed": ds_version,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "load_average_start": load_avg(),
    }

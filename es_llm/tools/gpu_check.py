"""The GPU check: `bash launch/gpu_check.sh [OUT_DIR]` (or `python -m es_llm.tools.gpu_check OUT_DIR`).

On one GPU it runs these pieces, in this order (most valuable first), logs in OUT/logs/:

1. `kernels`: the Triton kernel parity tests (`pytest tests/test_kernels_*.py`), on the GPU;
2. `uniform`: `es-llm train --method uniform` with a shipped GPU config (this first run also
   builds the corpus cache and DeepSpeed's FusedAdam, once);
3. `es`: the same with `--method es`;
4. `plain`: the same model and batch in a plain PyTorch loop (`es_llm.tools.bench_plain`),
   in the process that ran `es` (no second start-up), then a short plain run there under the
   sync counter (plain's host synchronisations per step);
5. `proxy`: in that process too, `es-llm bench proxy`: the proxy scorer's forward and online
   update per sample against the learner's scoring forward (the same model, bf16);
6. `syncs`: uniform and es once more, short, under `es_llm.tools.sync_count`, for their host
   synchronisations per optimizer step;
7. `megatron`: `es-llm train --engine megatron` (Megatron-core's GPTModel, DDP, optimizer
   and forward_backward_func, TP=1) for a few ES steps of the same model in bf16;
8. `compare`: a short `es-llm compare` of uniform against es.

The table (OUT/gpu_check.json and OUT/gpu_check.md) is rewritten whenever a piece starts or
ends, so a check that is killed still leaves what it measured ("running" marks the piece that
was cut, "not run" those never reached). The default profile fits a budget (`--budget-s`,
410 s): a piece starts only if its estimated time still fits, and a piece still running at
the end of the budget is stopped. `--full` runs the longer profile without a budget. Nothing
is downloaded: the data is the embedded corpus. `--cpu-smoke` runs the pieces with a tiny
model on the CPU, to test the check itself; its numbers mean nothing about a GPU (its
`megatron` piece runs through the checkout's tests/megatron_launch.py, which patches
megatron-core's hard-coded CUDA calls for the CPU: test-only, never used on a GPU).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.metadata
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from es_llm.tools.gpu_check_table import build_report, read_run, render_markdown

_STARTED = time.time()  # the budget counts from the start of this process

PIECES = ("kernels", "uniform", "es", "plain", "proxy", "syncs", "megatron", "compare")
# pieces that share one process: `es` then `plain` (then plain's sync count), then `proxy`
WORKER_PIECES = ("es", "plain", "proxy")
PARITY_TESTS = ("test_kernels_ce.py", "test_kernels_linear.py", "test_kernels_scoring.py")
STOP_GRACE_S = 5.0  # SIGTERM at the end of the budget, SIGKILL this much later

# Seconds per piece on one H100/H200, estimated from the code and the step counts (no GPU has
# run this yet; docs/gpu.md shows the arithmetic). `uniform` includes the one-time builds.
# `proxy` runs in the warm worker (no start-up): two model builds and 4 x 2 s of timing;
# `compare` gave it 15 s of its 90 (3 start-ups and 32-64 steps of a 124M model)
DEFAULT_ESTIMATES = {"kernels": 60.0, "uniform": 120.0, "es": 35.0, "plain": 25.0,
                     "proxy": 15.0, "syncs": 50.0, "megatron": 30.0,
                     "compare": 75.0}  # fmt: skip
FULL_ESTIMATES = {"kernels": 120.0, "uniform": 140.0, "es": 50.0, "plain": 35.0,
                  "proxy": 30.0, "syncs": 50.0, "megatron": 40.0,
                  "compare": 150.0}  # fmt: skip
# cpu-smoke: generous bounds for a loaded 2-core machine (they only matter with --budget-s)
SMOKE_ESTIMATES = {"kernels": 300.0, "uniform": 60.0, "es": 60.0, "plain": 30.0,
                   "proxy": 30.0, "syncs": 60.0, "megatron": 60.0,
                   "compare": 300.0}  # fmt: skip
DEFAULT_BUDGET_S = 410.0  # 7 minutes less the stop grace of the last piece and the start-up
MEGATRON_LAUNCH = "tests/megatron_launch.py"  # cpu-smoke only: the test-only CPU shim


@dataclass
class Setup:
    """What the check runs. Default profile; `profile_setup` gives `full` and `cpu-smoke`."""

    out: Path
    repo: Path
    profile: str = "default"
    config: str = "zero1_bf16"
    model: str = "gpt2-124m"
    seq_len: int = 256
    vocab_size: int = 8192
    steps: int = 100
    warmup_steps: int = 20  # left out of tokens/s and step times (first-step allocations)
    max_val_samples: int = 256
    max_train_samples: int | None = None
    sync_steps: tuple[int, int] = (10, 30)  # syncs per step between the ends of these steps
    compare_train_samples: int = 2048
    compare_epochs: int = 1
    megatron_steps: int = 10  # the megatron piece: a few ES steps (one burn-in step first)
    kernel_tests: tuple[str, ...] = PARITY_TESTS  # () = every tests/test_kernels_*.py
    # the parity tests in the pytest process, on the GPU; not the ZeRO-3 scoring test, which
    # starts a CPU DeepSpeed process (and may build DeepSpeed's CPU op first)
    kernel_pytest_args: tuple[str, ...] = ("-m", "not multiproc")
    budget_s: float | None = DEFAULT_BUDGET_S
    estimates: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_ESTIMATES))
    data: str | None = None
    cache_dir: str | None = None
    skip: set[str] = field(default_factory=set)
    cpu_smoke: bool = False
    info: dict[str, Any] = field(default_factory=dict)
    started_at: float = _STARTED  # the check's start (time.time()); its worker inherits it

    @property
    def deadline(self) -> float | None:
        return None if self.budget_s is None else self.started_at + self.budget_s

    def data_args(self) -> list[str]:
        args = ["--config", self.config, "--model", self.model, "--seq-len", str(self.seq_len),
                "--vocab-size", str(self.vocab_size)]  # fmt: skip
        if self.max_train_samples is not None:
            args += ["--max-train-samples", str(self.max_train_samples)]
        if self.data is not None:
            args += ["--data", self.data]
        if self.cache_dir is not None:
            args += ["--cache-dir", self.cache_dir]
        return args

    def train_args(self, method: str, steps: int, out: Path) -> list[str]:
        args = ["train", *self.data_args(), "--method", method, "--max-steps", str(steps),
                "--epochs", "100", "--max-val-samples", str(self.max_val_samples),
                "--no-progress", "--out", str(out)]  # fmt: skip
        # imported here, not with this module: the budget's clock starts at that import
        from es_llm.sampling.methods import get_method

        if get_method(method).scoring_forward:
            args += ["--es", "burn_in_steps=1"]  # the same burn-in at every run length
        return args

    def megatron_args(self, out: Path) -> list[str]:
        """`es-llm train --engine megatron` (TP=1) with the check's model, config and data."""
        return [*self.train_args("es", self.megatron_steps, out), "--engine", "megatron",
                "--tensor-parallel-size", "1"]  # fmt: skip

    def proxy_args(self, out: Path) -> list[str]:
        """`es-llm bench proxy` on the check's model (the learner) and its default proxy."""
        seconds = "1" if self.cpu_smoke else ("16" if self.profile == "full" else "8")
        batch = "8" if self.cpu_smoke else "64"
        return ["bench", "proxy", "--model", self.model, "--seq-len", str(self.seq_len),
                "--vocab-size", str(self.vocab_size), "--batch", batch,
                "--max-seconds", seconds, "--out", str(out)]  # fmt: skip

    def plain_args(self, steps: int, out: Path) -> list[str]:
        return [*self.data_args(), "--steps", str(steps), "--out", str(out)]

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(out=str(self.out), repo=str(self.repo), skip=sorted(self.skip))
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Setup:
        d = dict(d)
        d.update(out=Path(d["out"]), repo=Path(d["repo"]), skip=set(d["skip"]),
                 sync_steps=tuple(d["sync_steps"]), kernel_tests=tuple(d["kernel_tests"]),
                 kernel_pytest_args=tuple(d["kernel_pytest_args"]))  # fmt: skip
        return cls(**d)


def profile_setup(profile: str, out: Path, repo: Path, skip: set[str]) -> Setup:
    """`default` (fits DEFAULT_BUDGET_S), `full` (the long check, no budget), `cpu-smoke`."""
    if profile == "default":
        return Setup(out=out, repo=repo, skip=skip)
    if profile == "full":
        return Setup(out=out, repo=repo, profile="full", steps=300, compare_train_samples=4096,
                     kernel_tests=(), kernel_pytest_args=(), budget_s=None,
                     estimates=dict(FULL_ESTIMATES), skip=skip)  # fmt: skip
    if profile == "cpu-smoke":
        return Setup(
            out=out, repo=repo, profile="cpu-smoke", config="cpu_tiny", model="gpt2-tiny",
            seq_len=32, vocab_size=512, steps=4, warmup_steps=1, max_val_samples=32,
            max_train_samples=256, sync_steps=(2, 3), compare_train_samples=256,
            megatron_steps=3,
            kernel_tests=(), kernel_pytest_args=(), budget_s=None,
            estimates=dict(SMOKE_ESTIMATES), skip=skip,
            cpu_smoke=True,
        )  # fmt: skip
    raise ValueError(f"unknown profile {profile!r}")


# ------------------------------------------------------------------ the table on disk
def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def _sync_per_step(setup: Setup, name: str) -> float | None:
    from es_llm.tools.sync_count import per_step_from_marks

    rec = _read_json(setup.out / "syncs" / f"{name}.json")
    if not rec or rec.get("returncode") not in (0, None):
        return None
    return per_step_from_marks(rec.get("marks") or [], *setup.sync_steps)


def collect_report(setup: Setup, pieces: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The table from what is on disk now: finished runs, sync records, the compare."""
    runs = {name: read_run(setup.out / name) if pieces[name]["status"] == "ok" else None
            for name in ("uniform", "es", "plain")}  # fmt: skip
    syncs = {name: _sync_per_step(setup, name) for name in ("uniform", "es", "plain")}
    k = pieces["kernels"]
    kernels = None
    if k["status"] not in ("skipped", "not run"):
        result = "pass" if k["status"] == "ok" else k["status"]
        kernels = {"result": result, "summary": k.get("summary")}
    compare = None
    if pieces["compare"]["status"] == "ok":
        compare = _read_json(setup.out / "compare" / "compare.json")
    info = {**setup.info, "profile": setup.profile, "config": setup.config,
            "model": setup.model, "seq_len": setup.seq_len, "steps": setup.steps,
            "cpu_smoke": setup.cpu_smoke, "sync_steps": list(setup.sync_steps),
            "budget_s": setup.budget_s}  # fmt: skip
    megatron = read_run(setup.out / "megatron") if pieces["megatron"]["status"] == "ok" else None
    proxy_file = setup.out / "proxy" / "proxy_bench.json"
    proxy = _read_json(proxy_file) if pieces["proxy"]["status"] == "ok" else None
    return build_report(runs, syncs, warmup=setup.warmup_steps, kernels=kernels,
                        compare=compare, info=info, pieces=pieces,
                        megatron=megatron, proxy=proxy)  # fmt: skip


class Board:
    """The pieces' records in OUT/pieces.json; every change rewrites the table.

    The check and its worker process take turns (the check waits while the worker runs), so
    each change reads the file, updates one piece and writes it back."""

    def __init__(self, setup: Setup) -> None:
        self.setup = setup
        self.path = setup.out / "pieces.json"

    def pieces(self) -> dict[str, dict[str, Any]]:
        return json.loads(self.path.read_text())

    def start(self, setup: Setup) -> None:
        pieces = {
            p: {"status": "skipped" if p in setup.skip else "not run",
                "estimate_s": setup.estimates.get(p), "log": f"logs/{p}.log"}
            for p in PIECES
        }  # fmt: skip
        self._save(pieces)

    def set(self, piece: str, **fields: Any) -> None:
        pieces = self.pieces()
        pieces[piece].update(fields)
        self._save(pieces)

    def _save(self, pieces: dict[str, dict[str, Any]]) -> None:
        _write_atomic(self.path, json.dumps(pieces, indent=2))
        write_report(self.setup.out, collect_report(self.setup, pieces))


def write_report(out: Path, report: dict[str, Any]) -> None:
    """OUT/gpu_check.json and OUT/gpu_check.md of `report`."""
    _write_atomic(out / "gpu_check.json", json.dumps(report, indent=2))
    _write_atomic(out / "gpu_check.md", render_markdown(report))


def _fits(setup: Setup, piece: str) -> bool:
    deadline = setup.deadline
    return deadline is None or time.time() + setup.estimates.get(piece, 0.0) <= deadline


def _status(rc: int | None) -> str:
    return "cut off (time limit)" if rc is None else ("ok" if rc == 0 else f"FAIL (exit {rc})")


# ------------------------------------------------------------------ pieces in child processes
def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the child's process group (es-llm stops cleanly), SIGKILL it if it lingers."""
    for sig, wait_s in ((signal.SIGTERM, STOP_GRACE_S), (signal.SIGKILL, None)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def _run(
    cmd: list[str], log: Path, setup: Setup, env: dict[str, str],
    on_start: Callable[[int], None] | None = None,
) -> int | None:  # fmt: skip
    """Run `cmd` with its output in `log`; its exit code, or None when the budget ran out."""
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"gpu_check: {' '.join(cmd[1:])}  (log {log})", flush=True)
    t0 = time.perf_counter()
    with log.open("w") as fh:
        proc = subprocess.Popen(cmd, cwd=setup.out, env=env, stdout=fh,
                                stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        try:
            if on_start is not None:
                on_start(proc.pid)
            deadline = setup.deadline
            rc: int | None = proc.wait(
                None if deadline is None else max(0.0, deadline - time.time())
            )
        except subprocess.TimeoutExpired:
            _stop(proc)
            rc = None
        except BaseException:  # Ctrl-C or a bug here: never leave the child running
            _stop(proc)
            raise
    said = "stopped at the end of the budget" if rc is None else f"exit {rc}"
    print(f"gpu_check:   {said} after {time.perf_counter() - t0:.0f}s", flush=True)
    return rc


def _run_piece(
    board: Board, piece: str, cmd: list[str], env: dict[str, str], log: str | None = None
) -> int | None:
    setup = board.setup
    log = log or f"logs/{piece}.log"
    t0 = time.time()
    board.set(piece, status="running", started_s=round(t0 - setup.started_at, 1), log=log)
    rc = _run(cmd, setup.out / log, setup, env, lambda pid: board.set(piece, pid=pid))
    board.set(piece, status=_status(rc), returncode=rc, seconds=round(time.time() - t0, 1))
    return rc


def _kernels(board: Board, env: dict[str, str]) -> None:
    setup = board.setup
    tests_dir = setup.repo / "tests"
    if setup.kernel_tests:
        tests = [str(tests_dir / t) for t in setup.kernel_tests if (tests_dir / t).is_file()]
    else:
        tests = sorted(str(p) for p in tests_dir.glob("test_kernels_*.py"))
    if not tests:
        board.set("kernels", status="FAIL (no kernel tests)",
                  summary=f"no kernel tests under {tests_dir}")  # fmt: skip
        return
    _run_piece(board, "kernels",
               [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                *setup.kernel_pytest_args, *tests], env)  # fmt: skip
    log = setup.out / "logs" / "kernels.log"
    tail = [ln for ln in log.read_text().splitlines() if ln.strip()][-1:] or ["no output"]
    board.set("kernels", summary=tail[0].strip("= "))


def _syncs(board: Board, env: dict[str, str]) -> None:
    """uniform and es under the sync counter, one run each (plain's count ran in the worker)."""
    setup = board.setup
    t0 = time.time()
    board.set("syncs", status="running", started_s=round(t0 - setup.started_at, 1))
    last = setup.sync_steps[1]
    status = "ok"
    for name in ("uniform", "es"):
        log = f"logs/syncs-{name}.log"
        board.set("syncs", log=log)
        cmd = [sys.executable, "-m", "es_llm.tools.sync_count",
               str(setup.out / "syncs" / f"{name}.json"),
               *setup.train_args(name, last, setup.out / "syncs" / f"{name}-run")]  # fmt: skip
        rc = _run(cmd, setup.out / log, setup, env)
        if rc != 0:
            status = _status(rc) + f" ({name})"
            if rc is None:
                break
    board.set("syncs", status=status, seconds=round(time.time() - t0, 1))


def _compare(board: Board, env: dict[str, str]) -> None:
    setup = board.setup
    cmd = [sys.executable, "-m", "es_llm.cli", "compare", *setup.data_args(),
           "--methods", "uniform,es", "--epochs", str(setup.compare_epochs),
           "--max-val-samples", str(setup.max_val_samples), "--no-progress",
           "--out", str(setup.out / "compare")]  # fmt: skip
    if setup.max_train_samples is None:
        cmd += ["--max-train-samples", str(setup.compare_train_samples)]
    _run_piece(board, "compare", cmd, env)


def _megatron(board: Board, env: dict[str, str]) -> None:
    """`es-llm train --engine megatron` at TP=1 on the GPU (cpu-smoke: on the CPU, through the
    checkout's test-only launcher, which patches megatron-core's hard-coded CUDA calls)."""
    import importlib.util

    setup = board.setup
    if importlib.util.find_spec("megatron") is None or (
        importlib.util.find_spec("megatron.core") is None
    ):
        board.set("megatron", status="not run (megatron-core not installed: the 'megatron' "
                  "extra)")  # fmt: skip
        return
    args = setup.megatron_args(setup.out / "megatron")
    if not setup.cpu_smoke:
        _run_piece(board, "megatron", [sys.executable, "-m", "es_llm.cli", *args], env)
        return
    launcher = setup.repo / MEGATRON_LAUNCH
    if not launcher.is_file():
        board.set("megatron", status=f"not run (needs CUDA: on the CPU it runs through "
                  f"{MEGATRON_LAUNCH}, which {setup.repo} lacks)")  # fmt: skip
        return
    _run_piece(board, "megatron", [sys.executable, str(launcher), *args], env)


def _worker_job(board: Board, env: dict[str, str], todo: list[str]) -> None:
    """`es` and `plain` in one child process (see `worker_main`)."""
    setup = board.setup
    cmd = [sys.executable, "-m", "es_llm.tools.gpu_check", str(setup.out),
           "--worker", ",".join(todo)]  # fmt: skip
    rc = _run(cmd, setup.out / "logs" / "worker.log", setup, env)
    pieces = board.pieces()
    for p in todo:  # what the worker could not say itself
        if pieces[p]["status"] == "running":
            board.set(p, status=_status(rc) if rc != 0 else "FAIL (worker died)", returncode=rc)
        elif pieces[p]["status"] == "not run" and rc != 0:
            board.set(p, status="not run (budget)" if rc is None else "not run (worker died)")


# ------------------------------------------------------------------ the worker process
@contextlib.contextmanager
def _output_to(log: Path) -> Iterator[None]:
    """Send this process's stdout and stderr (C-level too) to `log` for a while."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as fh:
        os.dup2(fh.fileno(), 1)
        os.dup2(fh.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def _call(fn: Callable[[], int | None]) -> int:
    """Run one piece in this process: its exit code; a bug prints its traceback, exit 1."""
    try:
        return int(fn() or 0)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1
    except Exception:
        traceback.print_exc()
        return 1


def _free_device_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def worker_main(setup: Setup, todo: list[str]) -> int:
    """Run `todo` (of `es`, `plain`) here, one after the other, rewriting the table after each.

    One process saves a start-up (imports, CUDA context, FusedAdam load): DeepSpeed cannot
    initialise twice in one process, so only one es-llm run shares it, and the plain loop
    (no DeepSpeed) follows it. The `plain` piece ends with the plain loop's sync count (a
    second, short plain run under the trace hooks, which stay on for the rest of the process);
    the `syncs` piece counts uniform and es in processes of their own."""
    board = Board(setup)
    rc = 0
    for piece in todo:
        if not _fits(setup, piece):
            board.set(piece, status="not run (budget)")
            continue
        log = setup.out / "logs" / f"{piece}.log"
        t0 = time.time()
        board.set(
            piece, status="running", started_s=round(t0 - setup.started_at, 1), pid=os.getpid()
        )
        print(f"gpu_check worker: {piece} (log {log})", flush=True)
        with _output_to(log):
            if piece in ("es", "proxy"):
                from es_llm.cli import main as cli_main

                if piece == "es":
                    args = setup.train_args("es", setup.steps, setup.out / "es")
                else:
                    args = setup.proxy_args(setup.out / "proxy")
                piece_rc = _call(partial(cli_main, args))
            else:
                from es_llm.tools.bench_plain import main as plain_main

                args = setup.plain_args(setup.steps, setup.out / "plain")
                piece_rc = _call(partial(plain_main, args))
        if piece == "plain" and piece_rc == 0:
            _plain_syncs(setup)  # last in this process: the trace hooks stay on
        _free_device_memory()
        deadline = setup.deadline
        cut = piece_rc != 0 and deadline is not None and time.time() >= deadline
        board.set(piece, status=_status(None if cut else piece_rc), returncode=piece_rc,
                  seconds=round(time.time() - t0, 1))  # fmt: skip
        rc = rc or piece_rc
        if cut:  # stopped by the check's SIGTERM at the end of the budget
            break
    return rc


def _plain_syncs(setup: Setup) -> None:
    """The plain loop again, `sync_steps[1]` steps under the sync counter -> syncs/plain.json.

    A failure here (the trace hooks, say) goes to its log and leaves the count out; it never
    costs the plain loop's own result."""
    from es_llm.tools.bench_plain import main as plain_main
    from es_llm.tools.sync_count import SyncCounter

    counter = SyncCounter()
    args = setup.plain_args(setup.sync_steps[1], setup.out / "syncs" / "plain-run")

    def count() -> int:
        counter.activate()
        return plain_main(args, on_step=counter.mark)

    with _output_to(setup.out / "logs" / "syncs-plain.log"):
        rc = _call(count)
    rec = counter.record(job="plain", args=args, returncode=rc)
    _write_atomic(setup.out / "syncs" / "plain.json", json.dumps(rec, indent=2))


# ------------------------------------------------------------------ the check
def _device_info() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda}
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name(0)
    else:
        info["device"] = "cpu (no GPU: numbers say nothing about a GPU)"
    try:  # the installed version, without importing it (seconds of the budget)
        info["deepspeed"] = importlib.metadata.version("deepspeed")
    except importlib.metadata.PackageNotFoundError:  # the train pieces will fail and say why
        info["deepspeed"] = "not installed"
    info["TORCH_CUDA_ARCH_LIST"] = os.environ.get("TORCH_CUDA_ARCH_LIST")
    return info


def _terminated(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def _run_jobs(board: Board, env: dict[str, str]) -> None:
    """The pieces in order, each job in its process, each started only if it fits the budget."""
    setup = board.setup
    jobs: list[tuple[str, ...]] = [("kernels",), ("uniform",), WORKER_PIECES, ("syncs",),
                                   ("megatron",), ("compare",)]  # fmt: skip
    for job in jobs:
        todo = [p for p in job if p not in setup.skip]
        if not todo:
            continue
        if not any(_fits(setup, p) for p in todo):  # the worker decides piece by piece
            for p in todo:
                board.set(p, status="not run (budget)")
            continue
        if job == WORKER_PIECES:
            _worker_job(board, env, todo)
        elif job == ("kernels",):
            _kernels(board, env)
        elif job == ("uniform",):
            _run_piece(board, "uniform",
                       [sys.executable, "-m", "es_llm.cli",
                        *setup.train_args("uniform", setup.steps, setup.out / "uniform")], env)  # fmt: skip
        elif job == ("syncs",):
            _syncs(board, env)
        elif job == ("megatron",):
            _megatron(board, env)
        else:
            _compare(board, env)


def run_check(setup: Setup) -> dict[str, Any]:
    """Run the pieces in order within the budget; the table is on disk after each piece."""
    import torch

    from es_llm.cuda_env import fix_torch_cuda_arch_list

    if not setup.cpu_smoke and not torch.cuda.is_available():
        from es_llm.errors import InputError

        raise InputError("torch sees no GPU here; on a CPU-only machine use --cpu-smoke")
    fix_torch_cuda_arch_list()  # the children inherit the normalised list
    setup.out.mkdir(parents=True, exist_ok=True)
    (setup.out / "syncs").mkdir(exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    if setup.cpu_smoke:
        env.update(CUDA_VISIBLE_DEVICES="", DS_ACCELERATOR="cpu")
    setup.info = _device_info()
    # the worker reads the setup (with the check's start time, hence the same deadline)
    _write_atomic(setup.out / "setup.json", json.dumps(setup.to_json(), indent=2))
    board = Board(setup)
    board.start(setup)
    # SIGTERM (a caller's time limit) stops the piece's process group too and says so in
    # the table: the children run in sessions of their own, out of reach of a kill aimed here
    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        _run_jobs(board, env)
    except BaseException:
        for p, rec in board.pieces().items():
            if rec["status"] == "running":
                board.set(p, status="cut off (check stopped)")
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    # the report printed is the one on disk (built once: its date is part of the table)
    report = collect_report(setup, board.pieces())
    write_report(setup.out, report)
    print(render_markdown(report))
    print(f"gpu_check: wrote {setup.out / 'gpu_check.json'} and {setup.out / 'gpu_check.md'}")
    return report


def failed(report: dict[str, Any]) -> bool:
    """A piece failed or was cut off (pieces left out by the budget are not failures)."""
    return any(str(v.get("status")).startswith(("FAIL", "cut off", "not run (worker"))
               for v in report["pieces"].values())  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m es_llm.tools.gpu_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("out", nargs="?", default="runs/gpu_check", help="output directory "
                   "(default: %(default)s)")  # fmt: skip
    p.add_argument("--repo", default=None, help="the es-llm checkout whose tests/ hold the "
                   "kernel tests (default: the current directory)")  # fmt: skip
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--full", action="store_true", help="the long profile: 300 steps per "
                      "run, every kernel test, a longer compare, no budget")  # fmt: skip
    mode.add_argument("--cpu-smoke", action="store_true",
                      help="tiny model on the CPU: tests the check itself, measures nothing")  # fmt: skip
    p.add_argument("--skip", default="", help=f"comma-separated pieces to leave out, of {PIECES}")
    p.add_argument("--steps", type=int, default=None, help="steps per timed run (default 100; "
                   "--full 300; --cpu-smoke 4)")  # fmt: skip
    p.add_argument("--budget-s", type=float, default=None, help="seconds for the whole check, "
                   f"counted from its start (default {DEFAULT_BUDGET_S:.0f}; --full and "
                   "--cpu-smoke: none; 0: none)")  # fmt: skip
    p.add_argument("--data", default=None, help="training data, as for es-llm train "
                   "(default: the embedded corpus)")  # fmt: skip
    p.add_argument("--cache-dir", default=None, help="corpus cache, as for es-llm train")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    out = Path(a.out).resolve()
    if a.worker is not None:  # a child of the check: the setup is on disk
        d = json.loads((out / "setup.json").read_text())
        return worker_main(Setup.from_json(d), a.worker.split(","))
    skip = {s.strip() for s in a.skip.split(",") if s.strip()}
    unknown = skip - set(PIECES)
    if unknown:
        p.error(f"--skip: unknown pieces {sorted(unknown)}; choose from {PIECES}")
    repo = Path(a.repo).resolve() if a.repo else Path.cwd()
    profile = "full" if a.full else ("cpu-smoke" if a.cpu_smoke else "default")
    setup = profile_setup(profile, out, repo, skip)
    if a.steps is not None:
        if a.steps <= setup.warmup_steps:
            p.error(f"--steps must exceed the {setup.warmup_steps} warm-up steps")
        setup.steps = a.steps
    if a.budget_s is not None:
        if a.budget_s < 0:
            p.error("--budget-s must be >= 0 (0: no budget)")
        setup.budget_s = a.budget_s or None
    setup.data, setup.cache_dir = a.data, a.cache_dir
    from es_llm.errors import InputError

    try:
        report = run_check(setup)
    except InputError as e:
        print(f"gpu_check: error: {e}", file=sys.stderr)
        return 2
    return 1 if failed(report) else 0


if __name__ == "__main__":
    sys.exit(main())

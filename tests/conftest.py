"""Test-session setup and the helpers of the end-to-end tests.

Devices: the kernel tests run in this process, on the GPU when there is one, else through the
Triton interpreter (`TRITON_INTERPRET=1` must be set before `import triton`). Every process the
tests start (training runs, the deepspeed launcher, torchrun, spawned ranks) runs on the CPU
with gloo, on a GPU machine too: a 2-rank test cannot put two ranks on one GPU, and the tests
compare against CPU results. So this process claims its GPU first (CUDA reads
`CUDA_VISIBLE_DEVICES` once, at initialisation) and then hides all GPUs from its children
through the environment they inherit.
"""

import os
import sys

# One OpenMP thread in this process and in every process the tests start (they inherit it),
# unless OMP_NUM_THREADS is set already. Set before torch is imported: its thread pool is sized
# then. The tiny models gain nothing from a second thread, and on a 2-core machine busy with
# anything else (the other rank, a parallel job) spinning OpenMP threads made a 10-step
# single-rank run take 79 s instead of 19 s, and the in-process plain-loop test 43 s instead of
# 20 s (measured back to back). The multi-rank tests set it to 1 themselves as well.
# es_llm.dist.share_cpu_threads' default (OMP_NUM_THREADS unset) is tested directly, in
# tests/test_dist_threads.py.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

if torch.cuda.is_available():
    torch.cuda.init()  # from here on this process keeps its GPUs, whatever the environment says
    CUDA_DEVICES = torch.cuda.device_count()
else:
    CUDA_DEVICES = 0
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ["CUDA_VISIBLE_DEVICES"] = ""  # children: no GPU ...
os.environ["DS_ACCELERATOR"] = "cpu"  # ... and DeepSpeed's CPU accelerator (gloo)
# launch/*.sh start the deepspeed launcher and probe torch with this interpreter, not with
# whatever `deepspeed` / `python3` PATH finds (a venv without its own deepspeed script, a
# machine where the script is missing).
os.environ["DEEPSPEED"] = f"{sys.executable} -m deepspeed.launcher.runner"
os.environ["PYTHON"] = sys.executable


# --- shared fixtures for end-to-end runs (es-llm train as a real process) ---------------------
import json  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parent.parent

# Small enough that a run of a few steps takes seconds on 2 CPU cores.
TINY_DS_CONFIG = {
    "train_batch_size": 8,
    "train_micro_batch_size_per_gpu": 4,
    "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "torch_adam": True}},
    "zero_optimization": {"stage": 0},
    "steps_per_print": 1000000,
    "evolved_sampling": {"method": "es", "selection_ratio": 0.5},
}
TINY_RUN_ARGS = [
    "--model",
    "gpt2-tiny",
    "--seq-len",
    "32",
    "--vocab-size",
    "512",
    "--max-train-samples",
    "256",
    "--max-val-samples",
    "32",
    "--no-progress",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(autouse=True)
def _child_tmpdir(monkeypatch: pytest.MonkeyPatch):
    """Processes a test starts get a TMPDIR of their own, removed afterwards: launcher runs
    otherwise leave /tmp/torchelastic_* folders behind. (This process keeps its tempdir.)"""
    import shutil
    import tempfile

    path = tempfile.mkdtemp(prefix="es_llm_test_tmp_")
    monkeypatch.setenv("TMPDIR", path)
    yield Path(path)
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def es_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One corpus/tokenizer cache for the whole session: the stdlib corpus is built once."""
    return tmp_path_factory.mktemp("es_llm_cache")


def write_ds_config(folder: Path, **changes) -> Path:
    """Write the tiny DeepSpeed config (optionally modified) into `folder`; return its path."""
    cfg = json.loads(json.dumps(TINY_DS_CONFIG))
    es = changes.pop("evolved_sampling", None)
    cfg.update(changes)
    if es is not None:
        if es is False:
            cfg.pop("evolved_sampling")
        else:
            cfg["evolved_sampling"].update(es)
    path = folder / f"ds_{abs(hash(json.dumps(cfg, sort_keys=True)))}.json"
    path.write_text(json.dumps(cfg))
    return path


@pytest.fixture
def tiny_ds_config(tmp_path: Path):
    """Write a tiny DeepSpeed config (optionally modified) and return its path."""

    def make(**changes) -> Path:
        return write_ds_config(tmp_path, **changes)

    return make


def _cli_command(args: list[str], cache: Path, ranks: int, env: dict | None):
    import os

    full_env = {**os.environ, "ES_LLM_CACHE": str(cache), "PYTHONUNBUFFERED": "1", **(env or {})}
    if ranks == 1:
        cmd = [sys.executable, "-m", "es_llm.cli", *args]
    else:
        cmd = [
            sys.executable,
            "-m",
            "deepspeed.launcher.runner",
            "--num_gpus",
            str(ranks),
            "--master_port",
            str(free_port()),
            "--module",
            "es_llm.cli",
            *args,
        ]
    return cmd, full_env


def run_cli(
    args: list[str], cache: Path, *, ranks: int = 1, timeout: int = 600, env: dict | None = None
) -> subprocess.CompletedProcess:
    """Run `es-llm ...` (1 rank) or the deepspeed launcher (several ranks) as a real process."""
    cmd, full_env = _cli_command(args, cache, ranks, env)
    return subprocess.run(
        cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout
    )


class StartedCli:
    """`run_cli` started in the background: independent single-rank runs that several tests
    check can go side by side (each is one single-threaded process; the machine has 2 cores),
    each test then waiting for its own with `result()`."""

    def __init__(self, args: list[str], cache: Path, logs: Path, *, timeout: int = 600,
                 env: dict | None = None) -> None:  # fmt: skip
        cmd, full_env = _cli_command(args, cache, 1, env)
        logs.mkdir(parents=True, exist_ok=True)
        self._out, self._err = logs / "stdout.txt", logs / "stderr.txt"
        self.timeout = timeout
        with self._out.open("w") as out, self._err.open("w") as err:
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=out, stderr=err)
        self._done: subprocess.CompletedProcess | None = None

    def result(self) -> subprocess.CompletedProcess:
        """Wait for the process; what `run_cli` would have returned."""
        if self._done is None:
            try:
                rc = self.proc.wait(timeout=self.timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                raise
            self._done = subprocess.CompletedProcess(
                self.proc.args, rc, self._out.read_text(), self._err.read_text()
            )
        return self._done

    def kill(self) -> None:
        """Kill the process and whatever it started (`es-llm compare` starts its runs)."""
        import contextlib

        import psutil

        if self.proc.poll() is not None:
            return
        try:
            children = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:
            children = []
        for child in children:
            with contextlib.suppress(psutil.Error):
                child.kill()
        self.proc.kill()
        self.proc.wait()


def write_instruct_jsonl(path: Path) -> Path:
    """Prompt-completion records; every 4th completion is cut at --seq-len 32."""
    recs = []
    for i in range(300):
        a, b = i % 17 + 3, (i * 7) % 23 + 1
        if i % 4 == 0:
            recs.append({"prompt": f"count from {a}:", "completion": " " + " ".join(
                str(a + k) for k in range(40))})  # fmt: skip
        else:
            recs.append({"prompt": f"{a}+{b}=", "completion": f" {a + b}"})
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path

"""Ctrl-C / SIGTERM is a clean stop: the step in flight finishes, a checkpoint of that step is
written (by default, without --save-every), the fixed validation subset is evaluated,
summary.json says where the run stopped and what its final loss is, the plot is drawn, the
progress bar ends at the step it stopped at out of the planned total, and the process exits
130 (143) with one line that says how to resume; the resumed run says where it resumed. Real
processes, 1 and 2 ranks; the signal is sent once the run has logged a step (observed, not
timed)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, TINY_RUN_ARGS, free_port

from es_llm.drivers.deepspeed.checkpoint import find_complete_tag, read_marker

pytestmark = pytest.mark.multiproc

ARGS = [a for a in TINY_RUN_ARGS]
ARGS[ARGS.index("--max-train-samples") + 1] = "2048"  # long enough not to finish first


def _start(cfg: Path, out: Path, cache: Path, log: Path, ranks: int,
           progress: bool = False) -> subprocess.Popen:  # fmt: skip
    env = {**os.environ, "ES_LLM_CACHE": str(cache), "PYTHONUNBUFFERED": "1",
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    run_args = [a for a in ARGS if a != "--no-progress"] if progress else ARGS
    # no --save-every: a stop writes its checkpoint by default
    args = ["train", "--config", str(cfg), "--out", str(out), "--epochs", "3", *run_args]
    if ranks == 1:
        cmd = [sys.executable, "-m", "es_llm.cli", *args]
    else:
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks),
               "--master_port", str(free_port()), "--module", "es_llm.cli", *args]  # fmt: skip
    # a session of its own: the test can signal the whole group, as a terminal's Ctrl-C does
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log.open("w"),
                            stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip


def _wait_for_steps(proc: subprocess.Popen, out: Path, log: Path, n: int) -> None:
    deadline = time.monotonic() + 900
    metrics = out / "metrics.jsonl"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(
                f"the run ended before it was signalled:\n{log.read_text()[-3000:]}"
            )
        if metrics.exists():
            steps = [ln for ln in metrics.read_text().splitlines() if '"type": "step"' in ln]
            if len(steps) >= n:
                return
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError("no step was logged in time")


def _wait(proc: subprocess.Popen, log: Path) -> int:
    try:
        return proc.wait(timeout=600)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError(f"the run did not stop:\n{log.read_text()[-3000:]}") from None


def _check_stopped_run(out: Path, log_text: str, signame: str, world: int) -> int:
    summary = json.loads((out / "summary.json").read_text())
    stopped = summary["stopped"]
    assert stopped["signal"] == signame, stopped
    step = stopped["step"]
    logged = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert step == summary["steps"] == max(r["step"] for r in logged if r["type"] == "step")
    assert step < summary["planned_steps"]
    assert (out / "loss_curve.png").stat().st_size > 0
    # the weights of the stopped step, as a model directory (docs/models.md)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {
        p.name for p in (out / "model").iterdir()
    }
    root = out / "checkpoints"
    tag = find_complete_tag(root)
    assert tag == f"global_step{step}"
    assert stopped["checkpoint"] == str(root / tag)
    # the final loss is of the trained model: the fixed subset evaluated at the stop
    assert summary["final_val"]["step"] == step and summary["final_val"]["where"] == "signal"
    last_eval = [r for r in logged if r["type"] == "eval"][-1]
    assert last_eval["step"] == step and summary["final_val_loss"] == last_eval["val_loss"]
    assert read_marker(root / tag)["world_size"] == world
    line = f"stopped by {signame} after step {step} of {summary['planned_steps']}"
    assert line in log_text, log_text[-3000:]
    assert f"--resume {out}" in log_text
    return step


def test_sigint_one_rank_stops_cleanly_and_resumes(
    tmp_path: Path, es_cache: Path, tiny_ds_config
) -> None:
    cfg, out, log = tiny_ds_config(), tmp_path / "run", tmp_path / "run.log"
    proc = _start(cfg, out, es_cache, log, ranks=1, progress=True)
    _wait_for_steps(proc, out, log, 2)
    os.killpg(proc.pid, signal.SIGINT)
    rc = _wait(proc, log)
    text = log.read_text()
    assert rc == 130, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    step = _check_stopped_run(out, text, "SIGINT", world=1)
    planned = json.loads((out / "summary.json").read_text())["planned_steps"]
    # the bar ends where the run stopped, out of the planned total (not "6/6 100%")
    assert f"| {step}/{planned} [" in text, text[-3000:]
    assert f"| {step}/{step} [" not in text, text[-3000:]

    # the line's advice works: the same command with --resume continues from that step
    env = {**os.environ, "ES_LLM_CACHE": str(es_cache), "OMP_NUM_THREADS": "1"}
    resumed = subprocess.run(
        [sys.executable, "-m", "es_llm.cli", "train", "--config", str(cfg), "--resume", str(out),
         "--epochs", "3", "--save-every", "100000", "--stop-after", str(step + 1), *ARGS],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (
        f"es-llm: resumed from {out}/checkpoints/global_step{step} at step {step} of "
        f"{planned}, epoch 1 of 3"
    ) in resumed.stderr, resumed.stderr[-3000:]
    steps = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps if r["type"] == "step"][-2:] == [step, step + 1]


def test_ctrl_c_under_the_launcher_stops_two_ranks_at_the_same_step(
    tmp_path: Path, es_cache: Path, tiny_ds_config
) -> None:
    cfg, out, log = tiny_ds_config(), tmp_path / "run", tmp_path / "run.log"
    proc = _start(cfg, out, es_cache, log, ranks=2)
    _wait_for_steps(proc, out, log, 2)
    # Ctrl-C in a terminal: SIGINT to the launcher and every rank; DeepSpeed's launcher
    # then also sends SIGTERM to the ranks (one stop request, not two)
    import psutil

    tree = psutil.Process(proc.pid).children(recursive=True)
    os.killpg(proc.pid, signal.SIGINT)
    _wait(proc, log)  # DeepSpeed's runner exits at once (KeyboardInterrupt); the ranks finish
    _, alive = psutil.wait_procs(tree, timeout=600)
    assert not alive, f"ranks still running:\n{log.read_text()[-3000:]}"
    text = log.read_text()
    _check_stopped_run(out, text, "SIGINT", world=2)
    assert "aborting" not in text, text[-3000:]
    assert "[rank0]: Traceback" not in text and "[rank1]: Traceback" not in text, text[-3000:]

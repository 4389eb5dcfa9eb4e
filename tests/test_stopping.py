"""The stop flag: a signal records a request, duplicates within the grace period count once,
a later second signal aborts at once with 128 + signum (inside a long torch call too), and
handlers are restored."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

from es_llm.drivers.deepspeed.stopping import StopRequest, exit_code_for


def _wait_for(stop: StopRequest) -> None:
    """The watcher thread sets the flag moments after the signal."""
    deadline = time.monotonic() + 10
    while not stop.requested and time.monotonic() < deadline:
        time.sleep(0.01)


def test_signal_sets_the_flag_and_handlers_are_restored() -> None:
    before = signal.getsignal(signal.SIGTERM)
    wakeup_before = signal.set_wakeup_fd(-1)
    signal.set_wakeup_fd(wakeup_before)
    with StopRequest(announce=False) as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGTERM)
        _wait_for(stop)
        assert stop.requested and stop.signal_name == "SIGTERM" and stop.exit_code == 143
        os.kill(os.getpid(), signal.SIGINT)  # within the grace period: the same stop
        time.sleep(0.2)
        assert stop.signal_name == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is before
    assert signal.set_wakeup_fd(wakeup_before) == wakeup_before


def test_exit_codes_follow_the_shell_convention() -> None:
    assert exit_code_for(signal.SIGINT) == 130
    assert exit_code_for(signal.SIGTERM) == 143


def test_second_signal_after_grace_aborts_at_once() -> None:
    code = textwrap.dedent(
        """
        import os, signal, time
        from es_llm.drivers.deepspeed.stopping import StopRequest
        with StopRequest(grace_s=0.2) as stop:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.5)
            assert stop.requested
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
        print("not aborted")
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 130, proc.stderr
    assert "not aborted" not in proc.stdout
    assert "aborting without saving" in proc.stderr
    assert "stopping after the current step" in proc.stderr


# One torch call that runs for minutes: matrix_power squares a 3072 x 3072 matrix about 40
# times inside a single op (the values overflow; the time is the same).
LONG_TORCH_CALL = """
import sys, torch
from es_llm.drivers.deepspeed.stopping import StopRequest
torch.set_num_threads(1)
a = torch.full((3072, 3072), 1e-3)
with StopRequest():
    print("inside", flush=True)
    torch.linalg.matrix_power(a, 10**12)
print("the call returned", flush=True)
"""


def test_a_second_sigterm_aborts_inside_a_long_torch_call() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", LONG_TORCH_CALL],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "inside"
        time.sleep(0.5)  # inside the op
        proc.send_signal(signal.SIGTERM)
        time.sleep(2.5)  # past the grace period: the user insists
        proc.send_signal(signal.SIGTERM)
        # without the watcher thread, both handlers would wait for the op to return
        code = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out, err = proc.communicate()
    assert code == 143, err
    assert "the call returned" not in out
    assert "SIGTERM received: stopping after the current step" in err
    assert "second SIGTERM: aborting without saving" in err


def test_a_stop_saves_by_default_and_the_flag_opts_out() -> None:
    from es_llm.cli import build_parser
    from es_llm.cliargs import options_from_args

    parser = build_parser(["train"])
    assert options_from_args(parser.parse_args(["train"])).save_on_stop is True
    opts = options_from_args(parser.parse_args(["train", "--no-save-on-stop"]))
    assert opts.save_on_stop is False
    opts = options_from_args(parser.parse_args(["train", "--eval-points", "4",
                                                "--eval-subset", "64"]))  # fmt: skip
    assert (opts.eval_points, opts.eval_subset, opts.eval_every) == (4, 64, None)

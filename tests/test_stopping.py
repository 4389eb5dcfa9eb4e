"""The stop flag: a signal records a request, duplicates within the grace period count once,
a later second signal aborts at once with 128 + signum, and handlers are restored."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

from es_llm.drivers.deepspeed.stopping import StopRequest, exit_code_for


def test_signal_sets_the_flag_and_handlers_are_restored() -> None:
    before = signal.getsignal(signal.SIGTERM)
    with StopRequest(announce=False) as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and stop.signal_name == "SIGTERM" and stop.exit_code == 143
        os.kill(os.getpid(), signal.SIGINT)  # within the grace period: the same stop
        assert stop.signal_name == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is before


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
            assert stop.requested
            time.sleep(0.5)
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

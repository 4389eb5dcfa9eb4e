"""A clean stop on SIGINT / SIGTERM: finish the optimizer step, save, summarise, exit.

Why a flag and not an exception: an exception raised by a signal handler lands anywhere
(inside a collective, half-way through an engine step), leaving ranks out of lock-step and
a checkpoint half-written. The handler only records the request; the training loop reads it
once per step, agrees on it across ranks (one all-reduce MAX that is already part of the
step's bookkeeping) and stops at the same step on every rank.

Duplicate deliveries count once: Ctrl-C under the `deepspeed` launcher delivers SIGINT from
the terminal and, a moment later, SIGTERM from the launcher to every rank. A signal that
arrives more than `grace_s` after the first one is the user insisting: the process exits at
once with 128 + signal number, without saving anything.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from types import FrameType, TracebackType

__all__ = ["RunStopped", "StopRequest", "exit_code_for"]

_HANDLED = (signal.SIGINT, signal.SIGTERM)


def exit_code_for(signum: int) -> int:
    """The shell's convention: 128 + signal number (130 for SIGINT, 143 for SIGTERM)."""
    return 128 + int(signum)


class RunStopped(Exception):
    """Raised by a driver after a requested stop was carried out (state saved, summary written).

    Not an error: the command line prints `message` as one line and exits with `exit_code`.
    """

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


class StopRequest:
    """Records SIGINT/SIGTERM while installed (a context manager); `requested` is the flag.

    Install it in the main thread only (Python delivers signals there); elsewhere it is inert
    and never requests a stop.
    """

    def __init__(self, *, grace_s: float = 2.0, announce: bool = True) -> None:
        self.grace_s = grace_s
        self.announce = announce
        self.signum: int | None = None
        self._first_at = 0.0
        self._previous: dict[int, object] = {}
        self._installed = False

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def signal_name(self) -> str | None:
        return None if self.signum is None else signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return exit_code_for(self.signum if self.signum is not None else signal.SIGINT)

    def request(self, signum: int = signal.SIGINT) -> None:
        """Ask for a stop as a signal would (for drivers and tests)."""
        if self.signum is None:
            self.signum = int(signum)
            self._first_at = time.monotonic()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is None:
            self.request(signum)
            if self.announce:
                print(
                    f"\nes-llm: {signal.Signals(signum).name} received: stopping after the "
                    "current step (send it again to abort at once)",
                    file=sys.stderr,
                    flush=True,
                )
            return
        if time.monotonic() - self._first_at <= self.grace_s:
            return  # the same stop delivered twice (terminal + launcher)
        print(
            f"\nes-llm: second {signal.Signals(signum).name}: aborting without saving",
            file=sys.stderr,
            flush=True,
        )
        os._exit(exit_code_for(signum))

    def install(self) -> StopRequest:
        if threading.current_thread() is not threading.main_thread() or self._installed:
            return self
        for sig in _HANDLED:
            self._previous[sig] = signal.signal(sig, self._handle)
        self._installed = True
        return self

    def uninstall(self) -> None:
        if not self._installed:
            return
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()
        self._installed = False

    def __enter__(self) -> StopRequest:
        return self.install()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.uninstall()

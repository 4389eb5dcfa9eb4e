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

"At once" holds inside a long torch call too. Python runs a signal handler only between
bytecodes of the main thread, so a handler would wait for a step that never ends (one
forward of a model built for a huge --seq-len). The signals are therefore read from
`signal.set_wakeup_fd`, which the interpreter's C-level handler writes the moment a signal
arrives, by a watcher thread: torch releases the GIL inside its ops, so the thread runs, sets
the flag, prints the notice and, on an insisting signal, calls `os._exit`.
"""

from __future__ import annotations

import os
import select
import signal
import sys
import threading
import time
from types import FrameType, TracebackType

__all__ = ["RunStopped", "StopRequest", "exit_code_for"]

_HANDLED = (signal.SIGINT, signal.SIGTERM)
_GATHER_S = 0.05  # signals arriving this close together are one delivery, in number order


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
    and never requests a stop. While installed it owns the interpreter's wakeup fd.
    """

    def __init__(self, *, grace_s: float = 2.0, announce: bool = True) -> None:
        self.grace_s = grace_s
        self.announce = announce
        self.signum: int | None = None
        self._first_at = 0.0
        self._previous: dict[int, object] = {}
        self._installed = False
        self._lock = threading.Lock()
        self._pipe: tuple[int, int] | None = None
        self._old_wakeup = -1
        self._watcher: threading.Thread | None = None

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
        with self._lock:
            if self.signum is None:
                self.signum = int(signum)
                self._first_at = time.monotonic()

    def _on_signal(self, signum: int) -> None:
        """One delivery of a handled signal (from the watcher thread)."""
        with self._lock:
            first = self.signum is None
            if first:
                self.signum = int(signum)
                self._first_at = time.monotonic()
            elif time.monotonic() - self._first_at <= self.grace_s:
                return  # the same stop delivered twice (terminal + launcher)
        name = signal.Signals(signum).name
        if first:
            if self.announce:
                print(
                    f"\nes-llm: {name} received: stopping after the current step (send it "
                    "again to abort at once)",
                    file=sys.stderr,
                    flush=True,
                )
            return
        print(f"\nes-llm: second {name}: aborting without saving", file=sys.stderr, flush=True)
        os._exit(exit_code_for(signum))

    def _watch(self, fd: int) -> None:
        while True:
            try:
                data = os.read(fd, 64)
            except OSError:
                return
            if not data:  # the write end is closed: uninstalled
                return
            # Ctrl-C under the launcher: the terminal's SIGINT and the launcher's SIGTERM come
            # together, in either order when different threads take them. Gather what comes
            # within a moment and take the lower number first, so such a stop is a SIGINT.
            deadline = time.monotonic() + _GATHER_S
            while (left := deadline - time.monotonic()) > 0 and select.select([fd], [], [], left)[
                0
            ]:
                more = os.read(fd, 64)
                if not more:
                    break
                data += more
            for signum in sorted(data):
                if signum in _HANDLED:
                    self._on_signal(signum)

    @staticmethod
    def _python_handler(signum: int, frame: FrameType | None) -> None:
        """Installed so that the C-level handler writes the wakeup fd (and Ctrl-C raises no
        KeyboardInterrupt); the watcher thread does the work."""

    def install(self) -> StopRequest:
        if threading.current_thread() is not threading.main_thread() or self._installed:
            return self
        r, w = os.pipe()
        os.set_blocking(w, False)
        self._pipe = (r, w)
        self._old_wakeup = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        self._watcher = threading.Thread(
            target=self._watch, args=(r,), name="es-llm-signals", daemon=True
        )
        self._watcher.start()
        for sig in _HANDLED:
            self._previous[sig] = signal.signal(sig, self._python_handler)
        self._installed = True
        return self

    def uninstall(self) -> None:
        if not self._installed:
            return
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()
        signal.set_wakeup_fd(self._old_wakeup)
        assert self._pipe is not None and self._watcher is not None
        r, w = self._pipe
        os.close(w)  # the watcher reads what is left, then EOF
        self._watcher.join(timeout=5)
        os.close(r)
        self._pipe, self._watcher = None, None
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

"""Step timers that never make the host wait for the device.

On an accelerator a span is a pair of device events (`torch.Event(device,
enable_timing=True)`, or what the `event` factory a driver passes returns) recorded on the
current stream; they are read only at the step's one host sync (`flush`), when every
event recorded before it has completed. On the CPU the work is synchronous and
`time.perf_counter` measures it directly.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported where an event is made: TIMERS stays cheap to import
    import torch

# proxy_*: scorer proxy's scoring forward and its online training (zero with other scorers)
TIMERS = (
    "score_fwd_s",
    "select_s",
    "train_fwd_bwd_s",
    "optimizer_s",
    "proxy_fwd_s",
    "proxy_train_s",
)


class StepTimers:
    """Accumulated seconds per timer name; device spans are resolved by `flush()`."""

    def __init__(self, device: torch.device, event: Callable[[], Any] | None = None) -> None:
        self.totals: dict[str, float] = dict.fromkeys(TIMERS, 0.0)
        self._events = device.type != "cpu"
        self._pending: list[tuple[str, Any, Any]] = []
        if event is None:
            import torch

            def event() -> Any:
                return torch.Event(device, enable_timing=True)

        self._new_event = event

    def _event(self) -> Any:
        ev = self._new_event()
        ev.record()
        return ev

    @contextmanager
    def span(self, name: str) -> Iterator[None]:
        if self._events:
            start = self._event()
            yield
            self._pending.append((name, start, self._event()))
            return
        t0 = time.perf_counter()
        yield
        self.totals[name] = self.totals.get(name, 0.0) + time.perf_counter() - t0

    def flush(self) -> None:
        """Add the finished device spans (call right after a host sync, or at the end)."""
        for name, start, end in self._pending:
            end.synchronize()  # already complete after the step's sync: returns at once
            self.totals[name] = self.totals.get(name, 0.0) + start.elapsed_time(end) / 1000.0
        self._pending.clear()

    def state_dict(self) -> dict[str, float]:
        self.flush()
        return dict(self.totals)

    def load_state_dict(self, d: dict[str, float]) -> None:
        self.totals.update({k: float(v) for k, v in d.items()})

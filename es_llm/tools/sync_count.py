"""Count the times the host waits for the GPU during a run (used by the GPU check).

    python -m es_llm.tools.sync_count OUT.json train [es-llm train flags...]
    python -m es_llm.tools.sync_count OUT.json plain [es_llm.tools.bench_plain flags...]

PyTorch's GPU trace hooks (the ones its CUDA sanitizer uses) report every synchronisation that
goes through PyTorch: device synchronize, stream synchronize, event synchronize, and the
copy-then-synchronize behind `.item()`, `.cpu()`, `.tolist()`, blocking host<->device copies
and data-dependent shapes (`nonzero`, boolean masks). Waits that PyTorch does not perform
(NCCL, or a C++ extension calling the CUDA runtime itself) are not seen.

Setup, evaluation and the end of a run synchronise too, so the count is read at the end of
every optimizer step (`marks`: step -> synchronisations so far) and the GPU check divides the
difference between two steps' marks by the steps between them (`per_step_from_marks`): one run
per job. `es-llm train` is marked when it writes a step record (`MetricsWriter.write`), the
plain loop through its `on_step` callback.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

KINDS = ("device", "stream", "event")


class SyncCounter:
    """Synchronisations by kind, and the running total at the end of each marked step."""

    def __init__(self) -> None:
        self.counts = dict.fromkeys(KINDS, 0)
        self.marks: list[tuple[int, int]] = []
        self.active = False

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def bump(self, kind: str) -> Callable[..., None]:
        def cb(*_: Any) -> None:
            self.counts[kind] += 1

        return cb

    def mark(self, step: int) -> None:
        self.marks.append((int(step), self.total))

    def activate(self) -> bool:
        """Switch PyTorch's GPU trace on and count; False (counting nothing) without CUDA.

        The trace stays on for the rest of the process (it cannot be switched off) and costs
        time at every allocation, so count in a process, or at the end of one, whose timings
        no longer matter.
        """
        if not torch.cuda.is_available():
            return False
        from torch.cuda import _gpu_trace

        torch._C._activate_gpu_trace()
        _gpu_trace.register_callback_for_device_synchronization(self.bump("device"))
        _gpu_trace.register_callback_for_stream_synchronization(self.bump("stream"))
        _gpu_trace.register_callback_for_event_synchronization(self.bump("event"))
        self.active = True
        return True

    def record(self, **extra: Any) -> dict[str, Any]:
        """The JSON record of the count; `syncs`/`by_kind` are None when nothing was counted."""
        return {
            **extra,
            "syncs": self.total if self.active else None,
            "by_kind": dict(self.counts) if self.active else None,
            "marks": [list(m) for m in self.marks] if self.active else [],
        }


def count_syncs(fn: Callable[[], Any]) -> tuple[Any, dict[str, int] | None]:
    """Run `fn()`; return its result and the synchronisations by kind (None without CUDA)."""
    counter = SyncCounter()
    if not counter.activate():
        return fn(), None
    return fn(), dict(counter.counts)


@contextlib.contextmanager
def marking_train_steps(counter: SyncCounter) -> Iterator[None]:
    """Mark `counter` each time `es-llm train` writes a step record (in this process)."""
    from es_llm.drivers.deepspeed.metrics import MetricsWriter

    original = MetricsWriter.write

    def write(self: MetricsWriter, record: dict[str, Any]) -> None:
        original(self, record)
        if record.get("type", "step") == "step" and "step" in record:
            counter.mark(record["step"])

    MetricsWriter.write = write  # type: ignore[method-assign]
    try:
        yield
    finally:
        MetricsWriter.write = original  # type: ignore[method-assign]


def per_step_from_marks(marks: Iterable[Sequence[int]], first: int, last: int) -> float | None:
    """Synchronisations per optimizer step between the ends of steps `first` and `last`.

    None when either step was not marked (no CUDA, or the run stopped early)."""
    at = {int(step): int(count) for step, count in marks}
    if first not in at or last not in at or last <= first:
        return None
    return (at[last] - at[first]) / (last - first)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 2 or args[1] not in ("train", "plain"):
        print(__doc__, file=sys.stderr)
        return 2
    out, what, rest = Path(args[0]), args[1], args[2:]
    counter = SyncCounter()
    counter.activate()
    if what == "train":
        from es_llm.cli import main as cli_main

        with marking_train_steps(counter):
            rc = cli_main(["train", *rest])
    else:
        from es_llm.tools.bench_plain import main as plain_main

        rc = plain_main(rest, on_step=counter.mark)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(counter.record(job=what, args=rest, returncode=rc), indent=2))
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())

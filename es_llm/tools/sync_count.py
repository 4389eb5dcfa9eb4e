"""Count the times the host waits for the GPU during a run (used by the GPU check).

    python -m es_llm.tools.sync_count OUT.json train [es-llm train flags...]
    python -m es_llm.tools.sync_count OUT.json plain [es_llm.tools.bench_plain flags...]

PyTorch's GPU trace hooks (the ones its CUDA sanitizer uses) report every synchronisation that
goes through PyTorch: device synchronize, stream synchronize, event synchronize, and the
copy-then-synchronize behind `.item()`, `.cpu()`, `.tolist()`, blocking host<->device copies
and data-dependent shapes (`nonzero`, boolean masks). Waits that PyTorch does not perform
(NCCL, or a C++ extension calling the CUDA runtime itself) are not seen. Setup, evaluation
and the end of a run synchronise too, so the GPU check runs each job twice with different step
counts and divides the difference by the difference in steps (`per_step`).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

KINDS = ("device", "stream", "event")


def count_syncs(fn: Callable[[], Any]) -> tuple[Any, dict[str, int] | None]:
    """Run `fn()`; return its result and the synchronisations by kind (None without CUDA).

    Activates PyTorch's GPU trace for the rest of the process (it cannot be switched off),
    so call it in a process of its own.
    """
    if not torch.cuda.is_available():
        return fn(), None
    from torch.cuda import _gpu_trace

    counts = dict.fromkeys(KINDS, 0)

    def bump(kind: str) -> Callable[..., None]:
        def cb(*_: Any) -> None:
            counts[kind] += 1

        return cb

    torch._C._activate_gpu_trace()
    _gpu_trace.register_callback_for_device_synchronization(bump("device"))
    _gpu_trace.register_callback_for_stream_synchronization(bump("stream"))
    _gpu_trace.register_callback_for_event_synchronization(bump("event"))
    result = fn()
    return result, counts


def per_step(short: dict[str, Any], long: dict[str, Any]) -> float | None:
    """Synchronisations per optimizer step from two runs that differ only in their length."""
    if short.get("syncs") is None or long.get("syncs") is None:
        return None
    d_steps = long["steps"] - short["steps"]
    if d_steps <= 0:
        return None
    return (long["syncs"] - short["syncs"]) / d_steps


def _steps_from_summary(out_dir: str | None) -> int | None:
    if out_dir is None:
        return None
    path = Path(out_dir) / "summary.json"
    return json.loads(path.read_text())["steps"] if path.is_file() else None


def _flag(args: list[str], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args[:-1] else None


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 2 or args[1] not in ("train", "plain"):
        print(__doc__, file=sys.stderr)
        return 2
    out, what, rest = Path(args[0]), args[1], args[2:]
    if what == "train":
        from es_llm.cli import main as cli_main

        rc, counts = count_syncs(lambda: cli_main(["train", *rest]))
    else:
        from es_llm.tools.bench_plain import main as plain_main

        rc, counts = count_syncs(lambda: plain_main(rest))
    record = {
        "job": what,
        "args": rest,
        "returncode": rc,
        "steps": _steps_from_summary(_flag(rest, "--out")),
        "syncs": None if counts is None else sum(counts.values()),
        "by_kind": counts,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2))
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())

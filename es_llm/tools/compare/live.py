"""What `es-llm compare` prints while a run trains: its evaluations as they are written.

The child writes one JSON record a line to DIR/<name>/metrics.jsonl (flushed per record);
`MetricsFollower` reads what was appended since the last poll, keeping a line that is not
complete yet for the next one. `eval_line` and `done_line` are the lines printed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

__all__ = ["MetricsFollower", "done_line", "eval_line"]

NAME_WIDTH = 16


class MetricsFollower:
    """The records appended to a metrics.jsonl since the previous `poll` (tail -f, in Python).

    The file may not exist yet (the child is starting); a last line without its newline is
    kept back until it is complete. A complete line that is not JSON is a bug in the writer
    and raises.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.offset = 0
        self._partial = b""

    def poll(self) -> list[dict[str, Any]]:
        try:
            with self.path.open("rb") as fh:
                if fh.seek(0, 2) < self.offset:  # rewritten from the start: read it again
                    self.offset, self._partial = 0, b""
                fh.seek(self.offset)
                chunk = fh.read()
        except FileNotFoundError:
            return []
        self.offset += len(chunk)
        data = self._partial + chunk
        *lines, self._partial = data.split(b"\n")
        return [json.loads(line) for line in lines if line.strip()]


def _loss(x: float | None) -> str:
    return "—" if x is None or not math.isfinite(x) else f"{x:.4f}"


def eval_line(name: str, rec: dict[str, Any], best: float | None) -> str:
    """One evaluation of a run: step, epoch, loss, best so far and the training clock."""
    return (
        f"      {name:<{NAME_WIDTH}} step {rec['step']:>5}  epoch {rec['epoch'] + 1:>2}  "
        f"val {_loss(rec.get('val_loss'))}  best {_loss(best)}  "
        f"train {rec['wall_clock_s']:.1f}s wall / {rec['cpu_time_s']:.1f}s CPU"
    )


def done_line(
    name: str, summary: dict[str, Any], best: dict[str, Any] | None, took_s: float
) -> str:
    """A finished run: best and final loss, training time, and the time with start-up."""
    at = "" if best is None else f" at step {best['step']}"
    return (
        f"      {name:<{NAME_WIDTH}} done: best val {_loss(None if best is None else best['val_loss'])}"
        f"{at}, final {_loss(summary['final_val_loss'])}; train {summary['wall_clock_s']:.1f}s "
        f"wall / {summary['cpu_time_s']:.1f}s CPU ({took_s:.0f}s with start-up and evaluation)"
    )

"""What a run leaves behind: metrics.jsonl (one line per step), summary.json, a loss plot.

Only rank 0 writes. Files are written so that a reader never sees half a JSON document:
metrics lines are appended and flushed one by one, summary.json is replaced atomically.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any


def _clean(value: Any) -> Any:
    """JSON has no NaN/inf: write them as null rather than invalid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def write_json_atomic(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(_clean(data), indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


class MetricsWriter:
    """Appends one JSON object per line to OUT/metrics.jsonl."""

    def __init__(self, path: Path, *, append: bool = False) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._fh = path.open("a" if append else "w", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self._fh.write(json.dumps(_clean(record)) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def plot_loss_curves(metrics_path: Path, out_png: Path, title: str) -> None:
    """Training loss against step and validation loss against wall-clock, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_jsonl(metrics_path)
    steps = [r for r in rows if r.get("type", "step") == "step" and r.get("train_loss") is not None]
    evals = [r for r in rows if r.get("type") == "eval" and r.get("val_loss") is not None]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.plot([r["step"] for r in steps], [r["train_loss"] for r in steps], lw=0.8, label="train")
    ax1.set_xlabel("optimizer step")
    ax1.set_ylabel("loss (nats/token)")
    ax1.set_title("training loss of the trained batch")
    ax1.grid(alpha=0.3)
    if evals:
        ax2.plot([r["wall_clock_s"] for r in evals], [r["val_loss"] for r in evals], "o-", ms=3)
    ax2.set_xlabel("training wall-clock (s)")
    ax2.set_ylabel("validation loss (nats/token)")
    ax2.set_title("held-out validation loss")
    ax2.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)

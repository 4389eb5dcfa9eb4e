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


TRAIN_COLOR = "#9ecae1"  # raw per-step training loss (light blue)
SMOOTH_COLOR = "#08519c"  # its moving average (dark blue)
VAL_COLOR = "#e6550d"  # validation loss (orange)
EPOCH_COLOR = "#636363"  # epoch boundaries (grey)


def _moving_average(values: list[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def epoch_boundaries(steps: list[dict[str, Any]]) -> list[tuple[float, int]]:
    """(x position between two steps, number of the epoch that starts) for each epoch change."""
    marks = []
    for prev, cur in zip(steps, steps[1:], strict=False):
        if cur.get("epoch") is not None and cur.get("epoch") != prev.get("epoch"):
            marks.append(((prev["step"] + cur["step"]) / 2, int(cur["epoch"]) + 1))
    return marks


def _interp(x: float, xs: list[float], ys: list[float]) -> float:
    """Linear interpolation of ys at x (xs increasing)."""
    for (x0, y0), (x1, y1) in zip(
        zip(xs, ys, strict=True), zip(xs[1:], ys[1:], strict=True), strict=False
    ):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return ys[-1] if x > xs[-1] else ys[0]


def _mark_epochs(ax: Any, marks: list[tuple[float, int]]) -> None:
    """Dashed vertical lines, each labelled with the epoch that starts there."""
    for n, (x, epoch) in enumerate(marks):
        ax.axvline(x, color=EPOCH_COLOR, ls="--", lw=1, label="epoch boundary" if n == 0 else None)
        ax.annotate(
            f"epoch {epoch}",
            (x, 0),
            xycoords=("data", "axes fraction"),
            xytext=(3, 4),
            textcoords="offset points",
            color=EPOCH_COLOR,
            fontsize=8,
        )


def curve_points(evals: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The evaluations of the validation curve: every one on the fixed subset (its loss is
    `val_subset_loss`; records without it, from older runs, count with `val_loss`), one per
    step (a later record at the same step replaces an earlier one)."""
    by_step: dict[Any, dict[str, Any]] = {}
    for r in evals:
        loss = r.get("val_subset_loss", r.get("val_loss"))
        if loss is not None:
            by_step[r["step"]] = {**r, "curve_loss": loss}
    return list(by_step.values())


def _plot_validation(ax: Any, evals: list[dict[str, Any]], x_key: str) -> None:
    """The validation curve (one marker per evaluation, on the fixed subset) against `x_key`
    of the eval records, and each evaluation of the whole split as a larger marker."""
    points = curve_points(evals)
    if points:
        size = points[-1].get("subset_sequences")
        if size is None:  # an older run: every evaluation was the whole split
            what = "whole split"
        elif all(r.get("set") == "full" for r in points):  # the subset is the whole split
            what = f"whole split, {size} sequences"
        else:
            what = f"fixed subset of {size} sequences"
        ax.plot(
            [r[x_key] for r in points],
            [r["curve_loss"] for r in points],
            "o-",
            color=VAL_COLOR,
            ms=5,
            lw=1.8,
            label=f"validation loss ({what})",
        )
    whole = [r for r in evals if r.get("set") == "full" and r.get("val_subset_loss") is not None]
    whole = [r for r in whole if r.get("sequences") != r.get("subset_sequences")]
    if whole:
        ax.plot(
            [r[x_key] for r in whole],
            [r["val_loss"] for r in whole],
            "D",
            color=VAL_COLOR,
            mfc="white",
            ms=8,
            mew=1.8,
            label=f"validation loss (whole split, {whole[-1]['sequences']} sequences)",
        )


def plot_title(
    method: str, model: str, data: str | None, *, train: int, val: int, seq_len: int, world: int
) -> str:
    """What ran, for the plot's title: method, model, data, sizes, ranks."""
    ranks = f"{world} rank{'s' if world != 1 else ''}"
    data = data or "stdlib"
    if len(data) > 48:  # a long path: its end says the most
        data = "…" + data[-47:]
    return (
        f"es-llm {method} · model {model} · data {data} · {train} train / {val} "
        f"validation sequences of {seq_len} tokens · {ranks}"
    )


def plot_loss_curves(metrics_path: Path, out_png: Path, title: str) -> None:
    """Loss against optimizer step (training, its moving average and validation, epoch
    boundaries marked) and, in a second panel, the same against training wall-clock."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_jsonl(metrics_path)
    steps = [r for r in rows if r.get("type", "step") == "step" and r.get("train_loss") is not None]
    evals = [r for r in rows if r.get("type") == "eval" and r.get("val_loss") is not None]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    window = max(1, len(steps) // 25)
    train = [r["train_loss"] for r in steps]
    smooth = _moving_average(train, window)
    step_x = [r["step"] for r in steps]
    clock_x = [r.get("wall_clock_s") for r in steps]
    ax1.plot(step_x, train, color=TRAIN_COLOR, lw=0.8, label="training loss (selected batch)")
    if window > 1:
        ax1.plot(step_x, smooth, color=SMOOTH_COLOR, lw=1.8, label=f"training, mean of {window}")
    _plot_validation(ax1, evals, "step")
    marks = epoch_boundaries(steps)
    _mark_epochs(ax1, marks)
    ax1.set_xlabel("optimizer step")
    ax1.set_ylabel("loss (nats/token)")
    ax1.set_title("loss against optimizer step")
    ax1.grid(alpha=0.3)
    ax1.legend(loc="best", fontsize=8)

    if all(c is not None for c in clock_x):
        ax2.plot(clock_x, smooth, color=SMOOTH_COLOR, lw=1.8, label="training (mean)")
    _plot_validation(ax2, evals, "wall_clock_s")
    if marks and all(c is not None for c in clock_x):  # the same boundaries, in seconds
        _mark_epochs(ax2, [(_interp(x, step_x, clock_x), e) for x, e in marks])
    ax2.set_xlabel("training wall-clock (s, evaluation excluded)")
    ax2.set_ylabel("loss (nats/token)")
    ax2.set_title("loss against training time")
    ax2.grid(alpha=0.3)
    ax2.legend(loc="best", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110, metadata={"Title": title})
    plt.close(fig)

"""The loss plot: validation on the step axis, a wall-clock panel, epoch boundaries marked."""

from __future__ import annotations

import json
import math

import numpy as np
from matplotlib import colors
from matplotlib import image as mpimg

from es_llm.drivers.deepspeed.metrics import (
    EPOCH_COLOR,
    SMOOTH_COLOR,
    TRAIN_COLOR,
    VAL_COLOR,
    epoch_boundaries,
    plot_loss_curves,
)


def _write_metrics(path, steps_per_epoch: int = 40, epochs: int = 3) -> None:
    rows = [{"type": "eval", "step": 0, "epoch": 0, "val_loss": 8.3, "wall_clock_s": 0.0}]
    step = 0
    for epoch in range(epochs):
        for _ in range(steps_per_epoch):
            step += 1
            loss = 3 + 5 * math.exp(-step / 30) + 0.2 * math.sin(step)
            rows.append({"type": "step", "step": step, "epoch": epoch, "train_loss": loss,
                         "wall_clock_s": 0.5 * step})  # fmt: skip
        rows.append({"type": "eval", "step": step, "epoch": epoch, "val_loss": 3.2 + 3 / (epoch + 1),
                     "wall_clock_s": 0.5 * step})  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _has_colour(img: np.ndarray, hex_colour: str, tol: float = 0.03) -> int:
    """How many pixels are within ``tol`` of the colour (on every channel)."""
    target = np.array(colors.to_rgb(hex_colour))
    return int((np.abs(img[..., :3] - target) < tol).all(axis=-1).sum())


def test_epoch_boundaries_sit_between_the_last_and_first_step():
    steps = [{"step": s, "epoch": 0 if s <= 3 else 1} for s in range(1, 7)]
    assert epoch_boundaries(steps) == [(3.5, 2)]
    assert epoch_boundaries(steps[:3]) == []


def test_the_plot_shows_training_validation_and_epochs(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    _write_metrics(metrics)
    png = tmp_path / "loss_curve.png"
    plot_loss_curves(metrics, png, "es on synthetic metrics")
    img = mpimg.imread(png)
    height, width = img.shape[:2]
    assert (width, height) == (1320, 495)
    for name, colour in [("train", TRAIN_COLOR), ("mean", SMOOTH_COLOR), ("validation", VAL_COLOR),
                         ("epoch", EPOCH_COLOR)]:  # fmt: skip
        assert _has_colour(img, colour) > 50, name
    # both panels hold curves: the validation colour is in the left and in the right half
    assert _has_colour(img[:, : width // 2], VAL_COLOR) > 30
    assert _has_colour(img[:, width // 2 :], VAL_COLOR) > 30
    # the epoch marks are dashed grey vertical lines (anti-aliased over 2 pixel columns), two
    # per panel; the black axis frame and the light grid do not count as grey here
    rgb = img[..., :3]
    neutral = (rgb.max(axis=-1) - rgb.min(axis=-1)) < 0.03
    grey = neutral & (rgb.mean(axis=-1) > 0.2) & (rgb.mean(axis=-1) < 0.85)
    per_column = grey.sum(axis=0)
    for half in (per_column[: width // 2], per_column[width // 2 :]):
        tall = np.flatnonzero(half > 0.25 * height)
        assert len(tall) >= 2 and tall.max() - tall.min() > 0.2 * width // 2, tall
    quantised = np.round(img[..., :3] * 15).reshape(-1, 3)
    assert len(np.unique(quantised, axis=0)) > 20  # not a blank canvas


def test_a_run_without_evaluations_still_plots(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(json.dumps({"type": "step", "step": 1, "epoch": 0, "train_loss": 5.0,
                                   "wall_clock_s": 1.0}) + "\n")  # fmt: skip
    png = tmp_path / "p.png"
    plot_loss_curves(metrics, png, "one step")
    assert _has_colour(mpimg.imread(png), VAL_COLOR) == 0


def test_the_curve_is_the_fixed_subset_and_the_whole_split_is_marked(tmp_path):
    from PIL import Image

    from es_llm.drivers.deepspeed.metrics import curve_points, plot_title

    evals = [
        {"type": "eval", "step": s, "epoch": 0, "set": "subset", "sequences": 256,
         "val_loss": 6 - s / 10, "val_subset_loss": 6 - s / 10, "subset_sequences": 256,
         "wall_clock_s": float(s)}
        for s in range(0, 40, 4)
    ]  # fmt: skip
    evals.append({"type": "eval", "step": 40, "epoch": 0, "set": "full", "sequences": 1511,
                  "val_loss": 2.05, "val_subset_loss": 2.0, "subset_sequences": 256,
                  "wall_clock_s": 40.0})  # fmt: skip
    points = curve_points(evals)
    assert [p["step"] for p in points] == list(range(0, 44, 4))
    assert points[-1]["curve_loss"] == 2.0  # the subset's loss, not the whole split's
    old = [{"type": "eval", "step": 5, "val_loss": 3.0}]  # a run from before the subset
    assert curve_points(old)[0]["curve_loss"] == 3.0

    steps = [{"type": "step", "step": s, "epoch": 0, "train_loss": 6 - s / 9,
              "wall_clock_s": float(s)} for s in range(1, 41)]  # fmt: skip
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(r) + "\n" for r in steps + evals))
    title = plot_title("eswp", "gpt2-tiny", None, train=8192, val=1511, seq_len=128, world=2)
    assert title == ("es-llm eswp · model gpt2-tiny · data stdlib · 8192 train / 1511 "
                     "validation sequences of 128 tokens · 2 ranks")  # fmt: skip
    png = tmp_path / "loss_curve.png"
    plot_loss_curves(metrics, png, title)
    assert Image.open(png).text["Title"] == title  # what ran travels with the picture
    assert _has_colour(mpimg.imread(png), VAL_COLOR) > 50
    long = plot_title("es", "m", "/data/" + "x" * 80 + "/corpus.jsonl", train=1, val=1,
                      seq_len=8, world=1)  # fmt: skip
    assert "…" in long and long.endswith("/corpus.jsonl · 1 train / 1 validation sequences "
                                         "of 8 tokens · 1 rank")  # fmt: skip

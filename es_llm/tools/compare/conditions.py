"""The machine conditions each run of a comparison saw, and when they differ too much to trust
the time ratios.

Time ratios between runs that ran one after another on a shared machine only mean something
when the machine gave every run about the same speed. Two measures per run:

- a calibration: a fixed small matmul on one CPU thread, timed in the parent just before the
  run starts (the median of `CALIBRATION_REPEATS` timings, well under a second in all on a
  loaded 2-core CPU). It stays on the CPU on a GPU machine too: the parent must not hold a
  CUDA context (and its memory) while the runs train, and a host slowed by other jobs slows
  the runs' data path and kernel launches there as well;
- the 1-minute load average, sampled while the run trains (its mean, first and last).

`differing_conditions` applies the rule: the runs' conditions differ clearly when the
slowest calibration is more than `CALIBRATION_TOLERANCE` (25%) slower than the fastest, or
the mean load averages differ by more than half the machine's core count.
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Any

__all__ = [
    "CALIBRATION_TOLERANCE",
    "LoadSampler",
    "calibrate",
    "differing_conditions",
]

CALIBRATION_SIZE = 256  # a 256 x 256 float32 matmul: ~34 MFLOP, a few ms on one CPU core
CALIBRATION_REPEATS = 15
CALIBRATION_TOLERANCE = 0.25
LOAD_TOLERANCE_PER_CORE = 0.5


def calibrate() -> float:
    """Seconds of four fixed 256 x 256 matmuls on one CPU thread (the median of 15 timings,
    after a warm-up)."""
    import torch

    gen = torch.Generator().manual_seed(0)
    a = torch.randn(CALIBRATION_SIZE, CALIBRATION_SIZE, generator=gen)
    b = torch.randn(CALIBRATION_SIZE, CALIBRATION_SIZE, generator=gen)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        times = []
        for i in range(CALIBRATION_REPEATS + 1):
            t0 = time.perf_counter()
            for _ in range(4):
                c = a @ b
            if i:  # the first is the warm-up
                times.append(time.perf_counter() - t0)
        del c
    finally:
        torch.set_num_threads(threads)
    return statistics.median(times)


def _load1() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


class LoadSampler:
    """The 1-minute load average, sampled by the parent while a run trains."""

    def __init__(self) -> None:
        self.samples: list[float] = []

    def sample(self) -> None:
        value = _load1()
        if value is not None:
            self.samples.append(value)

    def summary(self) -> dict[str, Any]:
        s = self.samples
        return {
            "load_average_mean": round(statistics.fmean(s), 2) if s else None,
            "load_average_first": s[0] if s else None,
            "load_average_last": s[-1] if s else None,
            "load_samples": len(s),
        }


def differing_conditions(conditions: dict[str, dict[str, Any]], cpu_count: int) -> list[str]:
    """Why the runs' conditions differ clearly (empty when they do not): the slowest
    calibration over `CALIBRATION_TOLERANCE` slower than the fastest, or mean load averages
    further apart than `LOAD_TOLERANCE_PER_CORE` x the core count. `conditions` maps each run
    to its "calibration_s" and "load_average_mean" (either may be None)."""
    reasons = []
    cal = {k: c["calibration_s"] for k, c in conditions.items() if c.get("calibration_s")}
    if len(cal) >= 2:
        fast, slow = min(cal, key=cal.__getitem__), max(cal, key=cal.__getitem__)
        if cal[slow] > cal[fast] * (1 + CALIBRATION_TOLERANCE):
            reasons.append(
                f"calibration {1000 * cal[slow]:.1f} ms in {slow} vs {1000 * cal[fast]:.1f} ms "
                f"in {fast} (+{100 * (cal[slow] / cal[fast] - 1):.0f}%, more than "
                f"{100 * CALIBRATION_TOLERANCE:.0f}%)"
            )
    load = {
        k: c["load_average_mean"]
        for k, c in conditions.items()
        if c.get("load_average_mean") is not None
    }
    if len(load) >= 2:
        lo, hi = min(load, key=load.__getitem__), max(load, key=load.__getitem__)
        limit = LOAD_TOLERANCE_PER_CORE * max(1, cpu_count)
        if load[hi] - load[lo] > limit:
            reasons.append(
                f"mean load average {load[hi]:.2f} in {hi} vs {load[lo]:.2f} in {lo} (apart "
                f"by more than {limit:g}, half the {cpu_count} cores)"
            )
    return reasons

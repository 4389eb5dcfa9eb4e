"""When a run evaluates, and on what: a validation curve worth plotting at a bounded cost.

A curve needs points spread over the run, all on the same sequences, and each point must be
cheap; the final number must be the whole validation split. So:

- at the start and at about `points` steps spread evenly over the planned run (or every
  `every` steps when given), and at each epoch end, the run evaluates a *fixed subset*: the
  first `subset` sequences of the validation split (all of it when it is smaller);
- at the end it evaluates the whole validation split, which also yields the subset's loss
  (the same rows), so the curve has its last point;
- at a signalled stop it evaluates the subset only: the launcher gives the ranks seconds.

The subset is a prefix, so it is the same on every run of the same data, resumed or not.
"""

from __future__ import annotations

DEFAULT_POINTS = 10
DEFAULT_SUBSET = 256

__all__ = ["DEFAULT_POINTS", "DEFAULT_SUBSET", "eval_steps", "subset_size"]


def eval_steps(
    total_steps: int, *, points: int = DEFAULT_POINTS, every: int | None = None
) -> set[int]:
    """The optimizer steps after which the subset is evaluated (the start and the end apart).

    `every` (--eval-every) wins when given; otherwise `points` steps spread evenly over
    `total_steps`, the last one being the end (evaluated on the full split instead).
    """
    if total_steps < 1:
        return set()
    if every is not None:
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        return set(range(every, total_steps, every))
    if points < 1:
        return set()
    steps = {round(k * total_steps / points) for k in range(1, points)}
    return {s for s in steps if 0 < s < total_steps}


def subset_size(val_sequences: int, subset: int = DEFAULT_SUBSET) -> int:
    """Sequences in the fixed validation subset: the first `subset`, or all of them."""
    if subset < 1:
        raise ValueError(f"subset must be >= 1, got {subset}")
    return min(subset, val_sequences)

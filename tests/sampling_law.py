"""The exact law of a weighted draw without replacement, for the selection-law tests."""

from __future__ import annotations

import itertools

import numpy as np


def successive_sampling_inclusion(w: list[float], k: int) -> np.ndarray:
    """Exact inclusion probabilities of k draws without replacement, P ~ w (w = 0: never)."""
    n = len(w)
    incl = np.zeros(n)
    for order in itertools.permutations([i for i in range(n) if w[i] > 0], k):
        p, left = 1.0, sum(w)
        for i in order:
            p *= w[i] / left
            left -= w[i]
        incl[list(order)] += p
    return incl

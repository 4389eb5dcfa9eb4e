"""Step schedule: BURN_IN (uniform, scores fill for free) -> SELECT -> ANNEAL (uniform).

Why a pure function of (step, totals, cfg): a resumed run must land in the same phase
without any saved schedule state.
"""

from __future__ import annotations

import math
from enum import Enum

from es_llm.config import EvolvedSamplingConfig

__all__ = ["Phase", "anneal_start_step", "phase_for_step", "resolve_burn_in_steps"]


class Phase(Enum):
    BURN_IN = "burn_in"
    SELECT = "select"
    ANNEAL = "anneal"


def _ceil(x: float) -> int:
    """ceil that ignores float noise such as 0.1 * 100 = 10.000000000000002."""
    return math.ceil(round(x, 9))


def resolve_burn_in_steps(
    cfg: EvolvedSamplingConfig, total_steps: int, steps_per_epoch: int
) -> int:
    """burn_in_steps, else burn_in_epochs * steps_per_epoch, else ceil(1% of total); <= total."""
    if cfg.burn_in_steps is not None:
        steps = cfg.burn_in_steps
    elif cfg.burn_in_epochs is not None:
        steps = cfg.burn_in_epochs * steps_per_epoch
    else:
        steps = _ceil(0.01 * total_steps)
    return max(0, min(int(steps), int(total_steps)))


def anneal_start_step(cfg: EvolvedSamplingConfig, total_steps: int) -> int:
    """First step of the ANNEAL phase: the last ceil(anneal_fraction * total) steps anneal."""
    return int(total_steps) - min(int(total_steps), _ceil(cfg.anneal_fraction * total_steps))


def phase_for_step(
    step: int, total_steps: int, cfg: EvolvedSamplingConfig, steps_per_epoch: int
) -> Phase:
    """Phase of 0-based `step`. Burn-in takes precedence if the two windows overlap."""
    if step < resolve_burn_in_steps(cfg, total_steps, steps_per_epoch):
        return Phase.BURN_IN
    if step >= anneal_start_step(cfg, total_steps):
        return Phase.ANNEAL
    return Phase.SELECT

"""Step schedule: BURN_IN (uniform, scores fill for free) -> SELECT -> ANNEAL (uniform).

Why a pure function of (step, totals, cfg): a resumed run must land in the same phase
without any saved schedule state.
"""

from __future__ import annotations

import math
from enum import Enum

from es_llm.sampling.config import EvolvedSamplingConfig
from es_llm.sampling.pruning import anneal_epoch

__all__ = [
    "Phase",
    "anneal_start_step",
    "estimate_total_steps",
    "phase_for_step",
    "resolve_burn_in_steps",
]


class Phase(Enum):
    BURN_IN = "burn_in"
    SELECT = "select"
    ANNEAL = "anneal"
    PLAIN = "plain"  # a method without a scoring pass (uniform, prune): every step is plain


def _ceil(x: float) -> int:
    """ceil that ignores float noise such as 0.1 * 100 = 10.000000000000002."""
    return math.ceil(round(x, 9))


def resolve_burn_in_steps(
    cfg: EvolvedSamplingConfig, total_steps: int, steps_per_epoch: int
) -> int:
    """burn_in_steps, else burn_in_epochs * steps_per_epoch, else ceil(1% of total); <= total.

    ``steps_per_epoch`` counts *plain* steps (batches of B): a burn-in epoch trains every
    sample of the epoch once, whatever the selection ratio of the steps after it.
    """
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


def _expected_kept(cfg: EvolvedSamplingConfig, epoch: int, epochs: int, min_local: int) -> int:
    """Samples of `epoch` a rank can draw: all, or for a pruned epoch the expected kept share
    (half of the samples lie below the mean, each pruned with probability prune_ratio)."""
    if cfg.uses_pruning and 0 < epoch < anneal_epoch(cfg.delta, epochs):
        return int(min_local * (1 - 0.5 * cfg.prune_ratio))
    return min_local


def _count_steps(
    cfg: EvolvedSamplingConfig,
    planned: int,
    *,
    min_local: int,
    train_per_rank: int,
    meta_per_rank: int,
    epochs: int,
) -> int:
    """Steps the training loop takes when its schedule is planned for `planned` steps.

    Replays the loop's draw: a SELECT step takes `meta_per_rank` samples of the epoch, a
    burn-in / anneal / plain step `train_per_rank`; an epoch ends when the next step no
    longer fits.
    """
    scoring = cfg.uses_scoring_forward
    plain_steps_per_epoch = max(1, min_local // train_per_rank)
    step = 0
    for epoch in range(epochs):
        available = _expected_kept(cfg, epoch, epochs, min_local)
        pos = 0
        while True:
            selecting = (
                scoring
                and phase_for_step(step, planned, cfg, plain_steps_per_epoch) == Phase.SELECT
            )
            need = meta_per_rank if selecting else train_per_rank
            if pos + need > available:
                break
            pos += need
            step += 1
    return step


def estimate_total_steps(
    cfg: EvolvedSamplingConfig,
    *,
    min_local: int,
    train_per_rank: int,
    meta_per_rank: int,
    epochs: int,
    max_steps: int | None = None,
) -> int:
    """Optimizer steps of a run: the LR schedule's length and the progress bar's total.

    The one estimator of the project (training loop, Hugging Face Trainer, compare).
    `min_local` is the smallest rank shard (ranks run in lock-step). Burn-in and anneal
    steps draw B, selection steps B_meta, and the burn-in/anneal lengths depend on the
    total, so the count is the fixed point of replaying the loop's draw. It is exact for
    methods without pruning; pruned epochs count their expected kept share, because the
    real count is known only when the epoch is planned.
    """
    if min(min_local, train_per_rank, meta_per_rank, epochs) < 1:
        return 1
    kw = dict(
        min_local=min_local,
        train_per_rank=train_per_rank,
        meta_per_rank=meta_per_rank,
        epochs=epochs,
    )
    per_rank = meta_per_rank if cfg.uses_scoring_forward else train_per_rank
    planned = max(
        1, sum(_expected_kept(cfg, e, epochs, min_local) // per_rank for e in range(epochs))
    )
    # Usually a fixed point within a few rounds (burn-in is ~1% of the steps). Where the
    # replay alternates (planning for T gives T - 1 steps and T - 1 gives T), take the
    # largest T whose replay reaches T: the loop stops at the planned total, so a run then
    # takes exactly T steps.
    seen: list[int] = []
    while planned not in seen:
        seen.append(planned)
        planned = max(1, _count_steps(cfg, planned, **kw))
    cycle = seen[seen.index(planned) :]
    reachable = [t for t in cycle if _count_steps(cfg, t, **kw) >= t]
    planned = max(reachable) if reachable else min(cycle)
    total = planned
    if max_steps is not None:
        total = min(total, max_steps)
    return max(1, total)

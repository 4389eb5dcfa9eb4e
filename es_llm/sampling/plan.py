"""The run plan: everything about a run's shape that follows from its configuration.

Why one object: the batch geometry, the planned number of steps, the steps of an epoch, the
burn-in length and the scoring micro-batch follow from (DeepSpeed config, ES section,
data-parallel size, dataset size, epochs). Worked out in one place, the training loop, the
Hugging Face Trainer, `es-llm compare`, the pre-flight check and the plain-loop bench cannot
disagree about them, and the data path only reads them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from es_llm.errors import InputError
from es_llm.sampling.config import EvolvedSamplingConfig, es_config_from_ds_config
from es_llm.sampling.geometry import BatchGeometry, resolve_geometry

__all__ = ["DataPathError", "RunPlan", "plan_geometry"]


class DataPathError(InputError):
    """The data does not fit the batch geometry, or a saved state does not fit this run."""


def plan_geometry(
    ds_config: dict[str, Any], es: EvolvedSamplingConfig, dp_size: int
) -> BatchGeometry:
    """The batch geometry of `ds_config` for `dp_size` data-parallel ranks and `es`'s ratio
    (the first step of `RunPlan.build`, for checks made before the data is read)."""
    return resolve_geometry(ds_config, int(dp_size), es.effective_selection_ratio)


@dataclass(frozen=True)
class RunPlan:
    """One run's shape (see the module doc). Build it with `RunPlan.build`."""

    es: EvolvedSamplingConfig
    geo: BatchGeometry
    num_samples: int  # N: rows of the training set (global ids 0..N-1)
    epochs: int
    seed: int  # the ES seed (the section's, else the run's)
    max_steps: int | None
    min_local: int  # the smallest data-parallel shard (ranks run in lock-step)
    total_steps: int  # planned optimizer steps: the LR schedule's length
    steps_per_epoch: int  # steps of an unpruned epoch at the run's draw size
    plain_steps_per_epoch: int  # the same at B (burn-in epochs count these)
    burn_in_steps: int
    scoring_micro_batch: int  # samples per no-grad scoring forward

    @property
    def dp_size(self) -> int:
        return self.geo.world

    @property
    def draw_per_rank(self) -> int:
        """Samples a rank draws in the run's largest step (B_meta/W when scoring, else B/W)."""
        return self.geo.meta_per_rank if self.es.uses_scoring_forward else self.geo.train_per_rank

    @classmethod
    def build(
        cls,
        ds_config: dict[str, Any],
        es: EvolvedSamplingConfig | None = None,
        *,
        dp_size: int,
        num_samples: int,
        epochs: int,
        seed: int = 0,
        max_steps: int | None = None,
    ) -> RunPlan:
        """Plan a run. `es` defaults to the config's `evolved_sampling` section (uniform
        when it has none); `seed` is the run's seed (the section's own seed wins)."""
        # here, not at the top: the pre-flight check imports this module and must not load
        # torch (the schedule's pruning import does) before the run starts
        from es_llm.sampling.schedule import estimate_total_steps, resolve_burn_in_steps

        if es is None:
            es = es_config_from_ds_config(ds_config) or EvolvedSamplingConfig(method="uniform")
        if epochs < 1:
            raise InputError(f"epochs must be >= 1, got {epochs}")
        if max_steps is not None and max_steps < 1:
            raise InputError(f"max_steps must be >= 1, got {max_steps}")
        geo = plan_geometry(ds_config, es, dp_size)
        n = int(num_samples)
        if n == 0:
            raise DataPathError("the training split is empty")
        min_local = n // geo.world  # shard_range: the first N % W ranks get one row more
        scoring = es.uses_scoring_forward
        need = geo.meta_per_rank if scoring else geo.train_per_rank
        if min_local < need:
            raise DataPathError(
                f"{n} training sequences give rank shards of {min_local}, fewer than one "
                f"{'meta-' if scoring else ''}batch of {need} per rank: "
                f"use more data, a shorter --seq-len or a smaller batch"
            )
        if es.stale and round(es.epsilon * geo.train_batch) < 1:
            raise InputError(
                f"evolved_sampling.epsilon: scorer 'stale' reaches every sample through its "
                f"uniform share, but round(epsilon x B) = round({es.epsilon:g} x "
                f"{geo.train_batch}) = 0 places: set epsilon >= 1/B = {1 / geo.train_batch:.3g}"
            )
        total = estimate_total_steps(
            es,
            min_local=min_local,
            train_per_rank=geo.train_per_rank,
            meta_per_rank=geo.meta_per_rank,
            epochs=epochs,
            max_steps=max_steps,
        )
        plain_per_epoch = max(1, min_local // geo.train_per_rank)
        return cls(
            es=es,
            geo=geo,
            num_samples=n,
            epochs=int(epochs),
            seed=es.resolved_seed(seed),
            max_steps=max_steps,
            min_local=min_local,
            total_steps=total,
            steps_per_epoch=max(1, min_local // need),
            plain_steps_per_epoch=plain_per_epoch,
            burn_in_steps=resolve_burn_in_steps(es, total, plain_per_epoch) if scoring else 0,
            scoring_micro_batch=es.scoring_micro_batch_size or 2 * geo.micro,
        )

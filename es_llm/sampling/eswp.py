"""ESWP across data-parallel shards (spec sections 3-4): one global plan, planned per shard.

Why this works without moving scores between ranks: the plan of a sample depends only on
its score, the *global* mean score and a draw seeded by (seed, epoch, global id). So each rank
all-reduces the sum and count of its scored samples, then plans its own shard; the union of
the shards' plans is the plan one rank would make over the whole set. Ranks then agree on the
steps of the epoch by an all-reduce MIN (a rank's leftover samples are skipped).
The data path and the multi-process test call these same functions; every collective runs
over the communicator they are given (the data-parallel group).
"""

from __future__ import annotations

from es_llm.data.sharding import RankSampler
from es_llm.sampling.comm import Communicator
from es_llm.sampling.config import EvolvedSamplingConfig
from es_llm.sampling.pruning import EpochPlan, plan_epoch
from es_llm.sampling.scores import ScoreTable

__all__ = ["global_mean_score", "plan_epoch_global", "lockstep_available"]


def global_mean_score(comm: Communicator, table: ScoreTable) -> float:
    """Mean score over every rank's scored samples (NaN when nothing is scored anywhere)."""
    s, c = table.sum_and_count()
    total_s, total_c = comm.all_reduce_sum([s, float(c)])
    return total_s / total_c if total_c > 0 else float("nan")


def plan_epoch_global(
    comm: Communicator,
    table: ScoreTable,
    es: EvolvedSamplingConfig,
    *,
    epoch: int,
    epochs: int,
    seed: int,
) -> EpochPlan:
    """This shard's part of the global pruning plan of `epoch` (a collective: all ranks call)."""
    return plan_epoch(
        table,
        global_mean_score(comm, table),
        epoch=epoch,
        epochs=epochs,
        seed=seed,
        prune_ratio=es.prune_ratio,
        delta=es.delta,
        rescale=es.rescale,
    )


def lockstep_available(comm: Communicator, sampler: RankSampler, plan: EpochPlan | None) -> int:
    """Samples of this epoch every rank can draw: the MIN over ranks of its kept samples.

    A rank's epoch ends when its next batch would pass this count, so all ranks take the same
    number of steps whatever the batch size of each step (burn-in B, selection B_meta).
    """
    return comm.all_reduce_min_int(sampler.num_kept(plan.keep if plan is not None else None))

"""Algorithm core (layer 1): pure functions over tensors, no torch.distributed, no deepspeed."""

from es_llm.core.noise import gumbel, prune_draws, uniform01
from es_llm.core.policies import (
    METHODS,
    es_weights,
    method_weights,
    select_without_replacement,
    valid_weight_mask,
)
from es_llm.core.pruning import EpochPlan, anneal_epoch, plan_epoch
from es_llm.core.schedule import Phase, anneal_start_step, phase_for_step, resolve_burn_in_steps
from es_llm.core.scores import ScoreTable
from es_llm.core.selector import (
    Selection,
    device_digest,
    importance_weights,
    select_step,
    selection_digest,
)

__all__ = [
    "METHODS",
    "EpochPlan",
    "Phase",
    "ScoreTable",
    "Selection",
    "anneal_epoch",
    "anneal_start_step",
    "device_digest",
    "es_weights",
    "gumbel",
    "importance_weights",
    "method_weights",
    "phase_for_step",
    "plan_epoch",
    "prune_draws",
    "resolve_burn_in_steps",
    "select_step",
    "select_without_replacement",
    "selection_digest",
    "uniform01",
    "valid_weight_mask",
]

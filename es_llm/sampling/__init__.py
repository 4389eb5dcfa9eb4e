"""Engine-neutral sampling package: the ES algorithm, its state and the data path.

Nothing here imports deepspeed; the data path reaches other ranks only through the
communicator it is given. Pure tensor functions (noise, weights, selection, pruning, schedule)
sit beside the stateful parts (score table, step stream, global selection, data path).
The names below are imported on first use, so that reading the `evolved_sampling` config
(`es_llm.sampling.config`, e.g. for `es-llm --help`) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOME = {
    "EpochPlan": "es_llm.sampling.pruning",
    "METHODS": "es_llm.sampling.policies",
    "Phase": "es_llm.sampling.schedule",
    "ScoreTable": "es_llm.sampling.scores",
    "Selection": "es_llm.sampling.selector",
    "anneal_epoch": "es_llm.sampling.pruning",
    "anneal_start_step": "es_llm.sampling.schedule",
    "device_digest": "es_llm.sampling.selector",
    "es_weights": "es_llm.sampling.policies",
    "gumbel": "es_llm.sampling.noise",
    "importance_weights": "es_llm.sampling.selector",
    "method_weights": "es_llm.sampling.policies",
    "phase_for_step": "es_llm.sampling.schedule",
    "plan_epoch": "es_llm.sampling.pruning",
    "prune_draws": "es_llm.sampling.noise",
    "resolve_burn_in_steps": "es_llm.sampling.schedule",
    "select_step": "es_llm.sampling.selector",
    "select_without_replacement": "es_llm.sampling.policies",
    "selection_digest": "es_llm.sampling.selector",
    "uniform01": "es_llm.sampling.noise",
    "valid_weight_mask": "es_llm.sampling.policies",
}

__all__ = sorted(_HOME)


def __getattr__(name: str) -> Any:
    if name in _HOME:
        return getattr(importlib.import_module(_HOME[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

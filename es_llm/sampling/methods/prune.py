"""prune: uniform batches from epochs pruned as in ESWP (no scoring forward, no selection)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from es_llm.sampling.methods.base import SamplingMethod, Visit, register
from es_llm.sampling.methods.eswp import PruningOptions

if TYPE_CHECKING:
    import torch

    from es_llm.sampling.config import EvolvedSamplingConfig

__all__ = ["Prune"]


@register
class Prune(SamplingMethod):
    """Trains every drawn sample; the plain steps' losses keep the scores the pruning reads."""

    name = "prune"
    order = 2
    scoring_forward = False
    prunes_epochs = True
    options = (PruningOptions,)

    def weights(self, cfg: EvolvedSamplingConfig, visit: Visit) -> torch.Tensor:
        return visit.scores.new_ones(visit.scores.shape)

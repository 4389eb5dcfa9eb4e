"""uniform: plain data-parallel training, the baseline (no scores, no scoring forward)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from es_llm.sampling.methods.base import SamplingMethod, Visit, register

if TYPE_CHECKING:
    import torch

    from es_llm.sampling.config import EvolvedSamplingConfig

__all__ = ["Uniform"]


@register
class Uniform(SamplingMethod):
    """Every sample weighs the same; nothing is scored, not even for free on plain steps."""

    name = "uniform"
    order = 3
    scoring_forward = False
    plain_steps_update_scores = False

    def weights(self, cfg: EvolvedSamplingConfig, visit: Visit) -> torch.Tensor:
        return visit.scores.new_ones(visit.scores.shape)

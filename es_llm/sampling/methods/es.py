"""es: Evolved Sampling, w = beta1 * s + (1 - beta1) * l with s the beta2 EMA of the losses."""

from __future__ import annotations

from typing import TYPE_CHECKING

from es_llm.sampling.methods.base import SamplingMethod, Visit, register
from es_llm.sampling.methods.trim import TrimOptions

if TYPE_CHECKING:
    import torch

    from es_llm.sampling.config import EvolvedSamplingConfig

__all__ = ["ES", "es_weight"]


def es_weight(scores: torch.Tensor, losses: torch.Tensor, beta1: float) -> torch.Tensor:
    """The decoupled ES weight (spec section 2): w = beta1 * s + (1 - beta1) * l (fp32)."""
    return beta1 * scores + (1.0 - beta1) * losses


@register
class ES(SamplingMethod):
    """Draw B of the meta-batch with probability ~ the ES weight; scores are the beta2 EMA."""

    name = "es"
    order = 0
    options = (TrimOptions,)

    def weights(self, cfg: EvolvedSamplingConfig, visit: Visit) -> torch.Tensor:
        return es_weight(visit.scores, visit.losses, cfg.beta1)

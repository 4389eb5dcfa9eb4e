"""ema: draw by the updated score, w = s_new = beta2 * s + (1 - beta2) * l."""

from __future__ import annotations

from typing import TYPE_CHECKING

from es_llm.sampling.methods.base import SamplingMethod, Visit, register
from es_llm.sampling.methods.trim import TrimOptions

if TYPE_CHECKING:
    import torch

    from es_llm.sampling.config import EvolvedSamplingConfig

__all__ = ["EMA"]


@register
class EMA(SamplingMethod):
    """w = s_new (the coupled EMA; equal to es when beta1 == beta2)."""

    name = "ema"
    order = 5
    options = (TrimOptions,)

    def weights(self, cfg: EvolvedSamplingConfig, visit: Visit) -> torch.Tensor:
        return self.score_update(cfg, visit)

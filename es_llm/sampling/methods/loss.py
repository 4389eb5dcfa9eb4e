"""loss: draw by the current loss alone (ES with beta1 = 0; the score is still the EMA)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from es_llm.sampling.methods.base import SamplingMethod, Visit, register
from es_llm.sampling.methods.trim import TrimOptions

if TYPE_CHECKING:
    import torch

    from es_llm.sampling.config import EvolvedSamplingConfig

__all__ = ["Loss"]


@register
class Loss(SamplingMethod):
    """w = l."""

    name = "loss"
    order = 4
    options = (TrimOptions,)

    def weights(self, cfg: EvolvedSamplingConfig, visit: Visit) -> torch.Tensor:
        return visit.losses.clone()

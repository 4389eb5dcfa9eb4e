"""lp: learning progress, w = max(s - l, 0) + lp_floor * mean progress; the score is the last loss."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from pydantic import field_validator

from es_llm.sampling.methods.base import (
    Options,
    SamplingMethod,
    Visit,
    check_floor,
    register,
)
from es_llm.sampling.methods.trim import TrimOptions

if TYPE_CHECKING:
    import torch

    from es_llm.sampling.config import EvolvedSamplingConfig

__all__ = ["LP", "LPOptions"]


class LPOptions(Options):
    """The progress floor of method lp."""

    # accepted (unused) with every method, as before methods owned their keys
    foreign_is_error: ClassVar[bool] = False

    lp_floor: float = 0.5  # weight of a sample without progress, x the mean progress

    @field_validator("lp_floor")
    @classmethod
    def _v_lp_floor(cls, v: float) -> float:
        return check_floor("lp_floor", v)


@register
class LP(SamplingMethod):
    """Weights from es_llm.sampling.learnability.progress_weights; s keeps the last loss, so
    s - l is the progress since the previous visit (plain steps store it too)."""

    name = "lp"
    order = 7
    stale_weights = False  # s is the last loss: a stored last loss in place of l gives s - l = 0
    options = (LPOptions, TrimOptions)

    def weights(self, cfg: EvolvedSamplingConfig, visit: Visit) -> torch.Tensor:
        from es_llm.sampling.learnability import progress_weights

        return progress_weights(visit.scores, visit.losses, cfg.lp_floor)

    def score_update(self, cfg: EvolvedSamplingConfig, visit: Visit) -> torch.Tensor:
        return visit.losses.clone()

"""trim: a uniform draw among the samples left after trimming the highest losses.

Its keys, trim_top and trim_z, shape the draw of every method with a scoring forward.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from pydantic import field_validator

from es_llm.sampling.methods.base import Options, SamplingMethod, Visit, check_range, register

if TYPE_CHECKING:
    import torch

    from es_llm.sampling.config import EvolvedSamplingConfig

__all__ = ["Trim", "TrimOptions"]


class TrimOptions(Options):
    """Never select the highest losses of a meta-batch (es_llm.sampling.learnability.trim_keep)."""

    trim_top: float = 0.0  # never select this highest-loss share of a meta-batch (by rank)
    trim_z: float | None = None  # ... nor a loss above mean + trim_z * std of the meta-batch

    @field_validator("trim_top")
    @classmethod
    def _v_trim_top(cls, v: float) -> float:
        return check_range("trim_top", v, 0.0, 1.0, False, True)

    @field_validator("trim_z")
    @classmethod
    def _v_trim_z(cls, v: float | None) -> float | None:
        if v is not None and not math.isfinite(v):
            raise ValueError(f"trim_z must be a finite number or null, got {v!r}")
        return v

    @classmethod
    def foreign_error(cls, method: str, owners: tuple[str, ...]) -> str:
        return (
            f"trim_top/trim_z need the scoring forward; method {method!r} has none "
            "(use method 'trim' for a uniform draw among the untrimmed samples)"
        )

    @classmethod
    def shape_weights(
        cls, cfg: EvolvedSamplingConfig, weights: torch.Tensor, visit: Visit
    ) -> torch.Tensor:
        """w = 0 for the trimmed samples, which the draw never takes while k others are valid."""
        if not (cfg.trim_top > 0 or cfg.trim_z is not None):
            return weights
        if visit.k is None:
            raise ValueError("trimming needs k, the number of samples to select")
        import torch

        from es_llm.sampling.learnability import trim_keep

        lo = visit.losses
        ok = torch.ones_like(lo, dtype=torch.bool) if visit.valid is None else visit.valid
        keep = trim_keep(lo, ok, visit.k, top=cfg.trim_top, z=cfg.trim_z)
        return torch.where(keep, weights, torch.zeros_like(weights))


@register
class Trim(SamplingMethod):
    """w = 1 before trimming: the scoring forward serves only to find the losses to trim."""

    name = "trim"
    order = 8
    options = (TrimOptions,)

    def weights(self, cfg: EvolvedSamplingConfig, visit: Visit) -> torch.Tensor:
        return visit.scores.new_ones(visit.scores.shape)

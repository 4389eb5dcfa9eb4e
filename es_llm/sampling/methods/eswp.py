"""eswp: ES with pruning; each epoch drops part of the below-mean-score samples (keys here)."""

from __future__ import annotations

from typing import ClassVar

from pydantic import field_validator

from es_llm.sampling.methods.base import Options, check_range, register
from es_llm.sampling.methods.es import ES
from es_llm.sampling.methods.trim import TrimOptions

__all__ = ["ESWP", "PruningOptions"]


class PruningOptions(Options):
    """Epoch pruning (es_llm.sampling.pruning): read by eswp and prune."""

    # accepted with every method: shipped configs set prune_ratio beside method "es", and
    # `compare --es prune_ratio=...` passes it to every run
    foreign_is_error: ClassVar[bool] = False

    prune_ratio: float = 0.3  # share of the below-mean samples pruned per epoch
    delta: float = 0.875  # epochs from ceil(delta * epochs) on are not pruned (anneal)
    rescale: bool = True  # kept below-mean samples get loss weight 1 / (1 - prune_ratio)

    @field_validator("prune_ratio")
    @classmethod
    def _v_prune_ratio(cls, v: float) -> float:
        return check_range("prune_ratio", v, 0.0, 1.0, False, True)

    @field_validator("delta")
    @classmethod
    def _v_delta(cls, v: float) -> float:
        return check_range("delta", v, 0.0, 1.0, True, False)


@register
class ESWP(ES):
    """The ES draw on an epoch whose below-mean-score samples are partly pruned."""

    name = "eswp"
    order = 1
    prunes_epochs = True
    options = (PruningOptions, TrimOptions)

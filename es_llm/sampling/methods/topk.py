"""topk: the ES weight, but the k largest are taken instead of drawn."""

from __future__ import annotations

from es_llm.sampling.methods.base import register
from es_llm.sampling.methods.es import ES

__all__ = ["TopK"]


@register
class TopK(ES):
    """Deterministic ES: no Gumbel noise, tau ignored."""

    name = "topk"
    order = 6
    deterministic = True

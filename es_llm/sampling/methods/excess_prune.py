"""excess_prune: uniform batches from epochs pruned by the excess loss (no scoring forward).

The ESWP set-level pruning (prune_ratio, delta, rescale) with the score of a sample being its
last observed excess ``l - l_ref``: the training loss of its last plain step minus the
reference model's loss. Each epoch, samples whose excess is below the global mean (junk, on
which the reference is as bad as the model, and text the model has already learned) are
pruned with probability prune_ratio; never-observed samples are kept. No scoring forward: the
only extra cost over uniform is the reference (trained once, one no-grad pass).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from es_llm.sampling.methods.base import Visit, register
from es_llm.sampling.methods.excess import REF_LOSS
from es_llm.sampling.methods.prune import Prune

if TYPE_CHECKING:
    import torch

    from es_llm.sampling.config import EvolvedSamplingConfig

__all__ = ["ExcessPrune"]


@register
class ExcessPrune(Prune):
    """prune's uniform batches and epoch plan, with the last observed excess as the score."""

    name = "excess_prune"
    order = 10
    state = (REF_LOSS,)

    def score_update(self, cfg: EvolvedSamplingConfig, visit: Visit) -> torch.Tensor:
        """The last observed excess l - l_ref (fp32)."""
        import torch

        ref = visit.state[REF_LOSS].to(device=visit.losses.device, dtype=torch.float32)
        return visit.losses.to(torch.float32) - ref

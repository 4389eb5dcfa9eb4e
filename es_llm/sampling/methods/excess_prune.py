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

from es_llm.sampling.methods.base import SamplingMethod, Visit, register
from es_llm.sampling.methods.eswp import PruningOptions
from es_llm.sampling.methods.excess import REF_LOSS

if TYPE_CHECKING:
    import torch

    from es_llm.sampling.config import EvolvedSamplingConfig

__all__ = ["ExcessPrune"]


@register
class ExcessPrune(SamplingMethod):
    """Trains every drawn sample; its plain-step losses keep the excess the pruning reads."""

    name = "excess_prune"
    order = 10
    scoring_forward = False
    prunes_epochs = True
    state = (REF_LOSS,)
    options = (PruningOptions,)

    def weights(self, cfg: EvolvedSamplingConfig, visit: Visit) -> torch.Tensor:
        return visit.scores.new_ones(visit.scores.shape)

    def score_update(self, cfg: EvolvedSamplingConfig, visit: Visit) -> torch.Tensor:
        """The last observed excess l - l_ref (fp32)."""
        import torch

        ref = visit.state[REF_LOSS].to(device=visit.losses.device, dtype=torch.float32)
        return visit.losses.to(torch.float32) - ref

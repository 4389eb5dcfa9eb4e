"""The distributed half of an ES step: all-gather the scored meta-batch, select, update scores.

Kept apart from the engine loop so the invariant of the spec (section 4) can be tested with
real processes and synthetic losses: W ranks, each holding a slice of the same global
meta-batch, must select exactly what one rank selects over the whole of it, step after step
while the scores evolve.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from es_llm import dist
from es_llm.config import EvolvedSamplingConfig
from es_llm.core.scores import ScoreTable
from es_llm.core.selector import Selection, select_step, selection_digest


@dataclass
class GlobalSelection:
    gathered: dist.GatheredMetaBatch
    selection: Selection
    prune_weights: torch.Tensor  # fp32 [M]: ESWP rescale weight of each gathered sample
    digest: str  # of the selected global ids, in order

    def rank_slice(self, rank: int, per_rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(positions into the gathered batch, loss weights) that `rank` back-propagates."""
        slot = slice(rank * per_rank, (rank + 1) * per_rank)
        positions = self.selection.positions[slot]
        weights = self.selection.loss_weights[slot].float() * self.prune_weights[positions]
        return positions, weights


def select_global(
    cfg: EvolvedSamplingConfig,
    table: ScoreTable,
    *,
    step: int,
    seed: int,
    ids: torch.Tensor,
    losses: torch.Tensor,
    valid: torch.Tensor,
    tokens: torch.Tensor,
    prune_weights: torch.Tensor,
    k: int,
) -> GlobalSelection:
    """Gather this rank's scored samples, select `k` globally, update the scores it owns."""
    prev = table.gather(ids)
    g = dist.gather_meta_batch(ids, losses, prev, valid, tokens)
    pw = dist.all_gather_cat(prune_weights.float())
    sel = select_step(
        cfg,
        step=step,
        seed=seed,
        ids=g.ids,
        losses=g.losses,
        prev_scores=g.scores,
        valid=g.valid,
        k=k,
    )
    m = ids.numel()
    own = slice(dist.rank() * m, (dist.rank() + 1) * m)
    table.update(ids, sel.new_scores[own], valid)
    return GlobalSelection(
        gathered=g,
        selection=sel,
        prune_weights=pw,
        digest=selection_digest(g.ids[sel.positions]),
    )

"""The distributed half of an ES step: all-gather the records, select, update scores, assign.

Kept apart from the engine so the invariant of the spec (section 4) can be tested with real
processes and synthetic losses: W ranks, each holding a slice of the same global meta-batch,
must select exactly what one rank selects over the whole of it, step after step while the
scores evolve. Only per-sample records travel (`es_llm.sampling.records`): one all-gather of
24 bytes a sample, no token ids; every tensor stays on the device it came on (no host sync).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from es_llm import dist
from es_llm.sampling.config import EvolvedSamplingConfig
from es_llm.sampling.records import Assignment, Records, locality_first, pack, unpack
from es_llm.sampling.scores import ScoreTable
from es_llm.sampling.selector import Selection, device_digest, select_step


@dataclass
class GlobalSelection:
    gathered: Records  # the global meta-batch, rank-major, as every rank sees it
    selection: Selection
    assignment: Assignment  # what this rank trains (locality-first)
    selected_ids: torch.Tensor  # int64 [k]: the chosen global ids, in selection order
    digest: torch.Tensor  # 0-dim int64 device digest of `selected_ids` (lock-step check)

    def loss_weights(self) -> torch.Tensor:
        """fp32 loss weight of each sample this rank trains: selection weight x ESWP weight."""
        a = self.assignment
        lw = self.selection.loss_weights.to(a.positions.device).float()[a.slot]
        return lw * self.gathered.prune_weights[a.positions]


def select_global(
    cfg: EvolvedSamplingConfig,
    table: ScoreTable,
    *,
    step: int,
    seed: int,
    ids: torch.Tensor,
    losses: torch.Tensor,
    valid: torch.Tensor,
    prune_weights: torch.Tensor,
    k: int,
) -> GlobalSelection:
    """Gather this rank's scored records, select `k` globally, update the owned scores, assign.

    Every tensor argument must be on `dist.device()` (checked by the all-gather).
    """
    m = ids.numel()
    prev = table.gather(ids.to(table.device)).to(ids.device)
    mine = Records(ids=ids, losses=losses, scores=prev, valid=valid, prune_weights=prune_weights)
    g = unpack(dist.all_gather_cat(pack(mine)))
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
    positions = sel.positions.to(ids.device)
    r = dist.rank()
    own = sel.new_scores.to(ids.device)[r * m : (r + 1) * m]
    table.update(ids.to(table.device), own.to(table.device), valid.to(table.device))
    assignment = locality_first(positions, per_rank_meta=m, world=dist.world_size(), rank=r)
    selected = g.ids[positions]
    return GlobalSelection(
        gathered=g,
        selection=sel,
        assignment=assignment,
        selected_ids=selected,
        digest=device_digest(selected),
    )

"""The distributed half of an ES step: all-gather the records, select, update scores, assign.

Kept apart from the engine so the invariant of the spec (section 4) can be tested with real
processes and synthetic losses: W ranks, each holding a slice of the same global meta-batch,
must select exactly what one rank selects over the whole of it, step after step while the
scores evolve. Only per-sample records travel (`es_llm.sampling.records`): one all-gather of
24 bytes a sample, no token ids; every tensor stays on the device it came on (no host sync).
Every collective runs over the communicator it is given: the data-parallel group.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from es_llm.sampling.comm import Communicator
from es_llm.sampling.config import EvolvedSamplingConfig
from es_llm.sampling.eswp import lockstep_available, plan_epoch_global
from es_llm.sampling.pruning import EpochPlan
from es_llm.sampling.records import (
    Assignment,
    Records,
    bits_f32,
    f32_bits,
    locality_first,
    pack,
    unpack,
)
from es_llm.sampling.scores import ScoreTable
from es_llm.sampling.selector import Selection, device_digest, select_step

__all__ = ["GlobalSelection", "GlobalSelector", "gather_trained", "select_global"]


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
    comm: Communicator,
    step: int,
    seed: int,
    ids: torch.Tensor,
    losses: torch.Tensor,
    valid: torch.Tensor,
    prune_weights: torch.Tensor,
    k: int,
    state: Mapping[str, torch.Tensor] | None = None,
    update_scores: bool = True,
) -> GlobalSelection:
    """Gather this rank's scored records, select `k` globally, update the owned scores, assign.

    Every tensor argument must be on `comm.device` (checked by the all-gather). `state`: the
    method's per-sample columns of this rank's samples (`ScoreStore.column_state`), gathered
    like the records (one all-gather of 4 bytes a sample per column). `update_scores=False`
    (scorer stale: `losses` are stored ones, already in the scores) leaves the table as it is.
    """
    m = ids.numel()
    prev = table.gather(ids.to(table.device)).to(ids.device)
    mine = Records(ids=ids, losses=losses, scores=prev, valid=valid, prune_weights=prune_weights)
    g = unpack(comm.all_gather_cat(pack(mine)))
    sel = select_step(
        cfg,
        step=step,
        seed=seed,
        ids=g.ids,
        losses=g.losses,
        prev_scores=g.scores,
        valid=g.valid,
        k=k,
        state={n: comm.all_gather_cat(v.to(torch.float32)) for n, v in (state or {}).items()},
    )
    positions = sel.positions.to(ids.device)
    r = comm.rank
    if update_scores:
        own = sel.new_scores.to(ids.device)[r * m : (r + 1) * m]
        table.update(ids.to(table.device), own.to(table.device), valid.to(table.device))
    assignment = locality_first(positions, per_rank_meta=m, world=comm.size, rank=r)
    selected = g.ids[positions]
    return GlobalSelection(
        gathered=g,
        selection=sel,
        assignment=assignment,
        selected_ids=selected,
        digest=device_digest(selected),
    )


def gather_trained(
    comm: Communicator, ids: torch.Tensor, losses: torch.Tensor, flag: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every rank's trained (ids int64, training losses fp32) and step flags (int64 [W]), in
    rank order: one all-gather of 16 bytes a sample, on `comm.device`, no host sync.

    Scorer stale: a selected sample may train on another rank than the one that owns its
    score, so the owners read its loss from here (`ScoreStore.observe_owned`).
    """
    mine = torch.cat(
        [
            torch.stack([ids.to(torch.int64), f32_bits(losses.to(torch.float32))], dim=1),
            torch.stack([flag, torch.zeros_like(flag)], dim=1),
        ]
    )
    everyone = comm.all_gather_cat(mine).view(comm.size, -1, 2)
    rows = everyone[:, :-1].reshape(-1, 2)
    return rows[:, 0], bits_f32(rows[:, 1]), everyone[:, -1, 0]


class GlobalSelector:
    """The data path's collectives over one data-parallel group: the step's global selection
    and the epoch's ESWP plan, with what it counts of them (samples that changed rank)."""

    def __init__(self, es: EvolvedSamplingConfig, comm: Communicator, *, seed: int, k: int):
        self.es, self.comm, self.seed, self.k = es, comm, int(seed), int(k)
        self.moved_samples = 0  # chosen samples trained on another rank than their scorer's

    def select(
        self,
        table: ScoreTable,
        *,
        step: int,
        ids: torch.Tensor,
        losses: torch.Tensor,
        valid: torch.Tensor,
        prune_weights: torch.Tensor,
        state: Mapping[str, torch.Tensor] | None = None,
    ) -> GlobalSelection:
        """`select_global` of this group; the tensors are moved to the communicator's device."""
        dev = self.comm.device
        return select_global(
            self.es,
            table,
            comm=self.comm,
            step=step,
            seed=self.seed,
            ids=ids.to(dev),
            losses=losses.to(dev),
            valid=valid.to(dev),
            prune_weights=prune_weights.to(dev),
            k=self.k,
            state={n: v.to(dev) for n, v in (state or {}).items()},
            update_scores=not self.es.stale,
        )

    def plan_epoch(self, table: ScoreTable, *, epoch: int, epochs: int) -> EpochPlan | None:
        """The epoch's pruning plan of this shard (None without pruning; a collective)."""
        if not self.es.uses_pruning:
            return None
        return plan_epoch_global(
            self.comm, table, self.es, epoch=epoch, epochs=epochs, seed=self.seed
        )

    def available(self, sampler: Any, plan: EpochPlan | None) -> int:
        """Samples of the epoch every rank can draw (a collective)."""
        return lockstep_available(self.comm, sampler, plan)

    def count_pruned(self, plan: EpochPlan | None) -> int:
        """Samples the plan prunes over all ranks (a collective; 0 without a plan)."""
        if plan is None:
            return 0
        return int(self.comm.all_reduce_sum([float((~plan.keep).sum())])[0])

    def state_dict(self) -> dict[str, Any]:
        return {"moved_samples": self.moved_samples}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.moved_samples = int(state["moved_samples"])

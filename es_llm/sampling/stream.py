"""The step stream: which samples of its shard a rank draws, in which order, and their rows.

One job: the data position. It holds the rank's sampler (the per-epoch visiting order), the
epoch's pruning plan (made elsewhere, handed in at the epoch start) and the lock-step sample
count of the epoch, and it reads sample rows by global id from the memory-mapped training
set: `input_ids`, and `labels` when the set has that column (instruction data: int64, -100
on prompt and padding tokens). Packed pre-training data has no labels; the stream then
yields None and every consumer falls back to `input_ids`, exactly as before labels existed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from es_llm.data.sharding import RankSampler, shard_range
from es_llm.sampling.plan import DataPathError
from es_llm.sampling.pruning import EpochPlan

__all__ = ["Rows", "StepStream"]

LABELS = "labels"


@dataclass
class Rows:
    """Rows of some samples, on the host: tokens int64 [n, T], labels int64 [n, T] or None."""

    tokens: torch.Tensor
    labels: torch.Tensor | None


class StepStream:
    """Rank `rank` of `size`: its shard of `dataset`, drawn epoch by epoch (see module doc)."""

    def __init__(self, dataset: Any, *, rank: int, size: int, seed: int) -> None:
        columns = list(getattr(dataset, "column_names", ["input_ids"]))
        if "input_ids" not in columns:
            raise DataPathError("the training dataset needs an 'input_ids' column")
        self.has_labels = LABELS in columns
        read = ["input_ids", LABELS] if self.has_labels else ["input_ids"]
        # the full set, memory-mapped: own rows at lo + i, moved samples by their global id
        self.dataset = dataset.with_format("numpy", columns=read)
        self.num_samples = len(dataset)
        self.lo, self.hi = shard_range(self.num_samples, rank, size)
        self.sampler = RankSampler(self.hi - self.lo, offset=self.lo, seed=seed, rank=rank)
        self.epoch = 0
        self.started = False  # the current epoch's plan/order/available are set
        self.plan: EpochPlan | None = None
        self.available = 0
        self._order: torch.Tensor | None = None

    # ------------------------------------------------------------------ epochs
    def begin_epoch(self, plan: EpochPlan | None, available: int) -> None:
        """Start `self.epoch` with its pruning plan and the sample count every rank can draw
        (`eswp.lockstep_available`)."""
        self.sampler.set_epoch(self.epoch)
        self.plan = plan
        self._set_order()
        self.available = int(available)
        self.started = True

    def next_epoch(self) -> None:
        self.epoch += 1
        self.started = False

    def _keep(self) -> torch.Tensor | None:
        return self.plan.keep if self.plan is not None else None

    def _set_order(self) -> None:
        self._order = self.sampler.order(self._keep())

    def fits(self, n: int) -> bool:
        """Can every rank still draw `n` samples in this epoch?"""
        return self.sampler.position + n <= self.available

    def take(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The next `n` samples: (global ids int64 [n], ESWP loss weights fp32 [n]), host."""
        if self._order is None:
            raise RuntimeError("the epoch order is missing after the epoch start")
        pos = self.sampler.position
        local_idx = self._order[pos : pos + n]
        self.sampler.advance(n)
        if self.plan is None:
            weights = torch.ones(n, dtype=torch.float32)
        else:
            weights = self.plan.loss_weights(local_idx).float()
        return local_idx + self.lo, weights

    # ------------------------------------------------------------------ rows
    def read(self, global_ids: torch.Tensor) -> Rows:
        """The rows of `global_ids` (host int64) from the memory-mapped training set."""
        batch = self.dataset[global_ids.tolist()]
        tokens = torch.from_numpy(np.asarray(batch["input_ids"], dtype=np.int64))
        labels = None
        if self.has_labels:
            labels = torch.from_numpy(np.asarray(batch[LABELS], dtype=np.int64))
            if labels.shape != tokens.shape:
                raise DataPathError(
                    f"the 'labels' rows have shape {tuple(labels.shape)}, the 'input_ids' rows "
                    f"{tuple(tokens.shape)}: each labels row must match its input_ids row"
                )
        return Rows(tokens, labels)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "epoch_started": self.started,
            "available": self.available,
            "plan": self.plan.state_dict() if self.plan is not None else None,
            "sampler": self.sampler.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state["sampler"])
        plan = state["plan"]
        self.plan = EpochPlan.from_state_dict(plan) if plan is not None else None
        self.epoch = int(state["epoch"])
        self.started = bool(state["epoch_started"])
        self.available = int(state["available"])
        self._order = None
        if self.started:
            self._set_order()

"""The communicator the data path talks through: a rank of one data-parallel group.

Why a protocol here: the sampling package describes *what* it exchanges (records, a few
host numbers, the lock-step digest) and leaves *how* to the driver. The torch.distributed
implementation is `es_llm.dist.Communicator(group=None)` (the whole world by default, or a
data-parallel group of a model-parallel job); every collective runs over that group only, on
the communicator's device (the accelerator for NCCL, the CPU for gloo).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

__all__ = ["Communicator", "SelectionDivergedError"]


@runtime_checkable
class Communicator(Protocol):
    """Rank `rank` of `size` data-parallel ranks; collectives over exactly those ranks."""

    @property
    def rank(self) -> int: ...

    @property
    def size(self) -> int: ...

    @property
    def device(self) -> torch.device:
        """Where tensors handed to the collectives must live."""
        ...

    def all_gather_cat(self, t: torch.Tensor) -> torch.Tensor:
        """Equal-shaped tensors of all ranks concatenated along dim 0 in rank order (no sync)."""
        ...

    def lockstep_flags(
        self, digest: torch.Tensor, flag: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(did any rank compute another 0-dim int64 `digest`: 0-dim bool, the largest
        non-negative int64 `flag` of any rank: 0-dim int64), on the device, no host sync."""
        ...

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        """float64 sum of a few host numbers over the ranks (epoch starts: syncs the host)."""
        ...

    def all_reduce_min_int(self, value: int) -> int:
        """MIN of one host integer over the ranks (epoch starts: syncs the host)."""
        ...


class SelectionDivergedError(RuntimeError):
    """Data-parallel ranks selected different samples in the same step (a bug or a
    misconfiguration: different seeds or configs on different ranks)."""

    def __init__(self, rank: int, digest: str) -> None:
        super().__init__(
            f"rank {rank}: selection diverged across data-parallel ranks (local digest "
            f"{digest[:15]}); check that every rank uses the same seed and config"
        )

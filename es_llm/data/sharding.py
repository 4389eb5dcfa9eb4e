"""Per-rank shards and per-epoch orders, with ranks and world size as plain integers.

Global id = row index of the train dataset, whatever the world size. Rank ``r`` of ``W`` owns
the contiguous id range ``shard_range(N, r, W)``: the first ``N % W`` ranks get one row more.
These are exactly the ranges of ``datasets.Dataset.shard(W, r, contiguous=True)``; a
contiguous ``select`` is an Arrow slice of the memory-mapped table, so a rank reads only its
rows. The epoch order of a shard comes from its own ``torch.Generator`` seeded from
(seed, epoch, offset) — never the global RNG — so it is reproducible and resumable.
"""

from __future__ import annotations

import hashlib

import datasets
import torch


def shard_range(num_samples: int, rank: int, world: int) -> tuple[int, int]:
    """Contiguous near-equal [lo, hi) of ``rank``; the ranges of all ranks tile [0, N)."""
    if world < 1:
        raise ValueError(f"world size must be >= 1, got {world}")
    if not 0 <= rank < world:
        raise ValueError(f"rank must be in [0, {world - 1}], got {rank}")
    if num_samples < 0:
        raise ValueError(f"num_samples must be >= 0, got {num_samples}")
    base, extra = divmod(num_samples, world)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)


def shard_dataset(ds: datasets.Dataset, rank: int, world: int) -> datasets.Dataset:
    """This rank's rows as a zero-copy slice; the "id" column keeps the global ids."""
    lo, hi = shard_range(len(ds), rank, world)
    return ds.select(range(lo, hi))


def _generator_seed(seed: int, epoch: int, offset: int) -> int:
    """Mix (seed, epoch, offset) into a 63-bit seed; distinct tuples give unrelated streams."""
    msg = f"es_llm.RankSampler:{seed}:{epoch}:{offset}".encode()
    return int.from_bytes(hashlib.sha256(msg).digest()[:8], "big") >> 1


class RankSampler:
    """The order in which one rank visits its shard in each epoch, and where it stands.

    ``order()`` is a permutation of local indices ``0..num_local-1`` (add ``offset`` for global
    ids) that depends only on (seed, epoch, offset). An optional boolean keep mask (the epoch's
    pruning plan over the shard) removes pruned indices while keeping the relative order of the
    rest. ``position`` counts the entries of the (filtered) order already consumed this epoch;
    it is saved by ``state_dict`` so a resumed run continues at the same sample.
    """

    def __init__(self, num_local: int, offset: int = 0, seed: int = 0, rank: int = 0) -> None:
        if num_local < 0 or offset < 0:
            raise ValueError(f"num_local and offset must be >= 0, got {num_local}, {offset}")
        self.num_local = int(num_local)
        self.offset = int(offset)
        self.seed = int(seed)
        self.rank = int(rank)
        self.epoch = 0
        self.position = 0

    def set_epoch(self, epoch: int) -> None:
        """Move to ``epoch``; the position restarts unless it is the current (resumed) epoch."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if epoch != self.epoch:
            self.epoch = int(epoch)
            self.position = 0

    def _check_mask(self, keep_mask: torch.Tensor | None) -> None:
        if keep_mask is None:
            return
        if keep_mask.dtype != torch.bool or keep_mask.shape != (self.num_local,):
            raise ValueError(
                f"keep_mask must be a bool tensor of shape ({self.num_local},), got "
                f"{keep_mask.dtype} {tuple(keep_mask.shape)}"
            )

    def order(self, keep_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Local indices (int64) of this epoch, in visiting order, pruned ones removed."""
        self._check_mask(keep_mask)
        g = torch.Generator(device="cpu")
        g.manual_seed(_generator_seed(self.seed, self.epoch, self.offset))
        perm = torch.randperm(self.num_local, generator=g, dtype=torch.int64)
        if keep_mask is not None:
            perm = perm[keep_mask.cpu()[perm]]
        return perm

    def num_kept(self, keep_mask: torch.Tensor | None = None) -> int:
        self._check_mask(keep_mask)
        return self.num_local if keep_mask is None else int(keep_mask.sum())

    def num_batches(self, batch_per_rank: int, keep_mask: torch.Tensor | None = None) -> int:
        """Full batches this rank can draw this epoch; the caller all-reduces MIN over ranks."""
        if batch_per_rank < 1:
            raise ValueError(f"batch_per_rank must be >= 1, got {batch_per_rank}")
        return self.num_kept(keep_mask) // batch_per_rank

    def next_batch(
        self, batch_per_rank: int, keep_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The next ``batch_per_rank`` local indices of this epoch; advances ``position``.

        Recomputes the order each call (O(num_local)); loops over large shards should take
        ``order()`` once per epoch and slice it with ``position``/``advance`` instead.
        """
        if batch_per_rank < 1:
            raise ValueError(f"batch_per_rank must be >= 1, got {batch_per_rank}")
        order = self.order(keep_mask)
        if self.position + batch_per_rank > len(order):
            raise IndexError(
                f"epoch {self.epoch}: {len(order) - self.position} samples left on rank "
                f"{self.rank}, fewer than a batch of {batch_per_rank}; call set_epoch"
            )
        batch = order[self.position : self.position + batch_per_rank]
        self.position += batch_per_rank
        return batch

    def advance(self, n: int) -> None:
        """Record that ``n`` more entries of this epoch's order were consumed."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        self.position += int(n)

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "num_local": self.num_local,
            "offset": self.offset,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore the data position; the shard and seed must be the ones it was saved with."""
        for k in ("epoch", "position", "seed", "num_local", "offset"):
            if k not in state:
                raise ValueError(f"RankSampler state has no {k!r} (keys: {sorted(state)})")
        for k in ("seed", "num_local", "offset"):
            if int(state[k]) != getattr(self, k):
                raise ValueError(
                    f"RankSampler state was saved with {k}={state[k]}, this sampler has "
                    f"{k}={getattr(self, k)} (different world size, data or seed?)"
                )
        if int(state["position"]) < 0 or int(state["epoch"]) < 0:
            raise ValueError(f"RankSampler state has a negative epoch/position: {state}")
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])

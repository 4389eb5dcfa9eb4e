"""ESWP set-level pruning (spec section 3): which samples of a shard this epoch skips.

Why this shape: the plan is a pure function of (scores, global mean, seed, epoch, global id),
so each rank plans its own shard and the union over ranks equals the plan of the whole set.
It is stored as two bitsets (keep, boost): 2 bits per sample, ids implied by the offset.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from es_llm.sampling.noise import (
    GOLDEN,
    MASK64,
    STREAM_PRUNE,
    U_GOLDEN,
    derive_key,
    mix64_inplace,
    prune_threshold_u64,
)
from es_llm.sampling.scores import ScoreTable

__all__ = ["EpochPlan", "anneal_epoch", "plan_epoch"]

_CHUNK = 1 << 20  # multiple of 8 so chunk boundaries fall on bitset bytes


def _pack(mask: torch.Tensor | np.ndarray) -> torch.Tensor:
    arr = mask.numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    return torch.from_numpy(
        np.packbits(arr.astype(bool, copy=False).reshape(-1), bitorder="little")
    )


def _unpack(bits: torch.Tensor, n: int) -> torch.Tensor:
    return torch.from_numpy(np.unpackbits(bits.numpy(), count=n, bitorder="little").astype(bool))


def _bits_at(bits: torch.Tensor, local_idx: torch.Tensor) -> torch.Tensor:
    idx = torch.as_tensor(local_idx).to(torch.int64)
    byte = bits.index_select(0, (idx >> 3).reshape(-1)).to(torch.int64)
    return ((byte >> (idx.reshape(-1) & 7)) & 1).to(torch.bool).reshape(idx.shape)


@dataclass(init=False, eq=False)
class EpochPlan:
    """The pruning plan of one shard for one epoch (local indices 0..num_samples-1).

    `keep` / `weight_boost` are bool views unpacked on access; storage is `keep_bits` /
    `boost_bits` (uint8, little bit order). Pruned samples have boost False.
    """

    epoch: int
    num_samples: int
    offset: int
    keep_bits: torch.Tensor
    boost_bits: torch.Tensor
    prune_ratio: float
    rescale: bool

    def __init__(
        self,
        epoch: int,
        keep: torch.Tensor | None = None,
        weight_boost: torch.Tensor | None = None,
        *,
        prune_ratio: float = 0.0,
        rescale: bool = True,
        offset: int = 0,
        keep_bits: torch.Tensor | None = None,
        boost_bits: torch.Tensor | None = None,
        num_samples: int | None = None,
    ) -> None:
        """Build from bool masks (keep, weight_boost) or from packed bits + num_samples."""
        self.epoch = int(epoch)
        self.offset = int(offset)
        self.prune_ratio = float(prune_ratio)
        self.rescale = bool(rescale)
        if keep is not None:
            keep = torch.as_tensor(keep).to(torch.bool).reshape(-1)
            n = keep.numel()
            boost = (
                torch.zeros(n, dtype=torch.bool)
                if weight_boost is None
                else torch.as_tensor(weight_boost).to(torch.bool).reshape(-1)
            )
            if boost.numel() != n:
                raise ValueError(f"keep has {n} entries but weight_boost has {boost.numel()}")
            self.num_samples = n
            self.keep_bits = _pack(keep)
            self.boost_bits = _pack(boost & keep)
        else:
            if keep_bits is None or boost_bits is None or num_samples is None:
                raise ValueError(
                    "EpochPlan needs keep (and weight_boost) or keep_bits, boost_bits, num_samples"
                )
            self.num_samples = int(num_samples)
            nbytes = (self.num_samples + 7) // 8
            for name, b in (("keep_bits", keep_bits), ("boost_bits", boost_bits)):
                if b.dtype != torch.uint8 or b.numel() != nbytes:
                    raise ValueError(
                        f"{name} must be uint8 of {nbytes} bytes, got {b.dtype} x {b.numel()}"
                    )
            self.keep_bits = keep_bits
            self.boost_bits = boost_bits

    @classmethod
    def keep_all(cls, num_samples: int, epoch: int, *, offset: int = 0) -> EpochPlan:
        """No pruning, no boost (anneal epochs, methods without pruning)."""
        nbytes = (num_samples + 7) // 8
        keep = torch.full((nbytes,), 0xFF, dtype=torch.uint8)
        if num_samples % 8:
            keep[-1] = (1 << (num_samples % 8)) - 1
        return cls(
            epoch,
            keep_bits=keep,
            boost_bits=torch.zeros(nbytes, dtype=torch.uint8),
            num_samples=num_samples,
            offset=offset,
        )

    # --- views ---
    @property
    def keep(self) -> torch.Tensor:
        return _unpack(self.keep_bits, self.num_samples)

    @property
    def weight_boost(self) -> torch.Tensor:
        return _unpack(self.boost_bits, self.num_samples)

    @property
    def boost_weight(self) -> float:
        """Loss weight of a kept below-mean sample: 1/(1-prune_ratio) with rescale, else 1."""
        return 1.0 / (1.0 - self.prune_ratio) if self.rescale else 1.0

    @property
    def nbytes(self) -> int:
        return self.keep_bits.numel() + self.boost_bits.numel()

    def num_kept(self) -> int:
        return int(np.unpackbits(self.keep_bits.numpy(), bitorder="little").sum(dtype=np.int64))

    def is_kept(self, local_idx: torch.Tensor) -> torch.Tensor:
        return _bits_at(self.keep_bits, local_idx)

    def is_boosted(self, local_idx: torch.Tensor) -> torch.Tensor:
        return _bits_at(self.boost_bits, local_idx)

    def kept_local_indices(self, lo: int = 0, hi: int | None = None) -> torch.Tensor:
        """int64 local indices of kept samples in [lo, hi) (chunk it for huge shards)."""
        hi = self.num_samples if hi is None else min(hi, self.num_samples)
        if lo >= hi:
            return torch.zeros(0, dtype=torch.int64)
        b0 = lo // 8
        sub = np.unpackbits(self.keep_bits.numpy()[b0 : (hi + 7) // 8], bitorder="little")
        sub = sub[lo - 8 * b0 : hi - 8 * b0]
        return torch.from_numpy(np.flatnonzero(sub).astype(np.int64) + lo)

    def loss_weights(self, local_idx: torch.Tensor) -> torch.Tensor:
        """fp32 per-sample training loss weights: boost_weight where boosted, else 1."""
        boosted = self.is_boosted(local_idx)
        return torch.where(
            boosted,
            torch.tensor(self.boost_weight, dtype=torch.float32),
            torch.tensor(1.0, dtype=torch.float32),
        )

    def loss_weights_for_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Same as loss_weights, from global ids of this shard."""
        return self.loss_weights(torch.as_tensor(ids).to(torch.int64) - self.offset)

    # --- checkpointing ---
    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "num_samples": self.num_samples,
            "offset": self.offset,
            "prune_ratio": self.prune_ratio,
            "rescale": self.rescale,
            "keep_bits": self.keep_bits.clone(),
            "boost_bits": self.boost_bits.clone(),
        }

    @classmethod
    def from_state_dict(cls, d: dict[str, Any]) -> EpochPlan:
        return cls(
            int(d["epoch"]),
            keep_bits=torch.as_tensor(d["keep_bits"]).to(torch.uint8).clone(),
            boost_bits=torch.as_tensor(d["boost_bits"]).to(torch.uint8).clone(),
            num_samples=int(d["num_samples"]),
            offset=int(d["offset"]),
            prune_ratio=float(d["prune_ratio"]),
            rescale=bool(d["rescale"]),
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, EpochPlan):
            return NotImplemented
        return (
            self.epoch == other.epoch
            and self.num_samples == other.num_samples
            and self.offset == other.offset
            and self.prune_ratio == other.prune_ratio
            and self.rescale == other.rescale
            and torch.equal(self.keep_bits, other.keep_bits)
            and torch.equal(self.boost_bits, other.boost_bits)
        )


def anneal_epoch(delta: float, epochs: int) -> int:
    """First epoch without pruning: ceil(delta * epochs) (float noise ignored)."""
    return math.ceil(round(delta * epochs, 9))


def _f32_at_least(x: float) -> np.float32:
    """Smallest float32 >= x, so that for fp32 s: s < x  <=>  s < this (exact comparison)."""
    t = np.float32(x)
    if float(t) < x:
        t = np.nextafter(t, np.float32(np.inf))
    return t


def plan_epoch(
    table: ScoreTable,
    global_mean: float,
    *,
    epoch: int,
    epochs: int,
    seed: int,
    prune_ratio: float,
    delta: float,
    rescale: bool,
) -> EpochPlan:
    """Plan epoch `epoch` of `epochs` for this shard.

    Before anneal_epoch: a scored sample with s < global_mean is pruned iff
    prune_draws(seed, epoch, id) < prune_ratio, and kept ones are boosted; never-scored
    samples (NaN) are kept unboosted. From anneal_epoch on, or with a NaN mean (nothing scored
    anywhere), everything is kept. Runs chunked over the fp32 storage with integer hashing,
    so 1e8 samples take well under a second per core.
    """
    if not 0.0 <= prune_ratio < 1.0:
        raise ValueError(f"prune_ratio must be in [0, 1), got {prune_ratio!r}")
    n, offset = table.num_samples, table.offset
    if epoch >= anneal_epoch(delta, epochs) or prune_ratio == 0.0 or math.isnan(global_mean):
        plan = EpochPlan.keep_all(n, epoch, offset=offset)
        plan.prune_ratio, plan.rescale = float(prune_ratio), bool(rescale)
        return plan

    scores = table.raw_scores.detach().cpu().numpy()  # one host copy per epoch off the CPU
    thr_s = _f32_at_least(global_mean)
    thr_u = np.uint64(prune_threshold_u64(prune_ratio))
    key = derive_key(seed, STREAM_PRUNE, epoch)
    keep_bits = np.empty((n + 7) // 8, dtype=np.uint8)
    boost_bits = np.empty_like(keep_bits)

    step_golden = np.arange(min(_CHUNK, n), dtype=np.uint64)
    np.multiply(step_golden, U_GOLDEN, out=step_golden)
    x = np.empty_like(step_golden)
    tmp = np.empty_like(step_golden)
    below = np.empty(step_golden.shape, dtype=bool)
    pruned = np.empty_like(below)

    for lo in range(0, n, _CHUNK):
        m = min(_CHUNK, n - lo)
        xs, ts, bs, ps = x[:m], tmp[:m], below[:m], pruned[:m]
        # x_j = mix64(key + (offset + lo + j) * GOLDEN): identical to noise.prune_draws
        base = (key + ((offset + lo) & MASK64) * GOLDEN) & MASK64
        np.add(step_golden[:m], np.uint64(base), out=xs)
        mix64_inplace(xs, ts)
        np.less(scores[lo : lo + m], thr_s, out=bs)  # NaN (never scored) -> False
        np.less(xs, thr_u, out=ps)
        np.logical_and(ps, bs, out=ps)  # pruned
        np.logical_xor(bs, ps, out=bs)  # boosted = below and not pruned
        np.logical_not(ps, out=ps)  # kept
        b0 = lo // 8
        keep_bits[b0 : b0 + (m + 7) // 8] = np.packbits(ps, bitorder="little")
        boost_bits[b0 : b0 + (m + 7) // 8] = np.packbits(bs, bitorder="little")

    return EpochPlan(
        epoch,
        keep_bits=torch.from_numpy(keep_bits),
        boost_bits=torch.from_numpy(boost_bits),
        num_samples=n,
        offset=offset,
        prune_ratio=prune_ratio,
        rescale=rescale,
    )

"""Counter-based randomness: every draw is a pure function of integers.

Why: each rank must compute the identical selection from (seed, step, position), a resumed
run must repeat it, and the ESWP pruning draw of a sample must depend only on
(seed, epoch, global id) so that shards plan independently yet agree with a single process.
No global RNG is touched anywhere.

The generator is a splitmix64 stream: a 64-bit key is derived from (seed, stream, counter) by
hashing, then element j gets ``mix64(key + j * GOLDEN)`` (mod 2**64), where ``mix64`` is the
bijective splitmix64 finaliser. The arithmetic runs on numpy uint64 (well-defined wrapping,
logical shifts); ids cross the torch/numpy boundary as int64 bit patterns, never as floats.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = [
    "STREAM_EPSILON",
    "STREAM_GUMBEL",
    "STREAM_PRUNE",
    "derive_key",
    "gumbel",
    "hash_u64",
    "mix64_inplace",
    "prune_draws",
    "prune_mask_np",
    "prune_threshold_u64",
    "uniform01",
]

MASK64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15
_M1 = 0xBF58476D1CE4E5B9
_M2 = 0x94D049BB133111EB

STREAM_GUMBEL = 0  # Gumbel keys of the selection
STREAM_EPSILON = 1  # uniform fill of the epsilon slots
STREAM_PRUNE = 2  # ESWP per-epoch pruning draws

U_GOLDEN = np.uint64(GOLDEN)
_U_M1 = np.uint64(_M1)
_U_M2 = np.uint64(_M2)
_S30, _S27, _S31, _S12 = np.uint64(30), np.uint64(27), np.uint64(31), np.uint64(12)


def _mix64_int(x: int) -> int:
    """splitmix64 finaliser on a Python int (used to derive per-call keys)."""
    x &= MASK64
    x = ((x ^ (x >> 30)) * _M1) & MASK64
    x = ((x ^ (x >> 27)) * _M2) & MASK64
    return x ^ (x >> 31)


def derive_key(seed: int, stream: int, counter: int) -> int:
    """A 64-bit key for the draws of one (seed, stream, counter) triple."""
    k = _mix64_int((seed & MASK64) + GOLDEN)
    k = _mix64_int(k ^ (((stream & MASK64) + 1) * _M1 & MASK64))
    return _mix64_int(k ^ (((counter & MASK64) + 1) * _M2 & MASK64))


def mix64_inplace(x: np.ndarray, tmp: np.ndarray) -> np.ndarray:
    """In-place splitmix64 finaliser on a uint64 array (tmp: scratch of the same shape)."""
    np.right_shift(x, _S30, out=tmp)
    np.bitwise_xor(x, tmp, out=x)
    np.multiply(x, _U_M1, out=x)
    np.right_shift(x, _S27, out=tmp)
    np.bitwise_xor(x, tmp, out=x)
    np.multiply(x, _U_M2, out=x)
    np.right_shift(x, _S31, out=tmp)
    np.bitwise_xor(x, tmp, out=x)
    return x


def _as_u64(counters: torch.Tensor | np.ndarray) -> np.ndarray:
    """The int64 bit pattern of `counters` as uint64 (copies; never via float)."""
    if isinstance(counters, torch.Tensor):
        if counters.dtype != torch.int64:
            if counters.is_floating_point():
                raise TypeError("counters/ids must be an integer tensor, not floating point")
            counters = counters.to(torch.int64)
        arr = counters.detach().cpu().contiguous().numpy()
    else:
        arr = np.asarray(counters)
        if arr.dtype.kind not in "iu":
            raise TypeError(f"counters/ids must be integers, got dtype {arr.dtype}")
        arr = arr.astype(np.int64, copy=False) if arr.dtype.kind == "i" else arr
    return arr.astype(np.uint64, copy=True) if arr.dtype != np.uint64 else arr.copy()


def hash_u64(key: int, counters: torch.Tensor | np.ndarray) -> np.ndarray:
    """mix64(key + counter * GOLDEN) per element, as a uint64 array of the same shape."""
    x = _as_u64(counters)
    np.multiply(x, U_GOLDEN, out=x)
    np.add(x, np.uint64(key & MASK64), out=x)
    return mix64_inplace(x, np.empty_like(x))


def _u64_to_open01(x: np.ndarray) -> np.ndarray:
    """(2m + 1) / 2**53 with m the top 52 bits: exact in float64 and strictly inside (0, 1)."""
    m = np.right_shift(x, _S12).astype(np.float64)
    return m * 2.0**-52 + 2.0**-53


def uniform01(seed: int, stream: int, step: int, positions: torch.Tensor) -> torch.Tensor:
    """Uniform draws in the open interval (0, 1), float64, one per position."""
    u = _u64_to_open01(hash_u64(derive_key(seed, stream, step), positions))
    return torch.from_numpy(u).reshape(tuple(positions.shape))


def gumbel(seed: int, step: int, positions: torch.Tensor) -> torch.Tensor:
    """Standard Gumbel noise -log(-log(u)), float64; always finite since u is in (0, 1)."""
    u = uniform01(seed, STREAM_GUMBEL, step, positions)
    return -torch.log(-torch.log(u))


def prune_draws(seed: int, epoch: int, ids: torch.Tensor) -> torch.Tensor:
    """Uniform (0, 1) float64 per global id: sample `id` is pruned in `epoch` iff draw < ratio."""
    return uniform01(seed, STREAM_PRUNE, epoch, ids)


def prune_threshold_u64(prune_ratio: float) -> int:
    """T such that ``raw < T`` (unsigned) iff the uniform made from `raw` is < prune_ratio.

    u = (2m+1)/2**53 with m = raw >> 12; u < p  <=>  2m+1 < ceil(p*2**53)  <=>  m < C//2.
    Lets the planner compare raw hashes without building float arrays.
    """
    if not 0.0 <= prune_ratio < 1.0:
        raise ValueError(f"prune_ratio must be in [0, 1), got {prune_ratio!r}")
    c = math.ceil(prune_ratio * 2.0**53)  # exact: scaling by a power of two
    return (c // 2) << 12


def prune_mask_np(
    seed: int,
    epoch: int,
    first_id: int,
    count: int,
    prune_ratio: float,
    tmp: np.ndarray | None = None,
) -> np.ndarray:
    """Bool array: is id ``first_id + j`` (j < count) pruned? Equals prune_draws(...) < ratio.

    The fast path of the planner: ids are implied by the shard offset, so no id array is stored.
    """
    key = derive_key(seed, STREAM_PRUNE, epoch)
    x = np.arange(count, dtype=np.uint64)
    np.multiply(x, U_GOLDEN, out=x)
    base = (key + (first_id & MASK64) * GOLDEN) & MASK64
    np.add(x, np.uint64(base), out=x)
    mix64_inplace(x, np.empty_like(x) if tmp is None else tmp[:count])
    return x < np.uint64(prune_threshold_u64(prune_ratio))

"""Counter-based randomness: every draw is a pure function of integers.

Why: each rank must compute the identical selection from (seed, step, position), a resumed
run must repeat it, and the ESWP pruning draw of a sample must depend only on
(seed, epoch, global id) so that shards plan independently yet agree with a single process.
No global RNG is touched anywhere.

The generator is a splitmix64 stream: a 64-bit key is derived from (seed, stream, counter) by
hashing, then element j gets ``mix64(key + j * GOLDEN)`` (mod 2**64), where ``mix64`` is the
bijective splitmix64 finaliser.

Two bit-identical implementations: tensors are hashed on their own device with torch int64
arithmetic (multiply and add wrap mod 2**64; a logical right shift is an arithmetic shift
followed by a mask), so a CUDA step draws its noise without a host round-trip; numpy uint64
arrays take the numpy path, which the ESWP planner uses for its chunked host-side fast path.
Ids are int64 bit patterns everywhere, never floats.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = [
    "STREAM_DIGEST",
    "STREAM_EPSILON",
    "STREAM_GUMBEL",
    "STREAM_PRUNE",
    "as_int64",
    "derive_key",
    "gumbel",
    "hash_u64",
    "mix64_",
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
STREAM_DIGEST = 3  # the on-device selection digest

U_GOLDEN = np.uint64(GOLDEN)
_U_M1 = np.uint64(_M1)
_U_M2 = np.uint64(_M2)
_S30, _S27, _S31, _S12 = np.uint64(30), np.uint64(27), np.uint64(31), np.uint64(12)


def as_int64(x: int) -> int:
    """The signed int64 with the same 64-bit pattern as `x` (what a torch int64 scalar holds)."""
    x &= MASK64
    return x - (1 << 64) if x >> 63 else x


_I_GOLDEN = as_int64(GOLDEN)
_I_M1 = as_int64(_M1)
_I_M2 = as_int64(_M2)


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


# --- numpy uint64 path ---


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


def _np_as_u64(counters: np.ndarray) -> np.ndarray:
    """The bit pattern of integer `counters` as a fresh uint64 array (never via float)."""
    arr = np.asarray(counters)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"counters/ids must be integers, got dtype {arr.dtype}")
    if arr.dtype.kind == "i":
        arr = arr.astype(np.int64, copy=False)
    return arr.astype(np.uint64, copy=True)


# --- torch int64 path (any device) ---


def _srl(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns: arithmetic shift, then clear the sign fill."""
    return torch.bitwise_and(torch.bitwise_right_shift(x, s), (1 << (64 - s)) - 1)


def mix64_(x: torch.Tensor) -> torch.Tensor:
    """In-place splitmix64 finaliser on an int64 tensor (wrapping), on its own device."""
    x.bitwise_xor_(_srl(x, 30))
    x.mul_(_I_M1)
    x.bitwise_xor_(_srl(x, 27))
    x.mul_(_I_M2)
    x.bitwise_xor_(_srl(x, 31))
    return x


def _torch_as_i64(counters: torch.Tensor) -> torch.Tensor:
    """`counters` as a fresh int64 tensor on the same device (never via float)."""
    if counters.is_floating_point() or counters.is_complex() or counters.dtype == torch.bool:
        raise TypeError(f"counters/ids must be an integer tensor, got {counters.dtype}")
    return counters.detach().to(torch.int64, copy=True)


def _hash_torch(key: int, counters: torch.Tensor) -> torch.Tensor:
    x = _torch_as_i64(counters)
    x.mul_(_I_GOLDEN).add_(as_int64(key))
    return mix64_(x)


def hash_u64(key: int, counters: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
    """mix64(key + counter * GOLDEN) per element.

    A tensor gives an int64 tensor (the uint64 bit pattern) on the same device; a numpy
    array gives a uint64 array. Both paths are bit-identical.
    """
    if isinstance(counters, torch.Tensor):
        return _hash_torch(key, counters)
    y = _np_as_u64(counters)
    np.multiply(y, U_GOLDEN, out=y)
    np.add(y, np.uint64(key & MASK64), out=y)
    return mix64_inplace(y, np.empty_like(y))


def _bits_to_open01(x: torch.Tensor) -> torch.Tensor:
    """(2m + 1) / 2**53 with m the top 52 bits: exact in float64 and strictly inside (0, 1)."""
    return _srl(x, 12).to(torch.float64).mul_(2.0**-52).add_(2.0**-53)


def uniform01(
    seed: int, stream: int, step: int, positions: torch.Tensor | np.ndarray
) -> torch.Tensor:
    """Uniform draws in the open interval (0, 1), float64, one per position, on its device."""
    pos = positions if isinstance(positions, torch.Tensor) else torch.as_tensor(positions)
    return _bits_to_open01(_hash_torch(derive_key(seed, stream, step), pos))


def gumbel(seed: int, step: int, positions: torch.Tensor) -> torch.Tensor:
    """Standard Gumbel noise -log(-log(u)), float64; always finite since u is in (0, 1)."""
    u = uniform01(seed, STREAM_GUMBEL, step, positions)
    return u.log_().neg_().log_().neg_()


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

"""Counter-based noise: determinism, distribution, exact int64 ids."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from es_llm.sampling.noise import (
    STREAM_EPSILON,
    STREAM_GUMBEL,
    STREAM_PRUNE,
    derive_key,
    gumbel,
    hash_u64,
    prune_draws,
    prune_mask_np,
    uniform01,
)

M64 = (1 << 64) - 1


def many_counters() -> np.ndarray:
    """int64 counters across the whole range: random bit patterns (half negative), small ids,
    ids near 2**62 and 2**63, and the extremes."""
    rng = np.random.default_rng(0)
    edges = [0, 1, 2, -1, -2, 2**31 - 1, 2**31, 2**32, 2**53 + 1, 2**63 - 1, -(2**63)]
    near62 = [2**62 + d for d in range(-50, 50)]
    near63 = [2**63 - 1 - d for d in range(50)] + [-(2**63) + d for d in range(50)]
    rand = rng.integers(-(2**63), 2**63 - 1, size=20_000, dtype=np.int64, endpoint=True)
    return np.concatenate(
        [np.array(edges + near62 + near63, dtype=np.int64), rand, np.arange(5000, dtype=np.int64)]
    )


def np_uniform(seed: int, stream: int, counter: int, pos: np.ndarray) -> np.ndarray:
    """The numpy uint64 path of the same generator (bits -> open (0, 1))."""
    x = hash_u64(derive_key(seed, stream, counter), pos)
    return (np.right_shift(x, np.uint64(12)).astype(np.float64)) * 2.0**-52 + 2.0**-53


def ref_uniform(seed: int, stream: int, counter: int, pos: int) -> float:
    """Pure-Python reference of the generator (splitmix64 at index pos of the key's stream)."""
    x = (derive_key(seed, stream, counter) + (pos & M64) * 0x9E3779B97F4A7C15) & M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & M64
    x ^= x >> 31
    return (2 * (x >> 12) + 1) / 2.0**53


def test_same_inputs_same_draws_and_counters_matter():
    pos = torch.arange(64)
    a = uniform01(5, STREAM_GUMBEL, 10, pos)
    assert torch.equal(a, uniform01(5, STREAM_GUMBEL, 10, pos))
    assert not torch.equal(a, uniform01(5, STREAM_GUMBEL, 11, pos))
    assert not torch.equal(a, uniform01(6, STREAM_GUMBEL, 10, pos))
    assert not torch.equal(a, uniform01(5, STREAM_EPSILON, 10, pos))
    assert a.dtype == torch.float64 and a.shape == pos.shape


def test_draw_depends_on_position_not_on_batch():
    full = uniform01(1, 0, 3, torch.arange(100))
    some = uniform01(1, 0, 3, torch.tensor([97, 5, 42]))
    assert torch.equal(some, full[[97, 5, 42]])
    assert torch.equal(uniform01(1, 0, 3, torch.arange(12).reshape(3, 4)).reshape(-1), full[:12])


def test_matches_pure_python_reference():
    pos = [0, 1, 2, 12345, 2**31 + 1, 2**62 + 3]
    got = uniform01(9, STREAM_PRUNE, 4, torch.tensor(pos, dtype=torch.int64)).tolist()
    assert got == [ref_uniform(9, STREAM_PRUNE, 4, p) for p in pos]


def test_uniform_is_open_interval_and_uniform():
    u = uniform01(0, 0, 0, torch.arange(200_000)).numpy()
    assert (u > 0).all() and (u < 1).all()
    assert abs(u.mean() - 0.5) < 0.003
    hist, _ = np.histogram(u, bins=20, range=(0, 1))
    expected = u.size / 20
    chi2 = ((hist - expected) ** 2 / expected).sum()
    assert chi2 < 50  # 19 dof: p ~ 1e-4


def test_gumbel_moments():
    g = gumbel(3, 7, torch.arange(200_000)).numpy()
    assert np.isfinite(g).all()
    assert abs(g.mean() - 0.5772156649) < 0.02
    assert abs(g.var() - math.pi**2 / 6) < 0.05


def test_large_ids_stay_exact():
    # ids that collapse to the same value through float32/float64 must draw differently
    for base in (2**31, 2**53, 2**62, 2**63 - 4):
        ids = torch.tensor([base, base + 1, base + 2, base + 3], dtype=torch.int64)
        d = prune_draws(1, 0, ids)
        assert len(set(d.tolist())) == 4
        assert d.tolist() == [ref_uniform(1, STREAM_PRUNE, 0, int(i)) for i in ids]


def test_prune_draws_are_keyed_by_epoch():
    ids = torch.arange(1000)
    assert torch.equal(prune_draws(2, 5, ids), prune_draws(2, 5, ids))
    assert not torch.equal(prune_draws(2, 5, ids), prune_draws(2, 6, ids))


@pytest.mark.parametrize("ratio", [0.0, 1e-12, 0.3, 0.5, 0.7, 1 - 2**-40])
@pytest.mark.parametrize("first_id", [0, 2**40 + 7, 2**62 - 100])
def test_integer_fast_path_equals_float_draws(ratio, first_id):
    count = 5000
    fast = prune_mask_np(11, 2, first_id, count, ratio)
    ids = torch.arange(first_id, first_id + count, dtype=torch.int64)
    assert np.array_equal(fast, (prune_draws(11, 2, ids) < ratio).numpy())


def test_threshold_exact_at_a_drawn_value():
    # a prune ratio equal to a drawn value must not prune that id (strict <), but prune just above
    ids = torch.arange(10, dtype=torch.int64)
    d = prune_draws(4, 1, ids)
    p = float(d[3])
    assert not prune_mask_np(4, 1, 3, 1, p)[0]
    assert prune_mask_np(4, 1, 3, 1, float(np.nextafter(p, 1.0)))[0]


def test_float_ids_are_rejected():
    with pytest.raises(TypeError):
        prune_draws(0, 0, torch.tensor([1.0, 2.0]))


# --- torch int64 path == numpy uint64 path, on the tensor's own device ---


@pytest.mark.parametrize("key_args", [(0, 0, 0), (5, STREAM_PRUNE, 3), (2**64 - 1, 1, 2**63 + 5)])
def test_torch_hash_equals_numpy_hash_bit_for_bit(key_args):
    c = many_counters()
    key = derive_key(*key_args)
    want = hash_u64(key, c)
    got = hash_u64(key, torch.from_numpy(c))
    assert isinstance(got, torch.Tensor) and got.dtype == torch.int64
    assert np.array_equal(got.numpy().view(np.uint64), want)
    # narrower integer dtypes are widened as int64 first, as before
    c32 = c[-5000:].astype(np.int32)
    assert np.array_equal(
        hash_u64(key, torch.from_numpy(c32)).numpy().view(np.uint64), hash_u64(key, c32)
    )


def test_torch_uniform_gumbel_prune_equal_numpy_path():
    c = many_counters()
    t = torch.from_numpy(c)
    u = uniform01(7, STREAM_EPSILON, 11, t)
    assert u.dtype == torch.float64 and np.array_equal(u.numpy(), np_uniform(7, 1, 11, c))
    # (torch's log, as the keys always used: numpy's log may differ in the last bit)
    want_g = -torch.log(-torch.log(torch.from_numpy(np_uniform(3, STREAM_GUMBEL, 9, c))))
    assert torch.equal(gumbel(3, 9, t), want_g)
    assert np.array_equal(prune_draws(4, 2, t).numpy(), np_uniform(4, STREAM_PRUNE, 2, c))
    # the planner's integer fast path agrees with the torch draws too
    first = 2**62 - 2500
    ids = torch.arange(first, first + 5000, dtype=torch.int64)
    assert np.array_equal(
        prune_mask_np(4, 2, first, 5000, 0.3), (prune_draws(4, 2, ids) < 0.3).numpy()
    )


def test_noise_stays_on_the_device_of_its_input():
    # the meta device carries no data: any host round-trip or numpy detour would fail here
    pos = torch.arange(1000, device="meta")
    for out in (
        uniform01(1, 0, 2, pos),
        gumbel(1, 2, pos),
        prune_draws(1, 2, pos),
        hash_u64(9, pos),
    ):
        assert out.device.type == "meta" and out.shape == pos.shape
    assert uniform01(1, 0, 2, pos.reshape(10, 100)).shape == (10, 100)

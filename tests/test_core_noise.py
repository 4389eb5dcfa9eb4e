"""Counter-based noise: determinism, distribution, exact int64 ids."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from es_llm.core.noise import (
    STREAM_EPSILON,
    STREAM_GUMBEL,
    STREAM_PRUNE,
    derive_key,
    gumbel,
    prune_draws,
    prune_mask_np,
    uniform01,
)

M64 = (1 << 64) - 1


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

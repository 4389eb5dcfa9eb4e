"""Shards tile the id space for any world size; per-rank epoch orders are reproducible."""

import datasets
import numpy as np
import pytest
import torch

from es_llm.data import RankSampler, shard_dataset, shard_range


@pytest.mark.parametrize("n", [0, 1, 4, 7, 10, 101])
@pytest.mark.parametrize("world", [1, 2, 3, 4, 5])
def test_shard_range_covers_exactly_once(n, world):
    seen = np.zeros(n, dtype=int)
    sizes = []
    prev_hi = 0
    for r in range(world):
        lo, hi = shard_range(n, r, world)
        assert lo == prev_hi  # contiguous, in rank order
        seen[lo:hi] += 1
        sizes.append(hi - lo)
        prev_hi = hi
    assert prev_hi == n
    assert (seen == 1).all()
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_shard_dataset_matches_datasets_contiguous_shard(world):
    ds = datasets.Dataset.from_dict({"id": list(range(23)), "x": list(range(100, 123))})
    for r in range(world):
        mine = shard_dataset(ds, r, world)
        theirs = ds.shard(world, r, contiguous=True)
        lo, hi = shard_range(len(ds), r, world)
        assert mine["id"][:] == theirs["id"][:] == list(range(lo, hi))
        assert mine._indices is None  # a slice of the table, not an indices mapping


def test_shard_range_rejects_bad_arguments():
    with pytest.raises(ValueError, match="world size"):
        shard_range(10, 0, 0)
    with pytest.raises(ValueError, match="rank"):
        shard_range(10, 3, 3)
    with pytest.raises(ValueError, match="num_samples"):
        shard_range(-1, 0, 1)


def test_order_is_a_deterministic_permutation():
    a = RankSampler(50, offset=100, seed=7, rank=1)
    b = RankSampler(50, offset=100, seed=7, rank=1)
    oa, ob = a.order(), b.order()
    assert oa.dtype == torch.int64
    assert torch.equal(oa, ob)
    assert sorted(oa.tolist()) == list(range(50))


def test_order_ignores_and_leaves_the_global_rng():
    s = RankSampler(64, seed=3)
    torch.manual_seed(0)
    o1 = s.order()
    state = torch.get_rng_state()
    torch.manual_seed(12345)
    o2 = s.order()
    assert torch.equal(o1, o2)
    torch.manual_seed(0)
    s.order()
    assert torch.equal(torch.get_rng_state(), state)


def test_set_epoch_seed_and_offset_change_the_order():
    s = RankSampler(200, offset=0, seed=1)
    e0 = s.order()
    s.set_epoch(1)
    e1 = s.order()
    assert not torch.equal(e0, e1)
    s.set_epoch(0)
    assert torch.equal(s.order(), e0)
    assert not torch.equal(RankSampler(200, offset=0, seed=2).order(), e0)
    assert not torch.equal(RankSampler(200, offset=200, seed=1).order(), e0)


def test_keep_mask_filters_and_keeps_relative_order():
    s = RankSampler(40, seed=5)
    keep = torch.arange(40) % 3 != 0
    full = s.order()
    kept = s.order(keep)
    assert torch.equal(kept, full[keep[full]])
    assert set(kept.tolist()) == {i for i in range(40) if i % 3 != 0}
    assert s.num_kept(keep) == len(kept)
    assert s.num_batches(4, keep) == len(kept) // 4
    assert s.num_batches(4) == 10
    with pytest.raises(ValueError, match="keep_mask"):
        s.order(torch.ones(39, dtype=torch.bool))
    with pytest.raises(ValueError, match="keep_mask"):
        s.order(torch.ones(40, dtype=torch.int64))
    with pytest.raises(ValueError, match="batch_per_rank"):
        s.num_batches(0)


def test_next_batch_walks_the_order_then_stops():
    s = RankSampler(10, seed=0)
    order = s.order()
    assert torch.equal(s.next_batch(4), order[:4])
    assert torch.equal(s.next_batch(4), order[4:8])
    with pytest.raises(IndexError, match="fewer than a batch"):
        s.next_batch(4)
    s.set_epoch(1)
    assert s.position == 0


def test_state_dict_resume_continues_exactly():
    keep = torch.arange(30) % 4 != 1
    ref = RankSampler(30, offset=60, seed=9, rank=2)
    ref.set_epoch(0)
    ref.next_batch(3, keep)
    ref.set_epoch(1)
    ref.next_batch(3, keep)
    ref.next_batch(3, keep)
    saved = ref.state_dict()
    expected = [ref.next_batch(3, keep) for _ in range(3)]

    resumed = RankSampler(30, offset=60, seed=9, rank=2)
    resumed.load_state_dict(saved)
    resumed.set_epoch(saved["epoch"])  # the loop re-entering the resumed epoch keeps the position
    got = [resumed.next_batch(3, keep) for _ in range(3)]
    assert all(torch.equal(a, b) for a, b in zip(expected, got, strict=True))


def test_load_state_dict_rejects_other_shard_or_bad_state():
    saved = RankSampler(30, offset=0, seed=1).state_dict()
    with pytest.raises(ValueError, match="num_local"):
        RankSampler(31, offset=0, seed=1).load_state_dict(saved)
    with pytest.raises(ValueError, match="offset"):
        RankSampler(30, offset=30, seed=1).load_state_dict(saved)
    with pytest.raises(ValueError, match="seed"):
        RankSampler(30, offset=0, seed=2).load_state_dict(saved)
    with pytest.raises(ValueError, match="position"):
        RankSampler(30, offset=0, seed=1).load_state_dict({"epoch": 0})

"""ESWP planner: the rule, shard independence, pruning rate, anneal, bits storage, round trip."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from es_llm.sampling.noise import prune_draws
from es_llm.sampling.pruning import EpochPlan, anneal_epoch, plan_epoch
from es_llm.sampling.scores import ScoreTable

KW = dict(epochs=8, seed=3, prune_ratio=0.3, delta=0.875, rescale=True)


def make_table(n: int, offset: int = 0, scored_every: int = 5, seed: int = 0) -> ScoreTable:
    """Random scores; every `scored_every`-th sample is left never-scored."""
    t = ScoreTable(n, offset=offset, s_init=0.5)
    g = torch.Generator().manual_seed(seed)
    ids = torch.arange(offset, offset + n, dtype=torch.int64)
    valid = (torch.arange(n) % scored_every) != 0
    t.update(ids, torch.rand(n, generator=g), valid)
    return t


def expected(table: ScoreTable, mean: float, epoch: int, seed: int, ratio: float):
    s = table.raw_scores
    below = s.double() < mean  # NaN -> False
    ids = torch.arange(table.offset, table.offset + table.num_samples, dtype=torch.int64)
    pruned = below & (prune_draws(seed, epoch, ids) < ratio)
    return ~pruned, below & ~pruned


def test_anneal_epoch():
    assert anneal_epoch(0.875, 8) == 7
    assert anneal_epoch(0.875, 10) == 9
    assert anneal_epoch(1.0, 5) == 5
    assert anneal_epoch(0.5, 3) == 2
    assert anneal_epoch(0.1, 10) == 1  # 0.1*10 is 1.0000000000000002 in floats


@pytest.mark.parametrize("offset", [0, 2**31 + 5, 2**62 - 3000])
def test_plan_follows_the_rule(offset):
    t = make_table(2003, offset=offset)
    mean = t.mean()
    plan = plan_epoch(t, mean, epoch=2, **KW)
    keep, boost = expected(t, mean, 2, 3, 0.3)
    assert torch.equal(plan.keep, keep) and torch.equal(plan.weight_boost, boost)
    assert plan.offset == offset and plan.num_samples == 2003
    # never-scored samples are kept and not boosted
    never = ~t.scored_mask()
    assert plan.keep[never].all() and not plan.weight_boost[never].any()
    # above-mean samples are never pruned
    assert plan.keep[t.raw_scores >= mean].all()


def test_mean_comparison_is_exact_in_float64():
    t = ScoreTable(3, s_init=1.0)
    x = float(np.float32(0.3))  # s == mean must not be "below"
    t.update(
        torch.arange(3), torch.tensor([x, x, np.nextafter(np.float32(x), np.float32(0))]), None
    )
    plan = plan_epoch(t, x, epoch=0, epochs=8, seed=0, prune_ratio=0.999, delta=0.875, rescale=True)
    assert plan.keep[:2].all()
    # a mean between two float32 values: the lower one is below it
    plan = plan_epoch(
        t, x - 1e-12, epoch=0, epochs=8, seed=0, prune_ratio=0.0, delta=1, rescale=True
    )
    assert plan.keep.all()


@pytest.mark.parametrize("splits", [[0, 1000, 3001], [0, 7, 8, 1500, 2999, 3001], [0, 3001]])
def test_union_of_shard_plans_is_the_whole_plan(splits):
    n, base = 3001, 2**40
    whole = make_table(n, offset=base, seed=1)
    mean = whole.mean()
    full = plan_epoch(whole, mean, epoch=1, **KW)
    keep, boost = [], []
    for lo, hi in zip(splits[:-1], splits[1:], strict=True):
        shard = ScoreTable(hi - lo, offset=base + lo, s_init=0.5)
        ids = torch.arange(base + lo, base + hi)
        shard.update(ids, whole.raw_scores[lo:hi], torch.ones(hi - lo, dtype=torch.bool))
        p = plan_epoch(shard, mean, epoch=1, **KW)
        keep.append(p.keep)
        boost.append(p.weight_boost)
    assert torch.equal(torch.cat(keep), full.keep)
    assert torch.equal(torch.cat(boost), full.weight_boost)


@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.6])
@pytest.mark.parametrize("epoch", [0, 3])
def test_pruning_rate_among_below_mean(ratio, epoch):
    n = 20_000
    t = make_table(n, seed=epoch + 10, scored_every=10**9)
    mean = t.mean()
    plan = plan_epoch(
        t, mean, epoch=epoch, epochs=10, seed=epoch, prune_ratio=ratio, delta=1.0, rescale=True
    )
    below = t.raw_scores < mean
    m = int(below.sum())
    rate = float((~plan.keep[below]).sum()) / m
    assert abs(rate - ratio) < 5 * np.sqrt(ratio * (1 - ratio) / m)
    assert plan.keep[~below].all()
    assert plan.num_kept() == n - int((~plan.keep).sum())


def test_same_epoch_same_plan_other_epoch_other_plan():
    t = make_table(4000)
    a = plan_epoch(t, t.mean(), epoch=1, **KW)
    assert a == plan_epoch(t, t.mean(), epoch=1, **KW)
    assert not torch.equal(a.keep, plan_epoch(t, t.mean(), epoch=2, **KW).keep)
    assert not torch.equal(a.keep, plan_epoch(t, t.mean(), epoch=1, **{**KW, "seed": 4}).keep)


def test_anneal_and_degenerate_cases_keep_everything():
    t = make_table(1001)
    for plan in (
        plan_epoch(t, t.mean(), epoch=7, **KW),  # anneal_epoch(0.875, 8) == 7
        plan_epoch(t, t.mean(), epoch=9, **KW),
        plan_epoch(t, float("nan"), epoch=0, **KW),  # nothing scored anywhere
        plan_epoch(t, t.mean(), epoch=0, **{**KW, "prune_ratio": 0.0}),
    ):
        assert plan.keep.all() and plan.keep.numel() == 1001
        assert not plan.weight_boost.any()
        assert plan.num_kept() == 1001


def test_loss_weights_boost_and_rescale():
    t = make_table(500)
    plan = plan_epoch(t, t.mean(), epoch=0, **KW)
    idx = torch.arange(500)
    lw = plan.loss_weights(idx)
    boost = plan.weight_boost
    assert torch.allclose(lw[boost], torch.tensor(1 / 0.7))
    assert torch.equal(lw[~boost], torch.ones(int((~boost).sum())))
    assert torch.equal(plan.loss_weights_for_ids(idx + plan.offset), lw)
    plain = plan_epoch(t, t.mean(), epoch=0, **{**KW, "rescale": False})
    assert torch.equal(plain.loss_weights(idx), torch.ones(500))
    assert torch.equal(plain.keep, plan.keep)


def test_bits_storage_and_views():
    t = make_table(1003)
    plan = plan_epoch(t, t.mean(), epoch=0, **KW)
    assert plan.keep_bits.dtype == torch.uint8 and plan.keep_bits.numel() == 126
    assert plan.nbytes == 2 * 126  # 2 bits per sample
    idx = torch.tensor([0, 5, 1002, 77])
    assert torch.equal(plan.is_kept(idx), plan.keep[idx])
    assert torch.equal(plan.is_boosted(idx), plan.weight_boost[idx])
    kept = plan.keep.nonzero().reshape(-1)
    assert torch.equal(plan.kept_local_indices(), kept)
    assert torch.equal(plan.kept_local_indices(13, 900), kept[(kept >= 13) & (kept < 900)])


def test_from_masks_and_state_dict_round_trip():
    keep = torch.tensor([True, False, True, True, False, True, True, True, True, False, True])
    boost = torch.tensor([True, True, False, False, False, True, False, False, False, False, True])
    plan = EpochPlan(4, keep, boost, prune_ratio=0.5, rescale=True, offset=2**62)
    assert torch.equal(plan.keep, keep)
    assert torch.equal(plan.weight_boost, boost & keep)  # pruned samples are never boosted
    buf = io.BytesIO()
    torch.save(plan.state_dict(), buf)
    buf.seek(0)
    back = EpochPlan.from_state_dict(torch.load(buf))
    assert back == plan and back.offset == 2**62 and back.epoch == 4
    assert torch.equal(back.loss_weights(torch.arange(11)), plan.loss_weights(torch.arange(11)))
    t = make_table(333)
    real = plan_epoch(t, t.mean(), epoch=0, **KW)
    assert EpochPlan.from_state_dict(real.state_dict()) == real


def test_bad_plan_inputs():
    with pytest.raises(ValueError):
        EpochPlan(
            0,
            keep_bits=torch.zeros(3, dtype=torch.uint8),
            boost_bits=torch.zeros(2, dtype=torch.uint8),
            num_samples=20,
        )
    with pytest.raises(ValueError, match="prune_ratio"):
        plan_epoch(make_table(10), 0.5, epoch=0, **{**KW, "prune_ratio": 1.0})

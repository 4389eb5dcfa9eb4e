"""Per-sample records (bit-exact int64 packing) and the locality-first assignment."""

from __future__ import annotations

import random

import pytest
import torch

from es_llm.sampling.records import Records, locality_first, pack, unpack


def test_pack_unpack_is_bit_exact_and_ids_never_pass_through_a_float():
    ids = torch.tensor([0, 2**53 + 1, 2**62 + 3, 7], dtype=torch.int64)  # not float-exact
    losses = torch.tensor([1.5, float("nan"), -0.0, float("inf")])
    scores = torch.tensor([1e-38, -3.25, float("-inf"), 2.0**-149])
    r = Records(ids=ids, losses=losses, scores=scores,
                valid=torch.tensor([True, False, True, False]),
                prune_weights=torch.tensor([1.0, 2.0, 0.5, 0.0]))  # fmt: skip
    packed = pack(r)
    assert packed.dtype == torch.int64 and packed.shape == (4, 3)
    u = unpack(packed)
    assert torch.equal(u.ids, ids)
    for a, b in ((u.losses, losses), (u.scores, scores), (u.prune_weights, r.prune_weights)):
        assert b.dtype == a.dtype == torch.float32
        assert torch.equal(a.view(torch.int32), b.view(torch.int32))
    assert torch.equal(u.valid, r.valid)


def test_pack_refuses_float_ids():
    r = Records(ids=torch.zeros(2), losses=torch.zeros(2), scores=torch.zeros(2),
                valid=torch.ones(2, dtype=torch.bool), prune_weights=torch.ones(2))  # fmt: skip
    with pytest.raises(TypeError, match="int64"):
        pack(r)


def _reference(positions: list[int], m: int, world: int) -> list[list[int]]:
    """The rule in words: own chosen first (up to q), surplus in order to short ranks in order."""
    q = len(positions) // world
    own = [[p for p in positions if p // m == r] for r in range(world)]
    shares = [o[:q] for o in own]
    surplus = [p for r in range(world) for p in own[r][q:]]
    for r in range(world):
        while len(shares[r]) < q:
            shares[r].append(surplus.pop(0))
    return shares


@pytest.mark.parametrize("world", [1, 2, 3, 4, 8])
def test_locality_first_matches_the_rule_and_partitions_the_selection(world):
    rng = random.Random(world)
    for _ in range(50):
        m = rng.randint(1, 6) * 2
        k = world * rng.randint(1, m // 2)
        positions = sorted(rng.sample(range(world * m), k))
        expect = _reference(positions, m, world)
        pos_t = torch.tensor(positions, dtype=torch.int64)
        got, moved = [], set()
        for r in range(world):
            a = locality_first(pos_t, per_rank_meta=m, world=world, rank=r)
            got.append(a.positions.tolist())
            assert torch.equal(pos_t[a.slot], a.positions)
            assert a.local.tolist() == [p // m == r for p in a.positions.tolist()]
            moved.add(int(a.moved))
        assert got == expect
        assert sorted(p for share in got for p in share) == positions
        assert moved == {sum(not loc for r in range(world) for loc in
                             [p // m == r for p in got[r]])}  # fmt: skip


def test_locality_first_needs_an_even_split():
    with pytest.raises(ValueError, match="split evenly"):
        locality_first(torch.arange(5), per_rank_meta=4, world=2, rank=0)

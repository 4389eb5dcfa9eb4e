"""ScoreTable: s_init for never-scored, guarded updates, exact large ids, checkpoint round trip."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch

from es_llm.sampling.scores import ScoreTable


def test_never_scored_reads_s_init():
    t = ScoreTable(10, offset=100, s_init=0.25)
    assert torch.equal(t.gather(torch.tensor([100, 105, 109])), torch.full((3,), 0.25))
    assert not t.scored_mask().any()
    assert t.sum_and_count() == (0.0, 0)
    assert math.isnan(t.mean())
    assert ScoreTable(8).s_init == 1 / 8


def test_update_only_valid_and_finite():
    t = ScoreTable(6, s_init=1.0)
    ids = torch.arange(6)
    new = torch.tensor([0.5, float("nan"), float("inf"), 2.0, 3.0, -1.0])
    valid = torch.tensor([True, True, True, False, True, True])
    t.update(ids, new, valid)
    assert t.scored_mask().tolist() == [True, False, False, False, True, True]
    assert t.gather(ids).tolist() == [0.5, 1.0, 1.0, 1.0, 3.0, -1.0]
    total, count = t.sum_and_count()
    assert count == 3 and total == pytest.approx(2.5)
    assert t.mean() == pytest.approx(2.5 / 3)


def test_update_without_valid_mask_and_shape_preserved():
    t = ScoreTable(4, s_init=0.0)
    t.update(torch.tensor([[0, 2]]), torch.tensor([[1.0, 2.0]]), None)
    assert t.gather(torch.tensor([[0, 1], [2, 3]])).tolist() == [[1.0, 0.0], [2.0, 0.0]]


def test_duplicate_ids_last_wins():
    t = ScoreTable(4)
    t.update(torch.tensor([1, 2, 1, 1]), torch.tensor([1.0, 2.0, 3.0, 4.0]), None)
    assert t.gather(torch.tensor([1, 2])).tolist() == [4.0, 2.0]
    # an invalid last occurrence does not hide an earlier valid one
    t.update(torch.tensor([3, 3]), torch.tensor([5.0, 6.0]), torch.tensor([True, False]))
    assert t.gather(torch.tensor([3])).tolist() == [5.0]


@pytest.mark.parametrize("offset", [2**31 - 3, 2**53 - 2, 2**62 - 5])
def test_large_ids_exact(offset):
    t = ScoreTable(10, offset=offset, s_init=0.0)
    ids = torch.tensor([offset + 1, offset + 2, offset + 9], dtype=torch.int64)
    t.update(ids, torch.tensor([1.0, 2.0, 9.0]), None)
    assert t.scored_mask().nonzero().reshape(-1).tolist() == [1, 2, 9]
    assert t.gather(ids).tolist() == [1.0, 2.0, 9.0]
    assert t.owns(torch.tensor([offset - 1, offset, offset + 10])).tolist() == [False, True, False]
    with pytest.raises(IndexError, match="outside this shard"):
        t.gather(torch.tensor([offset + 10], dtype=torch.int64))


def test_foreign_or_float_ids_are_rejected():
    t = ScoreTable(5, offset=10)
    with pytest.raises(IndexError):
        t.update(torch.tensor([9]), torch.tensor([1.0]), None)
    with pytest.raises(TypeError):
        t.gather(torch.tensor([10.0]))
    with pytest.raises(ValueError):
        t.update(torch.tensor([10, 11]), torch.tensor([1.0]), None)


def test_at_most_8_bytes_per_sample():
    t = ScoreTable(1000)
    assert t.nbytes / t.num_samples <= 8


def test_state_dict_round_trip_through_torch_save():
    t = ScoreTable(7, offset=2**40, s_init=0.3)
    t.update(torch.tensor([2**40, 2**40 + 6]), torch.tensor([1.5, 2.5]), None)
    buf = io.BytesIO()
    torch.save(t.state_dict(), buf)
    buf.seek(0)
    u = ScoreTable(7, offset=2**40, s_init=99.0)
    u.load_state_dict(torch.load(buf))
    ids = torch.arange(2**40, 2**40 + 7)
    assert torch.equal(u.gather(ids), t.gather(ids))
    assert torch.equal(u.scored_mask(), t.scored_mask())
    assert u.s_init == 0.3 and u.sum_and_count() == t.sum_and_count()


def test_state_dict_for_another_shard_is_refused():
    t = ScoreTable(7, offset=0)
    with pytest.raises(ValueError, match="shard"):
        ScoreTable(7, offset=7).load_state_dict(t.state_dict())
    with pytest.raises(ValueError, match="shard"):
        ScoreTable(8, offset=0).load_state_dict(t.state_dict())


def test_scores_bench_smoke(tmp_path):
    import json

    from es_llm.tools.bench_scores import run_scores_bench

    res = run_scores_bench(num_samples=5000, meta_batch=64, repeats=1, out_dir=str(tmp_path))
    on_disk = json.loads((tmp_path / "scores_bench.json").read_text())
    assert on_disk["num_samples"] == 5000 and on_disk["meta_batch"] == 64
    assert res["bytes_per_sample"]["total"] <= 8
    assert 0.5 < res["kept_fraction"] < 1.0
    assert set(res["plan_epoch_s"]) >= {"min", "median"}


# --- on a device, without host round-trips ---


def host_update(scores: torch.Tensor, local, new, valid) -> None:
    """The previous update: compact to the valid entries, keep each id's last, write."""
    ok = torch.isfinite(new) & valid
    local, new = local[ok], new[ok]
    for i, v in zip(local.tolist(), new.tolist(), strict=True):
        scores[i] = v


def test_update_equals_the_compacting_update_on_random_duplicates():
    rng = np.random.default_rng(3)
    for _ in range(200):
        n = int(rng.integers(1, 30))
        m = int(rng.integers(0, 40))
        t = ScoreTable(n, offset=2**40, s_init=0.5)
        t.update(torch.arange(2**40, 2**40 + n), torch.from_numpy(rng.random(n)).float(), None)
        t.update(torch.tensor([2**40]), torch.tensor([float("nan")]), None)
        want = t.raw_scores.clone()
        local = torch.from_numpy(rng.integers(0, n, m))
        new = torch.from_numpy(rng.normal(size=m)).float()
        new[torch.from_numpy(rng.random(m) < 0.1)] = float("nan")
        valid = torch.from_numpy(rng.random(m) < 0.7)
        host_update(want, local, new, valid)
        t.update(local + 2**40, new, valid)
        assert torch.equal(t.raw_scores.isnan(), want.isnan())
        assert torch.equal(t.raw_scores.nan_to_num(), want.nan_to_num())


def test_table_lives_on_its_device_and_checkpoints_through_the_host():
    # the meta device holds no data, so any read back to the host (an ownership check with
    # bool(), a boolean compaction, .item()) would raise here
    dev = torch.device("meta")
    t = ScoreTable(1000, offset=2**33, s_init=0.1, device=dev)
    assert t.device == dev and t.raw_scores.device == dev and t.nbytes == 4000
    ids = torch.arange(2**33, 2**33 + 64, device=dev)
    got = t.gather(ids.reshape(8, 8))
    assert got.device == dev and got.shape == (8, 8) and got.dtype == torch.float32
    t.update(ids, torch.empty(64, device=dev), torch.empty(64, dtype=torch.bool, device=dev))
    assert t.scored_mask().device == dev
    # a CPU table returns its live storage; state is always on the host
    c = ScoreTable(5, offset=2**33, s_init=0.1)
    c.update(torch.tensor([2**33 + 1]), torch.tensor([3.0]), None)
    sd = c.state_dict()
    assert sd["scores"].device.type == "cpu" and sd["scores"].data_ptr() == c.raw_scores.data_ptr()


def test_sum_and_count_chunked_in_float64(monkeypatch):
    import es_llm.sampling.scores as scores_mod

    monkeypatch.setattr(scores_mod, "_CHUNK", 7)
    t = ScoreTable(50, s_init=0.0)
    vals = torch.linspace(0.1, 5.0, 25)
    t.update(torch.arange(0, 50, 2), vals, None)
    total, count = t.sum_and_count()
    assert count == 25 and isinstance(total, float) and isinstance(count, int)
    assert total == pytest.approx(float(vals.double().sum()), rel=1e-12)

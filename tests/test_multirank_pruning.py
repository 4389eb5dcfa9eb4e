"""ESWP across shards with real processes (gloo): for given scores, seed and epoch, the union
of the 2 ranks' pruning plans is the 1-rank plan, through the loop's own code path
(`plan_epoch_global`: all-reduced sum/count -> global mean -> per-shard plan), and the ranks
agree on the steps of the epoch by an all-reduce MIN (`lockstep_available`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import free_port

from es_llm import dist as es_dist
from es_llm.data.sharding import RankSampler, shard_range
from es_llm.sampling.config import EvolvedSamplingConfig
from es_llm.sampling.eswp import global_mean_score, lockstep_available, plan_epoch_global
from es_llm.sampling.scores import ScoreTable

N = 1001  # odd: the shards differ in size
EPOCHS = 4
BATCH = 16


def _scores(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic scores of global ids, skewed so that one shard is mostly above the mean;
    every 7th id never scored (kept, unboosted)."""
    s = (ids.double() * 0.61).sin().abs() + ids.double() / N
    valid = (ids % 7) != 3
    return s.float(), valid


def _run(rank: int, world: int, port: int, out: str) -> None:
    if world > 1:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
        )
    cfg = EvolvedSamplingConfig(method="eswp", prune_ratio=0.4, delta=0.75)
    lo, hi = shard_range(N, rank, world)
    table = ScoreTable(hi - lo, offset=lo, s_init=1.0 / N)
    ids = torch.arange(lo, hi, dtype=torch.int64)
    s, valid = _scores(ids)
    table.update(ids, s, valid)
    sampler = RankSampler(hi - lo, offset=lo, seed=5, rank=rank)
    comm = es_dist.Communicator()
    result = {"mean": global_mean_score(comm, table), "epochs": []}
    for epoch in range(EPOCHS):
        sampler.set_epoch(epoch)
        plan = plan_epoch_global(comm, table, cfg, epoch=epoch, epochs=EPOCHS, seed=11)
        result["epochs"].append(
            {
                "keep": plan.keep.tolist(),
                "boost": plan.weight_boost.tolist(),
                "weights": plan.loss_weights(torch.arange(hi - lo)).tolist(),
                "available": lockstep_available(comm, sampler, plan),
                "local_kept": plan.num_kept(),
            }
        )
    if world > 1:
        gathered: list = [None] * world
        dist.all_gather_object(gathered, result)
        es_dist.destroy()
    else:
        gathered = [result]
    if rank == 0:
        Path(out).write_text(json.dumps(gathered))


def _launch(world: int, tmp_path: Path) -> list[dict]:
    out = tmp_path / f"plan-w{world}.json"
    if world == 1:
        _run(0, 1, 0, str(out))
    else:
        mp.start_processes(
            _run, args=(world, free_port(), str(out)), nprocs=world, start_method="spawn"
        )
    return json.loads(out.read_text())


@pytest.mark.multiproc
def test_two_rank_plans_union_to_the_one_rank_plan(tmp_path: Path) -> None:
    (one,) = _launch(1, tmp_path)
    r0, r1 = _launch(2, tmp_path)
    # the global mean is the same on every rank and equals the 1-rank mean
    assert r0["mean"] == pytest.approx(one["mean"], rel=1e-12) and r0["mean"] == r1["mean"]
    pruned_any = False
    for e in range(EPOCHS):
        a, b, c = r0["epochs"][e], r1["epochs"][e], one["epochs"][e]
        for key in ("keep", "boost", "weights"):
            assert a[key] + b[key] == c[key], (e, key)
        # lock-step: both ranks agree on the MIN of their kept counts
        assert a["available"] == b["available"] == min(a["local_kept"], b["local_kept"])
        pruned_any |= not all(c["keep"])
        if e >= 3:  # ceil(0.75 * 4) = 3: annealing, full data, no boost
            assert all(c["keep"]) and not any(c["boost"])
    assert pruned_any
    # kept below-mean samples are boosted by 1/(1 - 0.4)
    assert max(one["epochs"][0]["weights"]) == pytest.approx(1 / 0.6)
    # the shards' kept counts differ, so the MIN really binds
    assert r0["epochs"][0]["local_kept"] != r1["epochs"][0]["local_kept"]

"""An explicit data-parallel group (real processes, gloo): 4 processes as data-parallel size
2 x model-parallel size 2. Model-parallel peers draw and train identical samples, every
collective of the data path runs over the data-parallel group only, and the global selection
of every step is the one a 2-rank pure data-parallel run makes."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp
from conftest import free_port

from es_llm.dist import Communicator
from es_llm.sampling.config import EvolvedSamplingConfig
from es_llm.sampling.datapath import ESDataPath
from es_llm.sampling.plan import RunPlan

N, T = 64, 3
DS = {"train_batch_size": 4, "train_micro_batch_size_per_gpu": 2}


class CountingCommunicator(Communicator):
    """The real communicator; it notes how many ranks each all-gather gathered from."""

    def __init__(self, group=None) -> None:
        super().__init__(group)
        self.gathered_from: list[int] = []

    def all_gather_cat(self, t: torch.Tensor) -> torch.Tensor:
        out = super().all_gather_cat(t)
        self.gathered_from.append(out.shape[0] // t.shape[0])
        return out


def _scorer():
    """Deterministic losses of the ids that drift with each call (NaN for some ids): a
    stand-in for the model through the public scorer seam."""
    calls = [0]

    def score(tokens: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        calls[0] += 1
        loss = ((ids.double() * 0.37 + calls[0] * 0.11).sin().abs() * 3 + 0.5).float()
        loss[ids % 11 == 4] = float("nan")
        return loss, torch.isfinite(loss)

    return score


def _run(rank: int, world: int, mp_size: int, port: int, out: str) -> None:
    tdist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    dp_size = world // mp_size
    # rank = dp_rank * mp_size + mp_rank; a data-parallel group holds one model-parallel rank
    groups = [tdist.new_group([d * mp_size + m for d in range(dp_size)]) for m in range(mp_size)]
    comm = CountingCommunicator(groups[rank % mp_size] if mp_size > 1 else None)
    assert (comm.rank, comm.size) == (rank // mp_size, dp_size)
    es = EvolvedSamplingConfig(method="eswp", selection_ratio=0.5, burn_in_steps=2)
    plan = RunPlan.build(DS, es, dp_size=comm.size, num_samples=N, epochs=2, seed=3)
    ds = datasets.Dataset.from_dict({"input_ids": [[i] * T for i in range(N)]})
    dp = ESDataPath(plan, ds, comm=comm, scorer=_scorer())
    steps = []
    while (draw := dp.next_step()) is not None:
        a = dp.assign(draw)
        assert torch.equal(a.tokens[:, 0], a.ids)
        for i in range(0, a.ids.numel(), plan.geo.micro):
            ids = a.ids[i : i + plan.geo.micro]
            dp.observe_training_losses(a, ids, (ids.float() * 0.01).cos())
        rec = dp.finish_step(a)
        steps.append(
            {"drawn": draw.ids.tolist(), "trained": a.ids.tolist(), "digest": rec["digest"]}
        )
    mine = {"steps": steps, "gathered_from": sorted(set(comm.gathered_from)),
            "pruned": dp.totals["pruned"]}  # fmt: skip
    everyone: list = [None] * world
    tdist.all_gather_object(everyone, mine)
    tdist.barrier()
    tdist.destroy_process_group()
    if rank == 0:
        Path(out).write_text(json.dumps(everyone))


def _launch(world: int, mp_size: int, tmp_path: Path) -> list[dict]:
    out = tmp_path / f"w{world}-mp{mp_size}.json"
    mp.start_processes(
        _run, args=(world, mp_size, free_port(), str(out)), nprocs=world, start_method="spawn"
    )
    return json.loads(out.read_text())


@pytest.mark.multiproc
def test_dp2_x_mp2_selects_what_a_pure_two_rank_run_selects(tmp_path: Path) -> None:
    four = _launch(4, 2, tmp_path)
    two = _launch(2, 1, tmp_path)
    assert len(two[0]["steps"]) > 10 and two[0]["pruned"] > 0  # burn-in, selection, ESWP
    for r, run in enumerate(four):
        # every all-gather (records, plain-step losses) spans the 2 data-parallel ranks only
        assert run["gathered_from"] == [2]
        # model-parallel peers draw and train exactly the samples of their data-parallel rank
        assert run["steps"] == two[r // 2]["steps"]
        assert run["pruned"] == two[0]["pruned"]
    # and the two data-parallel ranks trained disjoint samples of one global selection
    for s0, s1 in zip(four[0]["steps"], four[2]["steps"], strict=True):
        assert s0["digest"] == s1["digest"]
        assert not set(s0["trained"]) & set(s1["trained"])

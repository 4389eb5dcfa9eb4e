"""ESDataPath without an engine: one process, a synthetic dataset whose tokens are the ids,
an injected scorer. The drivers (loop, HF Trainer) are covered by the end-to-end tests."""

from __future__ import annotations

import io

import datasets
import pytest
import torch

from es_llm.dist import Communicator
from es_llm.sampling.config import EvolvedSamplingConfig
from es_llm.sampling.datapath import DataPathError, ESDataPath
from es_llm.sampling.geometry import BatchGeometry
from es_llm.sampling.plan import RunPlan
from es_llm.sampling.schedule import estimate_total_steps

N, T = 64, 3
GEO = BatchGeometry(world=1, train_batch=4, micro=2, grad_accum=2, meta_batch=8)
DS = {"train_batch_size": 4, "train_micro_batch_size_per_gpu": 2}


def _dataset() -> datasets.Dataset:
    return datasets.Dataset.from_dict({"input_ids": [[i] * T for i in range(N)]})


def _scorer(tokens: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    assert torch.equal(tokens[:, 0], ids)  # the draw's tokens are its samples'
    loss = (ids.double() * 0.37).sin().abs().float() * 3 + 0.5
    loss[ids % 11 == 4] = float("nan")
    return loss, torch.isfinite(loss)


def _path(method: str = "eswp", **kw) -> ESDataPath:
    es = EvolvedSamplingConfig(method=method, selection_ratio=0.5, burn_in_steps=2, **kw)
    plan = RunPlan.build(DS, es, dp_size=1, num_samples=N, epochs=3, seed=3)
    assert plan.geo == GEO or not es.uses_scoring_forward  # prune: B_meta = B
    return ESDataPath(plan, _dataset(), comm=Communicator(), scorer=_scorer)


def _run(dp: ESDataPath, steps: int | None = None) -> list[dict]:
    out = []
    while steps is None or len(out) < steps:
        draw = dp.next_step()
        if draw is None:
            break
        a = dp.assign(draw)
        assert torch.equal(a.tokens[:, 0], a.ids)  # trained tokens belong to the trained ids
        assert a.ids.numel() == GEO.train_per_rank
        for i in range(0, a.ids.numel(), GEO.micro):
            ids = a.ids[i : i + GEO.micro]
            dp.observe_training_losses(a, ids, (ids.float() * 0.01).cos())
        rec = dp.finish_step(a)
        out.append({k: rec[k] for k in ("step", "epoch", "digest", "selected", "scored")})
    return out


def test_runs_exactly_the_planned_steps_with_one_host_sync_each():
    dp = _path("es")
    recs = _run(dp)
    planned = estimate_total_steps(dp.es, min_local=N, train_per_rank=4, meta_per_rank=8, epochs=3)
    assert len(recs) == dp.total_steps == planned
    assert dp.next_step() is None
    assert dp.host_syncs == len(recs)
    assert [r["step"] for r in recs] == list(range(1, len(recs) + 1))
    assert {r["epoch"] for r in recs} == {0, 1, 2}
    assert [r["scored"] for r in recs[:3]] == [0, 0, 8]  # burn-in, then selection


def test_eswp_prunes_and_stops_within_the_plan():
    dp = _path()
    recs = _run(dp)
    assert 0 < len(recs) <= dp.total_steps
    assert dp.totals["pruned"] > 0  # ESWP pruned in the middle epoch
    assert {r["epoch"] for r in recs} == {0, 1, 2}


@pytest.mark.parametrize("cut", [1, 5, 9])
def test_state_dict_round_trip_continues_exactly(cut):
    ref = _run(_path())
    first = _path()
    head = _run(first, cut)
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    second = _path()
    second.load_state_dict(torch.load(buf, weights_only=True))
    assert head + _run(second) == ref


def test_a_state_from_another_configuration_is_refused():
    dp = _path()
    _run(dp, 2)
    other = _path(prune_ratio=0.7)
    with pytest.raises(DataPathError, match="different run configuration.*prune_ratio"):
        other.load_state_dict(dp.state_dict(), source="state.pt")


def test_too_little_data_for_one_meta_batch_is_an_input_error():
    es = EvolvedSamplingConfig(method="es", selection_ratio=0.5)
    with pytest.raises(DataPathError, match="fewer than one meta-batch of 8"):
        RunPlan.build(DS, es, dp_size=1, num_samples=5, epochs=1)


@pytest.mark.parametrize("method", ["lp", "es", "prune"])
def test_plain_steps_score_by_the_methods_own_rule(method):
    """Burn-in / plain steps score for free from the training losses, by the rule the method's
    selection reads: lp keeps the last loss (its weight is the progress since), every other
    method the beta2 EMA from s_init."""
    dp = _path(method)
    a = dp.assign(dp.next_step())
    for i in range(0, a.ids.numel(), GEO.micro):
        ids = a.ids[i : i + GEO.micro]
        dp.observe_training_losses(a, ids, (ids.float() * 0.01).cos())
    dp.finish_step(a)
    got = dp.table.gather(a.ids)
    loss = (a.ids.float() * 0.01).cos()
    if method == "lp":
        assert torch.equal(got, loss)
    else:
        b2 = dp.es.beta2
        s_init = torch.full_like(loss, dp.es.s_init if dp.es.s_init is not None else 1.0 / N)
        torch.testing.assert_close(got, b2 * s_init + (1 - b2) * loss, rtol=0, atol=1e-6)


def test_the_sampling_package_imports_no_engine_and_no_process_group():
    """The data path talks to other ranks only through the communicator it is given."""
    import ast
    from pathlib import Path

    import es_llm.sampling

    banned = ("torch.distributed", "deepspeed", "es_llm.dist")
    bad = []
    for f in Path(es_llm.sampling.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            bad += [f"{f.name}: {n}" for n in names if n.startswith(banned)]
    assert not bad

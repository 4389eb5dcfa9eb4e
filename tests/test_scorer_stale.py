"""`scorer: stale` in one process: the config field, the data path without a scoring forward
(weights from the stored score and last training loss), its state round trip and the
reachability of every sample. W-invariance: tests/test_multirank_selection.py; a real run
stopped and resumed: tests/test_train_resume.py."""

from __future__ import annotations

import argparse
import io

import datasets
import pytest
import torch

from es_llm.cliargs import add_run_arguments, options_from_args
from es_llm.dist import Communicator
from es_llm.drivers.deepspeed.dsconfig import es_config_for_run
from es_llm.errors import InputError
from es_llm.sampling.config import (
    STALE_EPSILON,
    ESConfigError,
    EvolvedSamplingConfig,
    es_config_from_ds_config,
)
from es_llm.sampling.datapath import DataPathError, ESDataPath
from es_llm.sampling.plan import RunPlan
from es_llm.sampling.policies import es_weights
from es_llm.sampling.selector import select_step

N, T = 64, 3
DS = {"train_batch_size": 4, "train_micro_batch_size_per_gpu": 2}


def _section(**kw) -> EvolvedSamplingConfig | None:
    return es_config_from_ds_config({"evolved_sampling": kw})


# ------------------------------------------------------------------ the config field
def test_learner_is_the_default_and_changes_no_other_default():
    cfg = EvolvedSamplingConfig()
    assert cfg.scorer == "learner" and cfg.runs_scoring_forward and not cfg.stale
    assert (cfg.epsilon, cfg.burn_in_steps, cfg.burn_in_epochs) == (0.0, None, None)
    assert _section(scorer="learner") == cfg


def test_stale_defaults_one_burn_in_epoch_and_a_uniform_share_unless_set():
    cfg = _section(scorer="stale")
    assert cfg.stale and not cfg.runs_scoring_forward and cfg.uses_scoring_forward
    assert (cfg.burn_in_epochs, cfg.burn_in_steps, cfg.epsilon) == (1, None, STALE_EPSILON)
    cfg = _section(scorer="stale", burn_in_steps=3, epsilon=0.5)
    assert (cfg.burn_in_epochs, cfg.burn_in_steps, cfg.epsilon) == (None, 3, 0.5)


@pytest.mark.parametrize("method", ["uniform", "prune", "excess_prune"])
def test_stale_is_accepted_by_methods_without_a_scoring_forward_and_changes_nothing(method):
    cfg = _section(method=method, scorer="stale")
    plain = _section(method=method)
    assert not cfg.stale and cfg.model_dump() == {**plain.model_dump(), "scorer": "stale"}


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"scorer": "fresh"}, "evolved_sampling.scorer: unknown value 'fresh'; one of "
         "'learner', 'stale', 'proxy'"),
        ({"scorer": "stale", "method": "lp"}, "evolved_sampling.scorer: scorer 'stale' does "
         "not fit method 'lp'"),
        ({"scorer": "stale", "epsilon": 0}, "evolved_sampling.epsilon: epsilon must be in "
         "(0, 1] with scorer 'stale'"),
    ],
)  # fmt: skip
def test_bad_scorer_settings_are_one_line_naming_the_field(section, message):
    with pytest.raises(ESConfigError) as e:
        _section(**section)
    lines = str(e.value).splitlines()
    assert len(lines) == 2 and lines[1].strip().startswith(message), str(e.value)


def test_the_scorer_flag_fills_the_run_config_and_choices_are_the_implemented_ones():
    p = argparse.ArgumentParser()
    add_run_arguments(p)
    p.add_argument("--out", default="x")
    opts = options_from_args(p.parse_args(["--scorer", "stale", "--method", "es"]))
    assert opts.scorer == "stale"
    ds = {"evolved_sampling": {"method": "eswp"}}
    assert es_config_for_run(ds, None, {}, scorer=opts.scorer).stale
    assert es_config_for_run(ds, None, {}).scorer == "learner"
    assert es_config_for_run(ds, None, {"scorer": "stale"}).stale  # --es scorer=stale
    with pytest.raises(SystemExit):
        p.parse_args(["--scorer", "fresh"])


def test_a_uniform_share_that_rounds_to_no_place_is_refused_by_the_plan():
    es = _section(scorer="stale", epsilon=0.1)  # round(0.1 x 4) = 0
    with pytest.raises(InputError, match=r"epsilon: .*round\(0.1 x 4\) = 0 places"):
        RunPlan.build(DS, es, dp_size=1, num_samples=N, epochs=2)


# ------------------------------------------------------------------ the data path
def _dataset() -> datasets.Dataset:
    return datasets.Dataset.from_dict({"input_ids": [[i] * T for i in range(N)]})


def _train_loss(ids: torch.Tensor, step: int) -> torch.Tensor:
    """Synthetic training losses: half the samples (odd ids) are nearly learned."""
    loss = (ids.double() * 0.37 + step * 0.05).sin().abs().float() * 3 + 0.5
    return torch.where(ids % 2 == 1, torch.full_like(loss, 1e-4), loss)


def _path(epochs: int = 3, **kw) -> ESDataPath:
    es = EvolvedSamplingConfig(method="es", selection_ratio=0.5, scorer="stale", **kw)
    plan = RunPlan.build(DS, es, dp_size=1, num_samples=N, epochs=epochs, seed=3)
    return ESDataPath(plan, _dataset(), comm=Communicator(), scorer=None)  # no forward


def _run(dp: ESDataPath, steps: int | None = None, trained: list | None = None) -> list[dict]:
    out = []
    while steps is None or len(out) < steps:
        draw = dp.next_step()
        if draw is None:
            break
        a = dp.assign(draw)
        assert torch.equal(a.tokens[:, 0], a.ids)
        for i in range(0, a.ids.numel(), 2):
            ids = a.ids[i : i + 2]
            dp.observe_training_losses(a, ids, _train_loss(ids, draw.step))
        rec = dp.finish_step(a)
        if trained is not None:
            trained.append((rec["phase"], a.ids.tolist()))
        out.append({k: rec[k] for k in ("step", "epoch", "digest", "train_loss", "scored")})
    return out


def test_stale_selects_from_stored_losses_without_a_scoring_forward():
    dp = _path(epsilon=0.25)
    assert dp.burn_in_steps == dp.plan.plain_steps_per_epoch == N // 4  # one burn-in epoch
    recs = _run(dp, dp.burn_in_steps)  # every sample trained once: score and last loss set
    ids = torch.arange(N)
    loss0 = _train_loss(ids, 0)
    last = dp.store.stale_losses(ids)
    scores = dp.table.gather(ids)
    assert bool(torch.isfinite(dp.table.raw_scores).all())
    draw = dp.next_step()
    assert draw.selecting
    a = dp.assign(draw)  # would raise without a scorer if it ran the scoring forward
    # nothing changed at selection: the scores move only with training losses
    assert torch.equal(dp.table.gather(ids), scores)
    for i in range(0, a.ids.numel(), 2):
        dp.observe_training_losses(a, a.ids[i : i + 2], _train_loss(a.ids[i : i + 2], 99))
    rec = dp.finish_step(a)
    assert rec["scored"] == 0 and dp.totals["scored_samples"] == 0
    assert dp.timers.totals["score_fwd_s"] == 0.0
    assert rec["train_loss"] == pytest.approx(_train_loss(a.ids, 99).double().mean().item())
    # the trained samples' score and last loss took the training loss; the rest kept theirs
    new_loss = _train_loss(a.ids, 99)
    assert torch.equal(dp.store.stale_losses(a.ids), new_loss)
    _, want = es_weights(scores[a.ids], new_loss, 0.2, 0.8)
    torch.testing.assert_close(dp.table.gather(a.ids), want, rtol=0, atol=1e-6)
    rest = torch.tensor([i for i in draw.ids.tolist() if i not in set(a.ids.tolist())])
    assert torch.equal(dp.store.stale_losses(rest), last[rest])
    # the selection is the ES draw over the stored score and last loss of the meta-batch
    sel = select_step(
        dp.es, step=draw.step, seed=3, ids=draw.ids, losses=last[draw.ids],
        prev_scores=scores[draw.ids], valid=None, k=4,
    )  # fmt: skip
    assert sorted(draw.ids[sel.positions].tolist()) == sorted(a.ids.tolist())
    assert len(recs) == N // 4 and not torch.equal(last, loss0 * 0)


@pytest.mark.parametrize("cut", [3, 17, 22])  # in burn-in, right after it, later
def test_stale_state_round_trip_continues_exactly(cut):
    ref = _run(_path(epsilon=0.25))
    first = _path(epsilon=0.25)
    head = _run(first, cut)
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    assert state["scores"]["last_loss"].shape == (N,)
    second = _path(epsilon=0.25)
    second.load_state_dict(state)
    assert head + _run(second) == ref
    assert len({r["digest"] for r in ref}) == len(ref)


def test_a_learner_state_does_not_resume_a_stale_run():
    es = EvolvedSamplingConfig(method="es", selection_ratio=0.5, epsilon=0.25)
    plan = RunPlan.build(DS, es, dp_size=1, num_samples=N, epochs=3, seed=3)
    learner = ESDataPath(plan, _dataset(), comm=Communicator(), scorer=None)
    state = learner.state_dict()
    # a state written before the scorer field existed still resumes a learner run
    del state["fingerprint"]["evolved_sampling"]["scorer"]
    ESDataPath(plan, _dataset(), comm=Communicator()).load_state_dict(state)
    with pytest.raises(DataPathError, match="different run configuration.*'scorer': 'stale'"):
        _path(epsilon=0.25).load_state_dict(state, source="state.pt")


def test_every_sample_is_trained_in_a_selection_step_even_with_a_tiny_stale_weight():
    """Half the samples are nearly learned (loss 1e-4 against 0.5..3.5): the weighted draw
    almost never takes them, the uniform share still does. Over the selection epochs every
    one of them is trained at least once after the burn-in epoch."""
    dp = _path(epochs=20, epsilon=0.25)
    trained: list = []
    _run(dp, trained=trained)
    after_burn_in = {i for phase, ids in trained if phase.value == "select" for i in ids}
    assert after_burn_in == set(range(N))
    # and the weights did prefer the high-loss samples
    picks = [i for phase, ids in trained if phase.value == "select" for i in ids]
    assert sum(i % 2 == 0 for i in picks) > 2 * sum(i % 2 == 1 for i in picks)


def test_the_uniform_share_bounds_every_samples_inclusion_from_below():
    """One sample with a negligible weight in each meta-batch of 8 (k 4, 1 uniform place):
    it is taken with frequency >= 1 / (8 - 3) whatever its weight."""
    es = _section(scorer="stale", epsilon=0.25)
    hits, steps = 0, 2000
    losses = torch.tensor([1e-9] + [2.0] * 7)
    for step in range(steps):
        sel = select_step(
            es, step=step, seed=0, ids=torch.arange(8), losses=losses,
            prev_scores=losses, valid=None, k=4,
        )  # fmt: skip
        hits += int(0 in sel.positions.tolist())
    assert hits / steps == pytest.approx(1 / 5, abs=0.03)

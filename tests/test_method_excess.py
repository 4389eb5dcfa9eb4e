"""Methods excess and excess_prune: the weights and scores on known losses, the laws of the
draw, the junk-versus-clean case the excess exists for, the traits and the keys."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from sampling_law import successive_sampling_inclusion

from es_llm.sampling.config import ESConfigError, EvolvedSamplingConfig, es_config_from_ds_config
from es_llm.sampling.methods import Visit, get_method, option_owners
from es_llm.sampling.methods.eswp import PruningOptions
from es_llm.sampling.methods.excess import EXCESS_TINY, REF_LOSS, ExcessOptions, excess_weights
from es_llm.sampling.policies import score_update
from es_llm.sampling.pruning import plan_epoch
from es_llm.sampling.scores import ScoreTable
from es_llm.sampling.selector import select_step


def _select(cfg, losses, prev, ref, k, step=0, valid=None):
    n = len(losses)
    return select_step(
        cfg,
        step=step,
        seed=5,
        ids=torch.arange(n),
        losses=torch.tensor(losses),
        prev_scores=torch.tensor(prev),
        valid=valid,
        k=k,
        state={REF_LOSS: torch.tensor(ref)},
    )


# --- the weight ---


def test_excess_weight_formula():
    s = torch.tensor([3.0, 1.0, 2.0, 1e-3])
    lo = torch.tensor([2.5, 4.0, 1.0, 3.0])
    ref = torch.tensor([1.0, 2.0, 1.5, 2.0])
    w = excess_weights(s, lo, ref, beta1=0.2, floor=0.5)
    # beta1 * max(s - ref, 0) + (1 - beta1) * max(l - ref, 0)
    raw = torch.tensor([0.2 * 2.0 + 0.8 * 1.5, 0.0 + 0.8 * 2.0, 0.2 * 0.5 + 0.0, 0.0 + 0.8 * 1.0])
    torch.testing.assert_close(w, raw + 0.5 * raw.mean() + EXCESS_TINY)
    assert w.dtype == torch.float32
    # the method applies exactly this weight (trimming off)
    cfg = EvolvedSamplingConfig(method="excess", excess_floor=0.5)
    sel = select_step(cfg, step=0, seed=1, ids=torch.arange(4), losses=lo, prev_scores=s,
                      valid=None, k=2, state={REF_LOSS: ref})  # fmt: skip
    torch.testing.assert_close(sel.weights, w)


def test_no_excess_anywhere_is_a_uniform_positive_weight():
    lo = torch.linspace(1, 6, 6)
    w = excess_weights(torch.full((6,), 1e-4), lo, lo + 0.5, beta1=0.2, floor=0.5)
    assert torch.all(w > 0) and torch.unique(w).numel() == 1


def test_the_floor_is_a_mean_over_valid_samples_and_a_bad_reference_is_never_chosen():
    s = torch.zeros(5)
    lo = torch.tensor([2.0, 3.0, 4.0, 100.0, 5.0])
    ref = torch.tensor([1.0, 1.0, 1.0, 0.0, float("nan")])
    valid = torch.tensor([True, True, True, False, True])
    w = excess_weights(s, lo, ref, beta1=0.0, floor=1.0, valid=valid)
    # mean over the valid samples with a finite weight: (1 + 2 + 3) / 3 = 2
    torch.testing.assert_close(w[:3], torch.tensor([3.0, 4.0, 5.0]))
    assert math.isnan(float(w[4]))
    cfg = EvolvedSamplingConfig(method="excess", excess_floor=1.0, beta1=0.0)
    for step in range(20):
        sel = _select(cfg, lo.tolist(), s.tolist(), ref.tolist(), 3, step, valid)
        assert sel.positions.tolist() == [0, 1, 2]


def test_excess_draw_follows_the_exact_without_replacement_law():
    prev = [3.0, 2.5, 2.0, 1.0, 0.5]
    losses = [2.0, 2.4, 3.2, 0.6, 1.5]
    ref = [0.5, 2.0, 1.0, 0.5, 1.6]
    cfg = EvolvedSamplingConfig(method="excess", excess_floor=0.5, selection_ratio=0.4)
    w = excess_weights(
        torch.tensor(prev), torch.tensor(losses), torch.tensor(ref), cfg.beta1, 0.5
    ).tolist()
    want = successive_sampling_inclusion(w, 2)
    steps = 3000
    counts = np.zeros(5)
    for step in range(steps):
        counts[_select(cfg, losses, prev, ref, 2, step).positions.numpy()] += 1
    got = counts / steps
    # binomial standard error at 3000 draws is <= 0.0092; 5 sigma
    assert np.max(np.abs(got - want)) < 0.046, (got, want)
    assert got[2] == got.max()  # the largest excess, most often


def test_junk_above_the_clean_loss_is_what_es_takes_and_excess_leaves():
    # junk: high loss, and the reference is as bad on it; clean: lower loss, reference far below
    losses = [5.0, 5.2, 4.9, 3.0, 2.8, 3.1]
    ref = [5.1, 5.0, 5.0, 1.0, 1.2, 1.0]
    prev = [5.0, 5.2, 5.0, 3.2, 3.0, 3.3]
    junk, clean = {0, 1, 2}, {3, 4, 5}
    es = EvolvedSamplingConfig(method="topk")
    ex = EvolvedSamplingConfig(method="excess", excess_floor=0.0)
    assert set(_select(es, losses, prev, ref, 3).positions.tolist()) == junk
    took = [set(_select(ex, losses, prev, ref, 3, step).positions.tolist()) for step in range(40)]
    # junk 1 has a small excess (0.2, EMA 0.2): drawn now and then, the rest never
    assert sum(len(t & {0, 2}) for t in took) == 0
    assert sum(len(t & clean) for t in took) > 0.9 * 3 * 40


def test_excess_score_is_the_loss_ema_so_its_excess_is_the_excess_ema():
    cfg = EvolvedSamplingConfig(method="excess", beta2=0.8)
    ref = torch.tensor([1.0, 2.0])
    s = torch.tensor([3.0, 2.5])
    lo = torch.tensor([2.0, 4.0])
    sel = select_step(cfg, step=0, seed=1, ids=torch.arange(2), losses=lo, prev_scores=s,
                      valid=None, k=1, state={REF_LOSS: ref})  # fmt: skip
    torch.testing.assert_close(sel.new_scores, 0.8 * s + 0.2 * lo)
    torch.testing.assert_close(sel.new_scores - ref, 0.8 * (s - ref) + 0.2 * (lo - ref))
    # plain steps (burn-in, anneal) keep the same score without the reference
    torch.testing.assert_close(score_update("excess", s, lo, 0.8), 0.8 * s + 0.2 * lo)


# --- excess_prune ---


def test_excess_prune_keeps_the_last_excess_and_prunes_below_the_mean_excess():
    ref = torch.tensor([4.0, 4.1, 3.9, 4.0, 1.0, 1.2, 0.9, 1.1])
    lo = torch.tensor([4.1, 4.2, 4.0, 4.05, 3.0, 3.5, 2.9, 3.1])  # junk first, then clean
    s = score_update("excess_prune", torch.full((8,), 7.0), lo, 0.8, state={REF_LOSS: ref})
    torch.testing.assert_close(s, lo - ref)  # the last observed excess, no EMA
    with pytest.raises(ValueError, match=r"needs the per-sample state \['ref_loss'\]"):
        get_method("excess_prune").evaluate(
            EvolvedSamplingConfig(method="excess_prune"),
            Visit(s, lo),
        )
    table = ScoreTable(8, s_init=1e-3)
    table.update(torch.arange(8), s, torch.ones(8, dtype=torch.bool))
    mean = float(s.mean())
    # prune_ratio just below 1: every below-mean sample is pruned (the draw is < 1 - 1e-9)
    plan = plan_epoch(table, mean, epoch=0, epochs=4, seed=3, prune_ratio=0.999999,
                      delta=0.75, rescale=True)  # fmt: skip
    assert plan.keep.tolist() == [False] * 4 + [True] * 4  # the junk goes, the clean stays


def test_traits_and_keys():
    ex, xp = get_method("excess"), get_method("excess_prune")
    assert ex.state == xp.state == (REF_LOSS,)
    got = [(m.scoring_forward, m.plain_steps_update_scores, m.prunes_epochs, m.deterministic)
           for m in (ex, xp)]  # fmt: skip
    assert got == [(True, True, False, False), (False, True, True, False)]
    assert option_owners(ExcessOptions) == ("excess",)
    assert "excess_prune" in option_owners(PruningOptions)
    assert EvolvedSamplingConfig(method="excess_prune").effective_selection_ratio == 1.0
    for bad in (-0.1, math.inf, math.nan):
        with pytest.raises(ValidationError, match="excess_floor"):
            ExcessOptions(excess_floor=bad)
    with pytest.raises(ESConfigError, match=r"evolved_sampling\.excess_floor"):
        es_config_from_ds_config({"evolved_sampling": {"method": "excess", "excess_floor": -1}})
    # accepted unused by other methods (compare --es passes it to every run), like lp_floor
    assert EvolvedSamplingConfig(method="es", excess_floor=2.0).excess_floor == 2.0


# --- the per-sample reference loss in the score store ---


def test_the_store_keeps_ref_loss_per_shard_gathers_it_and_restores_it_exactly():
    from es_llm.sampling.store import ScoreStore

    cfg = EvolvedSamplingConfig(method="excess_prune")
    store = ScoreStore(cfg, lo=10, hi=16, num_samples=20, device=torch.device("cpu"))
    with pytest.raises(ValueError, match=r"needs the per-sample state \['ref_loss'\]"):
        store.column_state(torch.tensor([10]))
    with pytest.raises(ValueError, match="shard holds 6"):
        store.set_column(REF_LOSS, torch.zeros(5))
    with pytest.raises(ValueError, match="reads no per-sample column 'other'"):
        store.set_column("other", torch.zeros(6))
    ref = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0]) / 3  # not exact in binary: bits matter
    store.set_column(REF_LOSS, ref)
    got = store.column_state(torch.tensor([15, 10, 12]))
    assert torch.equal(got[REF_LOSS], ref[[5, 0, 2]])
    # plain steps of excess_prune store the last excess l - l_ref of the observed ids
    store.observe(torch.tensor([11, 14]), torch.tensor([3.0, float("nan")]))
    scores = store.table.gather(torch.arange(10, 16))
    assert float(scores[1]) == pytest.approx(3.0 - 2.0 / 3)
    assert float(scores[4]) == pytest.approx(store.table.s_init)  # a NaN loss keeps the score
    saved = store.state_dict()
    fresh = ScoreStore(cfg, lo=10, hi=16, num_samples=20, device=torch.device("cpu"))
    fresh.set_column(REF_LOSS, torch.zeros(6))  # a recomputed column is replaced by the saved
    fresh.load_state_dict(saved)
    assert torch.equal(fresh.columns[REF_LOSS], ref)
    a, b = fresh.table.raw_scores, store.table.raw_scores
    assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a[~a.isnan()], b[~b.isnan()])
    es_store = ScoreStore(EvolvedSamplingConfig(method="es"), lo=10, hi=16, num_samples=20,
                          device=torch.device("cpu"))  # fmt: skip
    with pytest.raises(ValueError, match=r"saved per-sample columns \['ref_loss'\]"):
        es_store.load_state_dict(saved)


def test_es_trainer_refuses_a_method_whose_reference_loss_it_cannot_build(tmp_path):
    # ESTrainer has no reference-model pass: a method that reads per-sample state it cannot
    # fill is one input error at construction, not a traceback at the first selection step.
    from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments

    from es_llm.drivers.hf import ESTrainer
    from es_llm.errors import InputError
    from es_llm.sampling.config import EvolvedSamplingConfig

    model = GPT2LMHeadModel(
        GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16, n_positions=16)
    )
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    with pytest.raises(InputError, match=r"needs the per-sample state \['ref_loss'\]"):
        ESTrainer(model=model, args=args, es_config=EvolvedSamplingConfig(method="excess"))

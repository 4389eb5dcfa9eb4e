"""Learnability signals: learning-progress weights and trimming, and the laws of their draws."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sampling_law import successive_sampling_inclusion

from es_llm.errors import InputError
from es_llm.sampling.config import EvolvedSamplingConfig
from es_llm.sampling.learnability import PROGRESS_TINY, progress_weights, trim_keep
from es_llm.sampling.policies import method_weights, select_without_replacement
from es_llm.sampling.selector import select_step


def inclusion_frequencies(cfg: EvolvedSamplingConfig, losses, prev, k: int, steps: int):
    n = len(losses)
    counts = np.zeros(n)
    ids = torch.arange(n)
    for step in range(steps):
        sel = select_step(
            cfg,
            step=step,
            seed=99,
            ids=ids,
            losses=torch.tensor(losses),
            prev_scores=torch.tensor(prev),
            valid=None,
            k=k,
        )
        counts[sel.positions.numpy()] += 1
    return counts / steps


# --- learning progress ---


def test_progress_weights_formula():
    s = torch.tensor([3.0, 2.0, 1.0, 0.001])
    lo = torch.tensor([2.0, 2.5, 0.5, 4.0])
    w = progress_weights(s, lo, 0.5)
    gain = torch.tensor([1.0, 0.0, 0.5, 0.0])
    assert torch.allclose(w, gain + 0.5 * gain.mean() + PROGRESS_TINY)
    assert w.dtype == torch.float32


def test_no_progress_anywhere_is_a_uniform_positive_weight():
    w = progress_weights(torch.full((6,), 1e-4), torch.linspace(1, 6, 6), 0.5)
    assert torch.all(w > 0) and torch.unique(w).numel() == 1


def test_zero_floor_never_selects_samples_without_progress_while_others_exist():
    s = torch.tensor([5.0, 5.0, 5.0, 1.0, 1.0, 1.0])
    lo = torch.tensor([4.0, 4.5, 3.0, 2.0, 2.0, 2.0])  # only the first three made progress
    w = progress_weights(s, lo, 0.0)
    for step in range(50):
        pos = select_without_replacement(w, 3, seed=1, step=step)
        assert pos.tolist() == [0, 1, 2]


def test_negative_floor_rejected():
    with pytest.raises(ValueError, match="floor"):
        progress_weights(torch.ones(2), torch.ones(2), -0.1)


def test_lp_score_is_the_last_loss_and_weight_is_progress():
    s = torch.tensor([3.0, 1.0])
    lo = torch.tensor([2.0, 1.5])
    w, s_new = method_weights("lp", s, lo, 0.2, 0.8, lp_floor=1.0)
    assert torch.equal(s_new, lo)
    assert torch.allclose(w, torch.tensor([1.0, 0.0]) + 0.5 + PROGRESS_TINY)


def test_lp_draw_follows_the_exact_without_replacement_law():
    prev = [3.0, 2.5, 2.0, 1.0, 0.5]
    losses = [2.0, 2.4, 2.2, 0.6, 0.5]
    cfg = EvolvedSamplingConfig(method="lp", lp_floor=0.5, selection_ratio=0.4)
    w = progress_weights(torch.tensor(prev), torch.tensor(losses), 0.5).tolist()
    want = successive_sampling_inclusion(w, 2)
    got = inclusion_frequencies(cfg, losses, prev, k=2, steps=6000)
    # binomial standard error at 6000 draws is <= 0.0065; 5 sigma
    assert np.max(np.abs(got - want)) < 0.033, (got, want)
    assert got[0] > got[1]  # most progress, most often


# --- trimming ---


def test_trim_by_rank_removes_exactly_the_top_share():
    lo = torch.tensor([0.5, 3.0, 1.0, 9.0, 2.0, 7.0, 0.1, 4.0, 6.0, 5.0])
    keep = trim_keep(lo, torch.ones(10, dtype=torch.bool), k=5, top=0.3)
    # the three largest: 9, 7, 6 at positions 3, 5, 8
    assert (~keep).nonzero().reshape(-1).tolist() == [3, 5, 8]


def test_trim_ties_remove_the_lower_position_first():
    lo = torch.tensor([1.0, 5.0, 5.0, 5.0, 0.0])
    keep = trim_keep(lo, torch.ones(5, dtype=torch.bool), k=1, top=0.4)
    assert (~keep).nonzero().reshape(-1).tolist() == [1, 2]


def test_trim_never_leaves_fewer_than_k_valid():
    lo = torch.arange(10, dtype=torch.float32)
    keep = trim_keep(lo, torch.ones(10, dtype=torch.bool), k=8, top=0.5)
    assert int(keep.sum()) == 8 and not keep[8] and not keep[9]


def test_trim_ignores_invalid_samples_and_counts_only_valid_ones():
    lo = torch.tensor([100.0, 1.0, 2.0, 3.0, 4.0, float("nan")])
    valid = torch.tensor([False, True, True, True, True, True])
    keep = trim_keep(lo, valid, k=2, top=0.5)  # 4 valid finite -> trim 2: losses 4 and 3
    assert keep.tolist() == [False, True, True, False, False, False]


def test_trim_by_z_score():
    lo = torch.tensor([1.0, 1.1, 0.9, 1.0, 1.05, 0.95, 1.0, 8.0])
    keep = trim_keep(lo, torch.ones(8, dtype=torch.bool), k=2, z=1.5)
    cut = float(lo.mean()) + 1.5 * float(lo.std())
    assert cut < 8.0 and all(x < cut for x in lo[:7].tolist())
    assert (~keep).nonzero().reshape(-1).tolist() == [7]
    # rank and z combined: the larger count wins
    keep2 = trim_keep(lo, torch.ones(8, dtype=torch.bool), k=2, top=0.25, z=1.5)
    assert (~keep2).nonzero().reshape(-1).tolist() == [1, 7]


def test_trim_runs_on_the_tensors_device_without_python_numbers():
    lo = torch.rand(64, dtype=torch.float32, device="meta")
    keep = trim_keep(lo, torch.ones(64, dtype=torch.bool, device="meta"), k=32, top=0.1, z=1.0)
    assert keep.device.type == "meta" and keep.dtype == torch.bool


def test_trimmed_samples_are_never_selected_and_the_rest_follow_the_es_law():
    losses = [0.5, 1.0, 4.0, 1.5, 9.0, 2.0]
    prev = [1.0, 0.5, 1.0, 2.0, 1.0, 0.2]
    cfg = EvolvedSamplingConfig(method="es", trim_top=0.34, selection_ratio=0.5)
    w, _ = method_weights(
        "es", torch.tensor(prev), torch.tensor(losses), 0.2, 0.8, trim_top=0.34, k=3
    )
    assert w[4] == 0 and w[2] == 0 and torch.all(w[[0, 1, 3, 5]] > 0)  # top 2 of 6 trimmed
    want = successive_sampling_inclusion(w.tolist(), 3)
    got = inclusion_frequencies(cfg, losses, prev, k=3, steps=5000)
    assert got[4] == 0 and got[2] == 0
    assert np.max(np.abs(got - want)) < 0.035, (got, want)


def test_trim_method_draws_uniformly_among_the_untrimmed():
    losses = [3.0, 1.0, 2.0, 8.0, 0.5, 2.5, 7.0, 1.5]
    cfg = EvolvedSamplingConfig(method="trim", trim_top=0.25, selection_ratio=0.375)
    got = inclusion_frequencies(cfg, losses, [1.0] * 8, k=3, steps=4000)
    assert got[3] == 0 and got[6] == 0
    kept = [0, 1, 2, 4, 5, 7]
    # each of the 6 kept has inclusion 3/6; standard error 0.0079, 5 sigma
    assert np.max(np.abs(got[kept] - 0.5)) < 0.04, got


def test_trim_to_exactly_k_is_deterministic():
    losses = torch.tensor([3.0, 1.0, 2.0, 8.0, 0.5])
    cfg = EvolvedSamplingConfig(method="lp", trim_top=0.4, selection_ratio=0.6)
    for step in range(5):
        sel = select_step(
            cfg,
            step=step,
            seed=3,
            ids=torch.arange(5),
            losses=losses,
            prev_scores=torch.ones(5),
            valid=None,
            k=3,
        )
        assert sel.positions.tolist() == [1, 2, 4]
        assert torch.equal(sel.loss_weights, torch.ones(3))


def test_trimmed_samples_still_get_their_score_updated():
    losses = torch.tensor([1.0, 2.0, 9.0, 3.0])
    sel = select_step(
        EvolvedSamplingConfig(method="es", trim_top=0.25),
        step=0,
        seed=0,
        ids=torch.arange(4),
        losses=losses,
        prev_scores=torch.ones(4),
        valid=None,
        k=2,
    )
    assert 2 not in sel.positions.tolist()
    assert math.isclose(float(sel.new_scores[2]), 0.8 + 0.2 * 9.0, rel_tol=1e-6)


# --- configuration ---


def test_config_fields_and_ranges():
    cfg = EvolvedSamplingConfig(method="lp", lp_floor=0.0, trim_top=0.2, trim_z=1.5)
    assert cfg.uses_scoring_forward and cfg.effective_selection_ratio == cfg.selection_ratio
    assert EvolvedSamplingConfig(method="trim").uses_scoring_forward
    for bad in ({"lp_floor": -1.0}, {"trim_top": 1.0}, {"trim_top": -0.1}, {"trim_z": math.inf}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            EvolvedSamplingConfig(**bad)


@pytest.mark.parametrize("method", ["uniform", "prune"])
def test_trimming_without_a_scoring_forward_is_rejected(method):
    from es_llm.sampling.config import es_config_from_ds_config

    with pytest.raises(InputError, match="trim_top/trim_z need the scoring forward"):
        es_config_from_ds_config({"evolved_sampling": {"method": method, "trim_top": 0.1}})

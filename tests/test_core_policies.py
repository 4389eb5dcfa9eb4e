"""Policies: ES/EMA weights, and Gumbel-top-k against the exact without-replacement law."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from es_llm.sampling.config import EvolvedSamplingConfig
from es_llm.sampling.methods import base as methods_base
from es_llm.sampling.methods.base import SamplingMethod, Visit, ema_update, register
from es_llm.sampling.noise import STREAM_EPSILON, STREAM_GUMBEL, derive_key, hash_u64
from es_llm.sampling.policies import (
    es_weights,
    method_weights,
    score_update,
    select_without_replacement,
    valid_weight_mask,
)
from es_llm.sampling.store import ScoreStore


def plackett_luce_inclusion(w: list[float], k: int) -> tuple[np.ndarray, dict]:
    """Exact inclusion and top-k set probabilities of successive sampling, by enumerating orderings."""
    n = len(w)
    incl = np.zeros(n)
    sets: dict[tuple[int, ...], float] = {}
    for order in itertools.permutations(range(n)):
        p, left = 1.0, sum(w)
        for i in order:
            p *= w[i] / left
            left -= w[i]
        top = tuple(sorted(order[:k]))
        sets[top] = sets.get(top, 0.0) + p
        incl[list(top)] += p
    return incl, sets


def draw_many(w, k, steps, **kw) -> tuple[np.ndarray, dict]:
    wt = torch.tensor(w, dtype=torch.float64)
    counts = np.zeros(len(w))
    sets: dict[tuple[int, ...], int] = {}
    for step in range(steps):
        pos = select_without_replacement(wt, k, seed=1234, step=step, **kw).tolist()
        counts[pos] += 1
        sets[tuple(pos)] = sets.get(tuple(pos), 0) + 1
    return counts / steps, sets


# --- weights ---


def test_es_weights_formula():
    s = torch.tensor([0.1, 0.5, 2.0])
    lo = torch.tensor([1.0, 0.5, 0.0])
    w, s_new = es_weights(s, lo, 0.2, 0.8)
    assert torch.allclose(w, 0.2 * s + 0.8 * lo)
    assert torch.allclose(s_new, 0.8 * s + 0.2 * lo)
    assert w.dtype == torch.float32 and s_new.dtype == torch.float32


def test_es_with_equal_betas_is_ema_over_a_sequence():
    g = torch.Generator().manual_seed(0)
    s_es = s_ema = torch.full((50,), 0.02)
    for _ in range(10):
        lo = torch.rand(50, generator=g) * 5
        w_es, s_es = method_weights("es", s_es, lo, 0.7, 0.7)
        w_ema, s_ema = method_weights("ema", s_ema, lo, 0.7, 0.7)
        assert torch.equal(w_es, w_ema)
        assert torch.equal(s_es, s_ema)
        wt = select_without_replacement(w_es, 10, seed=3, step=1)
        assert torch.equal(wt, select_without_replacement(w_ema, 10, seed=3, step=1))


def test_method_weights_per_method():
    s = torch.tensor([0.1, 0.4])
    lo = torch.tensor([2.0, 1.0])
    s_ref = 0.8 * s + 0.2 * lo
    for m in ("es", "eswp", "topk"):
        w, sn = method_weights(m, s, lo, 0.2, 0.8)
        assert torch.allclose(w, 0.2 * s + 0.8 * lo) and torch.allclose(sn, s_ref)
    w, sn = method_weights("ema", s, lo, 0.2, 0.8)
    assert torch.allclose(w, s_ref) and torch.allclose(sn, s_ref)
    w, _ = method_weights("loss", s, lo, 0.2, 0.8)
    assert torch.equal(w, lo)
    for m in ("uniform", "prune"):
        w, sn = method_weights(m, s, lo, 0.2, 0.8)
        assert torch.equal(w, torch.ones(2)) and torch.allclose(sn, s_ref)
    with pytest.raises(ValueError, match="method"):
        method_weights("infobatch", s, lo, 0.2, 0.8)


# --- the without-replacement law ---


def test_gumbel_top_k_matches_successive_sampling_law():
    w = [1.0, 2.0, 3.0, 4.0, 10.0]
    steps = 20_000
    exact_incl, exact_sets = plackett_luce_inclusion(w, 2)
    freq, sets = draw_many(w, 2, steps)
    # 5 standard errors of a frequency estimated from 20000 draws
    tol = 5 * np.sqrt(exact_incl * (1 - exact_incl) / steps)
    assert np.all(np.abs(freq - exact_incl) < tol), (freq, exact_incl)
    # the joint law of the chosen pair too (chi-square, 9 dof; 40 is p ~ 5e-6)
    chi2 = sum((sets.get(s, 0) - steps * p) ** 2 / (steps * p) for s, p in exact_sets.items())
    assert chi2 < 40
    # and it is not just proportional-to-w with replacement: item 4 is capped below 1
    assert exact_incl[4] < 1 and abs(freq.sum() - 2) < 1e-12


def test_tau_tempers_the_weights():
    w = [1.0, 2.0, 3.0, 4.0, 10.0]
    steps = 8000
    tau = 2.0
    exact, _ = plackett_luce_inclusion([x ** (1 / tau) for x in w], 2)
    freq, _ = draw_many(w, 2, steps, tau=tau)
    tol = 5 * np.sqrt(exact * (1 - exact) / steps)
    assert np.all(np.abs(freq - exact) < tol)


def test_tiny_tau_is_top_k_and_deterministic_takes_largest():
    w = torch.tensor([0.3, 5.0, 0.1, 4.0, 1.0, 4.5])
    for step in range(20):
        assert select_without_replacement(w, 3, seed=0, step=step, tau=1e-4).tolist() == [1, 3, 5]
        assert select_without_replacement(w, 3, seed=0, step=step, deterministic=True).tolist() == [
            1,
            3,
            5,
        ]
    # ties under deterministic selection go to the lower position
    tie = torch.tensor([1.0, 2.0, 2.0, 2.0])
    assert select_without_replacement(tie, 2, seed=0, step=0, deterministic=True).tolist() == [1, 2]


def test_huge_tau_is_nearly_uniform():
    w = [1.0, 100.0, 1.0, 1.0]
    freq, _ = draw_many(w, 1, 4000, tau=1e6)
    assert np.all(np.abs(freq - 0.25) < 0.04)


def test_epsilon_fills_round_eps_k_slots_uniformly_from_the_rest():
    n, k, eps = 40, 4, 0.5  # round(0.5*4) = 2 uniform slots
    w = torch.full((n,), 1e-30, dtype=torch.float64)
    w[:2] = 1e30  # the weighted draw takes these two every time
    counts = np.zeros(n)
    steps = 6000
    for step in range(steps):
        pos = select_without_replacement(w, k, seed=5, step=step, epsilon=eps).tolist()
        assert pos[:2] == [0, 1] and len(set(pos)) == k
        counts[pos] += 1
    rest = counts[2:] / steps
    # each of the 38 others is taken with probability 2/38
    assert np.all(np.abs(rest - 2 / 38) < 5 * np.sqrt((2 / 38) * (36 / 38) / steps))
    # without epsilon the weighted draw never reaches the tiny weights
    for step in range(50):
        pos = select_without_replacement(w, k, seed=5, step=step).tolist()
        assert set(pos[:2]) == {0, 1}


def test_epsilon_one_ignores_weights():
    w = torch.tensor([1e6, 1.0, 1.0, 1.0], dtype=torch.float64)
    freq, _ = draw_many(w.tolist(), 1, 4000, epsilon=1.0)
    assert np.all(np.abs(freq - 0.25) < 0.04)


# --- validity, shape, determinism ---


def test_invalid_never_chosen_while_enough_valid():
    w = torch.tensor([1.0, float("nan"), 2.0, float("inf"), 0.0, -1.0, 3.0, 1.0, 5.0])
    valid = torch.tensor([True, True, True, True, True, True, True, False, True])
    allowed = {0, 2, 6, 8}
    for step in range(200):
        pos = select_without_replacement(w, 3, seed=1, step=step, valid=valid, epsilon=0.34)
        assert set(pos.tolist()) <= allowed
        assert len(set(pos.tolist())) == 3


def test_fewer_valid_than_k_fills_with_lowest_invalid():
    w = torch.tensor([1.0, float("nan"), 2.0, 0.0, 3.0, -1.0])
    valid = torch.tensor([False, True, True, True, True, True])
    pos = select_without_replacement(w, 4, seed=0, step=0, valid=valid)
    # valid: 2, 4 ; filler: lowest invalid positions 0, 1
    assert pos.tolist() == [0, 1, 2, 4]


def test_output_sorted_unique_int64_and_edge_k():
    w = torch.rand(100, generator=torch.Generator().manual_seed(1)) + 0.01
    pos = select_without_replacement(w, 37, seed=2, step=9)
    assert pos.dtype == torch.int64 and pos.numel() == 37
    assert torch.equal(pos, torch.sort(pos).values) and pos.unique().numel() == 37
    assert select_without_replacement(w, 0, seed=2, step=9).numel() == 0
    assert select_without_replacement(w, 100, seed=2, step=9).tolist() == list(range(100))
    with pytest.raises(ValueError, match="k must be"):
        select_without_replacement(w, 101, seed=2, step=9)


def test_same_seed_and_step_same_selection_different_step_different():
    w = torch.ones(200)
    a = select_without_replacement(w, 20, seed=7, step=3)
    assert torch.equal(a, select_without_replacement(w, 20, seed=7, step=3))
    others = [select_without_replacement(w, 20, seed=7, step=s) for s in range(4, 14)]
    assert all(not torch.equal(a, o) for o in others)
    assert not torch.equal(a, select_without_replacement(w, 20, seed=8, step=3))


# --- equal to the host algorithm it replaced ---


def host_uniform(seed: int, stream: int, step: int, n: int) -> torch.Tensor:
    x = hash_u64(derive_key(seed, stream, step), np.arange(n, dtype=np.int64))
    return torch.from_numpy((x >> np.uint64(12)).astype(np.float64) * 2.0**-52 + 2.0**-53)


def host_select(w, k, *, seed, step, valid=None, tau=1.0, epsilon=0.0, deterministic=False):
    """The previous host implementation (numpy noise, a Python branch on the valid count)."""
    w = torch.as_tensor(w).reshape(-1).to(torch.float64)
    n = w.numel()
    ok = valid_weight_mask(w, valid)
    n_valid = int(ok.sum())
    if n_valid <= k:
        valid_pos = torch.nonzero(ok).reshape(-1)
        filler = torch.nonzero(~ok).reshape(-1)[: k - n_valid]
        return torch.sort(torch.cat([valid_pos, filler])).values
    k_rand = round(epsilon * k)
    neg_inf = torch.tensor(float("-inf"), dtype=torch.float64)
    logw = torch.where(ok, torch.log(torch.where(ok, w, torch.ones_like(w))), neg_inf)
    g = -torch.log(-torch.log(host_uniform(seed, STREAM_GUMBEL, step, n)))
    keys = torch.where(ok, logw if deterministic else logw / tau + g, neg_inf)
    chosen = torch.sort(keys, descending=True, stable=True).indices[: k - k_rand]
    if k_rand:
        rest = ok.clone()
        rest[chosen] = False
        ukeys = torch.where(rest, host_uniform(seed, STREAM_EPSILON, step, n), neg_inf)
        chosen = torch.cat(
            [chosen, torch.sort(ukeys, descending=True, stable=True).indices[:k_rand]]
        )
    return torch.sort(chosen).values


def random_case(rng: np.random.Generator):
    n = int(rng.integers(1, 60))
    w = torch.from_numpy(rng.exponential(1.0, n))
    # ties, zeros, negatives and non-finite weights, and invalid flags
    special = rng.random(n)
    w[special < 0.1] = 1.0
    w[(special >= 0.1) & (special < 0.15)] = 0.0
    w[(special >= 0.15) & (special < 0.18)] = float("nan")
    w[(special >= 0.18) & (special < 0.2)] = -2.0
    valid = torch.from_numpy(rng.random(n) > rng.choice([0.0, 0.3, 0.9]))
    kw = dict(
        k=int(rng.integers(0, n + 1)),
        seed=int(rng.integers(0, 2**63)),
        step=int(rng.integers(0, 10**6)),
        valid=valid if rng.random() < 0.8 else None,
        tau=float(rng.choice([1.0, 0.5, 3.0])),
        epsilon=float(rng.choice([0.0, 0.0, 0.25, 0.5, 1.0])),
        deterministic=bool(rng.random() < 0.2),
    )
    return w, kw


def test_equals_the_host_algorithm_on_random_cases():
    rng = np.random.default_rng(42)
    few = 0
    for _ in range(800):
        w, kw = random_case(rng)
        ok = valid_weight_mask(w, kw["valid"])
        few += int(ok.sum()) <= kw["k"]
        got = select_without_replacement(w, **kw)
        assert torch.equal(got, host_select(w, **kw)), kw
    assert few > 50  # the "fewer valid than k" regime was exercised


def test_selection_stays_on_the_device_of_the_weights():
    w = torch.rand(50, device="meta")
    pos = select_without_replacement(
        w, 10, seed=0, step=1, valid=torch.ones(50, dtype=torch.bool, device="meta"), epsilon=0.3
    )
    assert pos.device.type == "meta" and pos.shape == (10,) and pos.dtype == torch.int64


class _Beta1Score(SamplingMethod):
    """A test-only method whose score rule reads an option other than beta2 (beta1)."""

    name = "beta1_score_test"

    def weights(self, cfg: EvolvedSamplingConfig, visit: Visit) -> torch.Tensor:
        return torch.ones_like(visit.losses)

    def score_update(self, cfg: EvolvedSamplingConfig, visit: Visit) -> torch.Tensor:
        return ema_update(visit.scores, visit.losses, cfg.beta1)


@pytest.fixture
def beta1_score(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setattr(methods_base, "_REGISTRY", dict(methods_base._REGISTRY))  # undone after
    register(_Beta1Score)
    return _Beta1Score.name


def test_plain_steps_update_scores_by_the_runs_config_as_selection_steps_do(beta1_score: str):
    # beta1 0.5 (default 0.2): a plain step's update (ScoreStore.observe: burn-in, anneal,
    # prune) must read the run's value, as the selection step's score rule does
    cfg = EvolvedSamplingConfig(method=beta1_score, beta1=0.5, s_init=2.0)
    store = ScoreStore(cfg, lo=0, hi=4, num_samples=4, device=torch.device("cpu"))
    ids, losses = torch.tensor([0, 2]), torch.tensor([4.0, 6.0])
    store.observe(ids, losses)
    visit = Visit(scores=torch.full((2,), 2.0), losses=losses)
    _, selection_scores = cfg.sampling_method.evaluate(cfg, visit)
    torch.testing.assert_close(selection_scores, torch.tensor([3.0, 4.0]))  # 0.5*2 + 0.5*l
    torch.testing.assert_close(store.table.gather(ids), selection_scores)
    torch.testing.assert_close(store.table.gather(torch.tensor([1, 3])), torch.full((2,), 2.0))
    torch.testing.assert_close(score_update(cfg, visit.scores, losses), selection_scores)
    with pytest.raises(TypeError, match="reads beta2 from the config"):
        score_update(cfg, visit.scores, losses, 0.8)


def test_score_update_by_method_name_is_the_loose_beta2_rule():
    s, lo = torch.tensor([1.0, 3.0]), torch.tensor([2.0, 1.0])
    torch.testing.assert_close(score_update("es", s, lo, 0.8), 0.8 * s + 0.2 * lo)
    torch.testing.assert_close(score_update("lp", s, lo, 0.8), lo)  # lp: the last loss
    with pytest.raises(TypeError, match="needs beta2"):
        score_update("es", s, lo)

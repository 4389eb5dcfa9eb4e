"""Sampling weights of each policy and the without-replacement draw (Gumbel-top-k).

Why Gumbel-top-k: taking the k largest of log(w_i) + G_i (G i.i.d. Gumbel) draws k items
without replacement with probability proportional to w (successive sampling /
Plackett-Luce), in one sort, and with counter-based noise every rank gets the same answer.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import torch

from es_llm.sampling.config import METHODS, EvolvedSamplingConfig
from es_llm.sampling.methods import Visit, get_method
from es_llm.sampling.methods.base import ema_update
from es_llm.sampling.methods.es import es_weight
from es_llm.sampling.noise import STREAM_EPSILON, gumbel, uniform01

__all__ = [
    "METHODS",
    "es_weights",
    "method_weights",
    "score_update",
    "select_without_replacement",
    "valid_weight_mask",
]


@functools.lru_cache(maxsize=64)
def _loose_config(method: str, **values: float | None) -> EvolvedSamplingConfig:
    """A config holding loose hyper-parameters (defaults elsewhere), for the rules to read.

    Not validated, as the loose-argument functions never were; cached, because building a
    pydantic model costs far more than the tensor maths of a micro-batch. Never mutated.
    """
    return EvolvedSamplingConfig.model_construct(method=method, **values)


def es_weights(
    prev_scores: torch.Tensor, losses: torch.Tensor, beta1: float, beta2: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoupled EMA (spec section 2): w = b1*s + (1-b1)*l, s_new = b2*s + (1-b2)*l (fp32)."""
    s = torch.as_tensor(prev_scores).to(torch.float32)
    lo = torch.as_tensor(losses).to(torch.float32)
    return es_weight(s, lo, beta1), ema_update(s, lo, beta2)


def score_update(
    cfg: EvolvedSamplingConfig | str,
    prev_scores: torch.Tensor,
    losses: torch.Tensor,
    beta2: float | None = None,
    state: Mapping[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """A sample's new score after a visit with loss ``losses``, by the method's own rule.

    lp keeps the last loss (its weight is the progress since that visit); every other method
    keeps the beta2 EMA. The one rule for scoring steps and for the free scoring of plain
    steps (burn-in, anneal, prune), so an lp run with burn-in starts selecting from real
    last losses instead of from EMAs that no later loss can fall below. ``state``: the
    method's per-sample columns for the same samples (`SamplingMethod.state`).

    ``cfg``: the run's validated config, which the rule reads as a selection step does (so a
    rule reading any of its options sees the run's values on plain steps too); or, as a loose
    form for one-off use, a method name with ``beta2`` (every other option at its default).
    """
    if isinstance(cfg, str):
        if beta2 is None:
            raise TypeError("score_update by method name needs beta2")
        cfg = _loose_config(cfg, beta2=beta2)
    elif beta2 is not None:
        raise TypeError("score_update reads beta2 from the config; do not pass it as well")
    m = cfg.sampling_method
    s = torch.as_tensor(prev_scores).to(torch.float32)
    lo = torch.as_tensor(losses).to(torch.float32)
    return m.score_update(cfg, Visit(scores=s, losses=lo, state=state or {}))


def method_weights(
    method: str,
    prev_scores: torch.Tensor,
    losses: torch.Tensor,
    beta1: float,
    beta2: float,
    *,
    lp_floor: float = 0.5,
    trim_top: float = 0.0,
    trim_z: float | None = None,
    valid: torch.Tensor | None = None,
    k: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(w, s_new) of ``method`` (es_llm.sampling.methods) from loose hyper-parameters.

    es/eswp/topk: ES weight; ema: w = s_new; loss: w = loss; uniform/prune/trim: w = 1;
    lp: learning progress ``max(s - l, 0) + lp_floor * mean`` (learnability). s_new is the
    beta2 EMA for every method but lp, whose score is the last loss (so ``s - l`` is the progress
    since the previous visit).

    Trimming (``trim_top`` > 0 or ``trim_z`` set; needs ``k``, the number to select) sets w = 0
    for the highest-loss valid samples (learnability.trim_keep), which the draw never takes
    while ``k`` others are valid; it acts for the methods that read trim_top/trim_z.
    """
    m = get_method(method)
    cfg = _loose_config(
        method, beta1=beta1, beta2=beta2, lp_floor=lp_floor, trim_top=trim_top, trim_z=trim_z
    )
    s = torch.as_tensor(prev_scores).to(torch.float32)
    lo = torch.as_tensor(losses).to(torch.float32)
    return m.evaluate(cfg, Visit(scores=s, losses=lo, valid=valid, k=k))


def valid_weight_mask(weights: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Positions that may be chosen by weight: valid, finite and positive w."""
    w = torch.as_tensor(weights)
    ok = torch.isfinite(w) & (w > 0)
    if valid is not None:
        ok &= torch.as_tensor(valid).to(torch.bool).reshape(w.shape)
    return ok


def _tiered_order(keys: torch.Tensor, tier: torch.Tensor) -> torch.Tensor:
    """Indices by (tier ascending, key descending, position ascending), on the keys' device.

    Two stable sorts, so there is no data-dependent branch: the lower tier always comes first
    and ties of key are broken by the lower position, deterministically everywhere.
    """
    by_key = torch.sort(keys, descending=True, stable=True).indices
    by_tier = torch.sort(tier.index_select(0, by_key), stable=True).indices
    return by_key.index_select(0, by_tier)


def select_without_replacement(
    weights: torch.Tensor,
    k: int,
    *,
    seed: int,
    step: int,
    valid: torch.Tensor | None = None,
    tau: float = 1.0,
    epsilon: float = 0.0,
    deterministic: bool = False,
) -> torch.Tensor:
    """Positions (ascending, int64) of k items drawn without replacement, P ~ w ** (1/tau).

    - keys are log(w)/tau + Gumbel(seed, step, position); deterministic=True takes the k
      largest w instead (method topk).
    - round(epsilon*k) slots (Python round) are filled uniformly at random (separate counter
      stream) from the valid positions the weighted draw did not take.
    - invalid positions (valid=False, non-finite or non-positive w) are never chosen while
      at least k valid ones exist; otherwise all valid ones are taken and the rest of the k
      slots go to invalid positions, lowest first (the caller gives them loss weight 0).

    Runs on the device of `weights` without a host sync: both draws order positions by tier
    (valid first, invalid after, already taken last) and then by key, so "fewer valid than k"
    needs no branch.
    """
    w = torch.as_tensor(weights).reshape(-1).to(torch.float64)
    n, dev = w.numel(), w.device
    if not 0 <= k <= n:
        raise ValueError(f"k must be in [0, {n}] (the meta-batch size), got {k}")
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    if not 0.0 <= epsilon <= 1.0:
        raise ValueError(f"epsilon must be in [0, 1], got {epsilon}")
    ok = valid_weight_mask(w, valid)
    positions = torch.arange(n, dtype=torch.int64, device=dev)
    k_rand = round(epsilon * k)
    k_weighted = k - k_rand

    logw = torch.log(torch.where(ok, w, torch.ones_like(w)))
    keys = logw if deterministic else logw / tau + gumbel(seed, step, positions)
    keys = keys.masked_fill(~ok, float("-inf"))
    tier = (~ok).to(torch.int8)  # 0 valid, 1 invalid
    chosen = _tiered_order(keys, tier)[:k_weighted]

    if k_rand:
        # a uniformly random subset of the valid rest: the k_rand largest i.i.d. uniforms;
        # when fewer remain, the lowest invalid positions not yet taken follow
        tier = tier.index_fill(0, chosen, 2)  # 2: taken by the weighted draw
        u = uniform01(seed, STREAM_EPSILON, step, positions).masked_fill(tier != 0, float("-inf"))
        chosen = torch.cat([chosen, _tiered_order(u, tier)[:k_rand]])
    return torch.sort(chosen).values

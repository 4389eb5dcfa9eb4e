"""Sampling weights of each policy and the without-replacement draw (Gumbel-top-k).

Why Gumbel-top-k: taking the k largest of log(w_i) + G_i (G i.i.d. Gumbel) draws k items
without replacement with probability proportional to w (successive sampling /
Plackett-Luce), in one sort, and with counter-based noise every rank gets the same answer.
"""

from __future__ import annotations

import torch

from es_llm.config import METHODS
from es_llm.core.learnability import progress_weights, trim_keep
from es_llm.core.noise import STREAM_EPSILON, gumbel, uniform01

__all__ = [
    "METHODS",
    "es_weights",
    "method_weights",
    "select_without_replacement",
    "valid_weight_mask",
]


def es_weights(
    prev_scores: torch.Tensor, losses: torch.Tensor, beta1: float, beta2: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoupled EMA (spec section 2): w = b1*s + (1-b1)*l, s_new = b2*s + (1-b2)*l (fp32)."""
    s = torch.as_tensor(prev_scores).to(torch.float32)
    lo = torch.as_tensor(losses).to(torch.float32)
    w = beta1 * s + (1.0 - beta1) * lo
    s_new = beta2 * s + (1.0 - beta2) * lo
    return w, s_new


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
    """(w, s_new) for any policy.

    es/eswp/topk: ES weight; ema: w = s_new; loss: w = loss; uniform/prune/trim: w = 1;
    lp: learning progress ``max(s - l, 0) + lp_floor * mean`` (core.learnability). s_new is the
    beta2 EMA for every method but lp, whose score is the last loss (so ``s - l`` is the progress
    since the previous visit).

    Trimming (``trim_top`` > 0 or ``trim_z`` set; needs ``k``, the number to select) sets w = 0
    for the highest-loss valid samples (core.learnability.trim_keep), which the draw never
    takes while ``k`` others are valid.
    """
    w, s_new = es_weights(prev_scores, losses, beta1, beta2)
    lo = torch.as_tensor(losses).to(torch.float32)
    if method in ("es", "eswp", "topk"):
        pass
    elif method == "ema":
        w = s_new.clone()
    elif method == "loss":
        w = lo.clone()
    elif method in ("uniform", "prune", "trim"):
        w = torch.ones_like(s_new)
    elif method == "lp":
        w = progress_weights(prev_scores, lo, lp_floor)
        s_new = lo.clone()
    else:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if trim_top > 0 or trim_z is not None:
        if k is None:
            raise ValueError("trimming needs k, the number of samples to select")
        ok = torch.ones_like(lo, dtype=torch.bool) if valid is None else valid
        w = torch.where(trim_keep(lo, ok, k, top=trim_top, z=trim_z), w, torch.zeros_like(w))
    return w, s_new


def valid_weight_mask(weights: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Positions that may be chosen by weight: valid, finite and positive w."""
    w = torch.as_tensor(weights)
    ok = torch.isfinite(w) & (w > 0)
    if valid is not None:
        ok &= torch.as_tensor(valid).to(torch.bool).reshape(w.shape)
    return ok


def _stable_desc(keys: torch.Tensor) -> torch.Tensor:
    """Indices by descending key, ties broken by lower position (deterministic everywhere)."""
    return torch.sort(keys, descending=True, stable=True).indices


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
    """
    w = torch.as_tensor(weights).reshape(-1).to(torch.float64)
    n = w.numel()
    if not 0 <= k <= n:
        raise ValueError(f"k must be in [0, {n}] (the meta-batch size), got {k}")
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    if not 0.0 <= epsilon <= 1.0:
        raise ValueError(f"epsilon must be in [0, 1], got {epsilon}")
    ok = valid_weight_mask(w, valid)
    n_valid = int(ok.sum())

    if n_valid <= k:
        valid_pos = torch.nonzero(ok).reshape(-1)
        filler = torch.nonzero(~ok).reshape(-1)[: k - n_valid]
        return torch.sort(torch.cat([valid_pos, filler])).values

    positions = torch.arange(n, dtype=torch.int64)
    k_rand = round(epsilon * k)
    k_weighted = k - k_rand
    neg_inf = torch.tensor(float("-inf"), dtype=torch.float64)

    logw = torch.where(ok, torch.log(torch.where(ok, w, torch.ones_like(w))), neg_inf)
    keys = logw if deterministic else logw / tau + gumbel(seed, step, positions)
    keys = torch.where(ok, keys, neg_inf)
    chosen = _stable_desc(keys)[:k_weighted]

    if k_rand:
        rest = ok.clone()
        rest[chosen] = False
        u = uniform01(seed, STREAM_EPSILON, step, positions)
        # a uniformly random subset of the rest: the k_rand largest i.i.d. uniforms
        ukeys = torch.where(rest, u, neg_inf)
        chosen = torch.cat([chosen, _stable_desc(ukeys)[:k_rand]])
    return torch.sort(chosen).values

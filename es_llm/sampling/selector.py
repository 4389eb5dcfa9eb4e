"""One selection step over a global meta-batch: weights -> draw -> loss weights.

Why one function: every rank calls it on the same all-gathered (ids, losses, scores, valid)
and must get the same answer; keeping it pure makes the W-rank == 1-rank invariant a
property of this function alone. It runs on the device of its inputs and never waits on it
(no `.item()`, no host copy, no data-dependent Python branch), so a CUDA training step keeps
the host free until it logs; `device_digest` is the matching sync-free cross-rank check.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from es_llm.sampling.config import EvolvedSamplingConfig
from es_llm.sampling.methods import Visit
from es_llm.sampling.noise import GOLDEN, STREAM_DIGEST, as_int64, derive_key, hash_u64, mix64_
from es_llm.sampling.policies import select_without_replacement, valid_weight_mask

__all__ = ["Selection", "device_digest", "importance_weights", "select_step", "selection_digest"]

_DIGEST_KEY = derive_key(0, STREAM_DIGEST, 0)
_MASK63 = (1 << 63) - 1
_I_GOLDEN = as_int64(GOLDEN)


@dataclass
class Selection:
    positions: torch.Tensor  # int64 into the global meta-batch, ascending, length k
    loss_weights: torch.Tensor  # fp32 per chosen position (0 for invalid filler)
    weights: torch.Tensor  # fp32 w of the whole meta-batch (for metrics)
    new_scores: torch.Tensor  # fp32 s(t) of the whole meta-batch (prev score where invalid)
    num_invalid: torch.Tensor  # 0-dim int64 on the device: invalid filler among the chosen


def selection_digest(ids: torch.Tensor) -> str:
    """sha1 hex of the int64 little-endian bytes of `ids` in order (cheap cross-rank check)."""
    t = torch.as_tensor(ids)
    if t.is_floating_point():
        raise TypeError("selection_digest needs integer ids, not floating point")
    arr = t.detach().cpu().to(torch.int64).contiguous().numpy().astype("<i8", copy=False)
    return hashlib.sha1(np.ascontiguousarray(arr).tobytes()).hexdigest()


def device_digest(ids: torch.Tensor) -> torch.Tensor:
    """An order-sensitive 63-bit hash of int64 `ids`, as a 0-dim int64 on their device.

    Each id is hashed with its position (splitmix64 of the id, salted by j * GOLDEN, mixed
    again), the hashes are folded with a wrapping sum (order-free, so any reduction order on
    any device gives the same bits) and the sum with the length is mixed once more. Integer
    arithmetic only: equal ids give equal digests on CPU and GPU, without a host sync, so
    ranks can compare it with one all-reduce (MIN == MAX). Not the logged sha1 digest.
    """
    t = torch.as_tensor(ids).reshape(-1)
    if t.is_floating_point():
        raise TypeError("device_digest needs integer ids, not floating point")
    x = hash_u64(_DIGEST_KEY, t)
    j = torch.arange(t.numel(), dtype=torch.int64, device=t.device)
    x.bitwise_xor_(j.mul_(_I_GOLDEN))
    folded = mix64_(x).sum(dtype=torch.int64).add_(as_int64(t.numel() * _I_GOLDEN))
    return mix64_(folded.reshape(1)).reshape(()).bitwise_and_(_MASK63)


def importance_weights(
    weights: torch.Tensor,
    ok: torch.Tensor,
    positions: torch.Tensor,
    *,
    k: int,
    tau: float,
    epsilon: float,
    deterministic: bool,
) -> torch.Tensor:
    """Loss weights ~ 1 / p_i for the chosen valid positions, normalised to mean 1.

    Our choice of the selection-probability proxy (the exact inclusion probability of
    successive sampling has no closed form): the first-order draw probability
        p_i = (1 - e) * w_i**(1/tau) / sum_valid w**(1/tau) + e / n_valid,   e = round(eps*k)/k,
    which is w_i / sum w at the defaults (tau=1, epsilon=0). For topk (deterministic) tau is
    ignored (p_i = w_i / sum w). Invalid chosen positions get 0 and are excluded from the mean.
    """
    w = weights.to(torch.float64)
    ok = ok.to(torch.bool)
    n_valid = ok.sum().to(torch.float64)
    chosen_ok = ok.index_select(0, positions)
    logw = torch.log(torch.where(ok, w, torch.ones_like(w)))
    if not deterministic:
        logw = logw / tau
    # softmax over valid positions = w**(1/tau) / sum, computed stably in log space
    # (all NaN when nothing is valid; then no chosen position is valid and all get 0)
    p = torch.softmax(logw.masked_fill(~ok, float("-inf")), dim=0)
    e = round(epsilon * k) / k if k else 0.0
    p = (1.0 - e) * p + e / n_valid.clamp_min(1)
    inv = torch.where(chosen_ok, 1.0 / p.index_select(0, positions), 0.0)
    mean = inv.sum() / chosen_ok.sum().clamp_min(1)
    return torch.where(chosen_ok, inv / mean, 0.0).to(torch.float32)


def select_step(
    cfg: EvolvedSamplingConfig,
    *,
    step: int,
    seed: int,
    ids: torch.Tensor,
    losses: torch.Tensor,
    prev_scores: torch.Tensor,
    valid: torch.Tensor | None,
    k: int,
    base_loss_weights: torch.Tensor | None = None,
    state: Mapping[str, torch.Tensor] | None = None,
) -> Selection:
    """Choose k of the global meta-batch with cfg's method (SELECT phase).

    valid: samples with at least one label token; a non-finite loss is treated as invalid too.
    Invalid samples keep their previous score and are never chosen while k valid ones exist.
    base_loss_weights (optional, per meta-batch position): e.g. the ESWP boost from
    EpochPlan.loss_weights; multiplied into the chosen samples' loss weights.
    state: the method's extra per-sample columns (`SamplingMethod.state`), per position.
    """
    ids = torch.as_tensor(ids)
    if ids.is_floating_point():
        raise TypeError("ids must be int64, never float")
    losses = torch.as_tensor(losses).reshape(-1).to(torch.float32)
    prev = torch.as_tensor(prev_scores).reshape(-1).to(torch.float32)
    n = losses.numel()
    if ids.numel() != n or prev.numel() != n:
        raise ValueError(
            f"ids ({ids.numel()}), losses ({n}) and prev_scores ({prev.numel()}) differ in length"
        )
    ok = torch.isfinite(losses)
    if valid is not None:
        ok &= torch.as_tensor(valid).reshape(-1).to(torch.bool)

    method = cfg.sampling_method
    visit = Visit(prev, torch.where(ok, losses, prev), state or {}, valid=ok, k=k)
    w, s_new = method.evaluate(cfg, visit)
    s_new = torch.where(ok, s_new, prev)
    deterministic = method.deterministic
    positions = select_without_replacement(
        w,
        k,
        seed=seed,
        step=step,
        valid=ok,
        tau=cfg.tau,
        epsilon=cfg.epsilon,
        deterministic=deterministic,
    )
    chosen_ok = valid_weight_mask(w, ok)[positions]
    if cfg.importance_weighting:
        lw = importance_weights(
            w,
            valid_weight_mask(w, ok),
            positions,
            k=k,
            tau=cfg.tau,
            epsilon=cfg.epsilon,
            deterministic=deterministic,
        )
    else:
        lw = chosen_ok.to(torch.float32)
    if base_loss_weights is not None:
        lw = lw * torch.as_tensor(base_loss_weights).reshape(-1).to(torch.float32)[positions]
    return Selection(
        positions=positions,
        loss_weights=lw,
        weights=w,
        new_scores=s_new,
        num_invalid=(~chosen_ok).sum(),
    )

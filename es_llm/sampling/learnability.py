"""Learnability signals for selection: learning progress and trimming of the highest losses.

Why: the raw ES weight grows with the loss, so on data with unlearnable documents (random
characters, corrupted text) it spends its back-propagation on exactly the samples that cannot
be learned. Two cheap signals counter that, both pure tensor functions of the meta-batch
(no host synchronisation, any device):

- *learning progress*: how much a sample's loss fell since its previous visit. Samples that
  are learned get weight; samples whose loss stays put (junk, or already mastered) fall to a
  floor.
- *trimming*: the highest-loss share of a meta-batch is never selected (by rank, by z-score,
  or both); the rest is drawn as before.
"""

from __future__ import annotations

import torch

__all__ = ["PROGRESS_TINY", "progress_weights", "trim_keep"]

# Added to every progress weight so an all-zero progress (first epoch, nothing seen yet) is a
# uniform draw instead of an all-invalid one; far below any real loss difference in fp32.
PROGRESS_TINY = 1e-30


def progress_weights(prev_scores: torch.Tensor, losses: torch.Tensor, floor: float) -> torch.Tensor:
    """w = max(s - l, 0) + floor * mean(max(s - l, 0)) + tiny (fp32, same device).

    ``prev_scores`` holds each sample's loss at its previous visit (method ``lp`` stores the
    last loss as the score), so ``s - l`` is the progress since then. A sample that made no
    progress (or was never scored: ``s_init`` is tiny) keeps ``floor`` times the meta-batch's
    mean progress; with no progress anywhere the draw is uniform.
    """
    if floor < 0:
        raise ValueError(f"floor must be >= 0, got {floor}")
    s = torch.as_tensor(prev_scores).to(torch.float32)
    lo = torch.as_tensor(losses).to(torch.float32)
    gain = torch.clamp(s - lo, min=0.0)
    return gain + floor * gain.mean() + PROGRESS_TINY


def trim_keep(
    losses: torch.Tensor,
    valid: torch.Tensor,
    k: int,
    *,
    top: float = 0.0,
    z: float | None = None,
) -> torch.Tensor:
    """Bool mask of the valid samples that stay selectable after trimming the highest losses.

    m = max(floor(top * n_valid), #{valid l > mean + z * std}) samples with the largest loss
    are removed (ties broken by lower position removed first), but never so many that fewer
    than ``k`` valid samples remain: m <= max(n_valid - k, 0). mean and std (unbiased) are
    over the valid samples. Everything stays on the tensors' device.
    """
    if not 0.0 <= top < 1.0:
        raise ValueError(f"top must be in [0, 1), got {top}")
    lo = torch.as_tensor(losses).reshape(-1).to(torch.float32)
    ok = torch.as_tensor(valid).reshape(-1).to(torch.bool) & torch.isfinite(lo)
    n = lo.numel()
    n_valid = ok.sum()
    key = torch.where(ok, lo, torch.full_like(lo, float("-inf")))
    order = torch.sort(key, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank[order] = torch.arange(n, device=order.device, dtype=order.dtype)
    m = torch.floor(n_valid.to(torch.float64) * top).to(torch.int64)
    if z is not None:
        lv = torch.where(ok, lo, torch.zeros_like(lo))
        mean = lv.sum() / n_valid.clamp(min=1)
        dev = torch.where(ok, lo - mean, torch.zeros_like(lo))
        std = torch.sqrt((dev * dev).sum() / (n_valid - 1).clamp(min=1))
        m = torch.maximum(m, (ok & (lo > mean + z * std)).sum())
    m = torch.minimum(m, (n_valid - k).clamp(min=0))
    return ok & (rank >= m)

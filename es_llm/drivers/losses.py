"""The training forward's per-sample loss and the ES-weighted step loss, shared by the
native loop, the HF Trainer and a user's own DeepSpeed loop."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def training_losses(
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    ignore_index: int,
    labels: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence mean token cross-entropy (with grad) of a causal LM; 0 where no token.

    `labels` (default `input_ids`) are aligned with `input_ids`: position t predicts
    labels[:, t + 1]; tokens labelled `ignore_index` (prompt, padding) do not count.
    Returns (loss fp32 [B], label count [B]); both stay on the logits' device.
    """
    target = (input_ids if labels is None else labels)[:, 1:]
    lg = logits[:, :-1, :].float()
    tok = F.cross_entropy(
        lg.reshape(-1, lg.size(-1)), target.reshape(-1), reduction="none", ignore_index=ignore_index
    ).view(target.shape)
    count = (target != ignore_index).sum(dim=1)
    return tok.sum(dim=1) / count.clamp(min=1), count


def weighted_step_loss(
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    loss_weights: torch.Tensor,
    ignore_index: int,
    labels: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The micro-batch loss ES back-propagates: mean of per-sample losses x ES loss weights.

    Returns (loss, per-sample losses); hand the latter to `observe_training_losses`.
    """
    per_sample, _ = training_losses(logits, input_ids, ignore_index, labels)
    return (per_sample * loss_weights.to(per_sample.device)).mean(), per_sample

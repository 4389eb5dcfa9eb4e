"""The training forward's per-sample loss, shared by the native loop and the HF Trainer."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def training_losses(
    logits: torch.Tensor, input_ids: torch.Tensor, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence mean token cross-entropy (with grad) of a causal LM; 0 where no token.

    Returns (loss fp32 [B], label count [B]); both stay on the logits' device.
    """
    labels = input_ids[:, 1:]
    lg = logits[:, :-1, :].float()
    tok = F.cross_entropy(
        lg.reshape(-1, lg.size(-1)), labels.reshape(-1), reduction="none", ignore_index=ignore_index
    ).view(labels.shape)
    count = (labels != ignore_index).sum(dim=1)
    return tok.sum(dim=1) / count.clamp(min=1), count

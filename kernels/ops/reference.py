"""Plain-PyTorch references for the scoring kernels.

They define what the Triton kernels must compute (the parity tests compare against them)
and they are what a CPU-only machine runs. Work is chunked over rows so a bf16 ``[n, V]``
input is never upcast to fp32 all at once.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Rows per chunk are chosen so one fp32 chunk holds at most this many elements (4 MiB):
# small enough to stay in a CPU cache (measured faster per sample than 64 MiB chunks).
_CHUNK_ELEMS = 1 << 20


def row_losses_reference(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> Tensor:
    """Token cross-entropy per row of ``logits [n, V]`` in fp32; 0 where the label is ignored."""
    n, v = logits.shape
    out = torch.zeros(n, dtype=torch.float32, device=logits.device)
    rows = max(1, _CHUNK_ELEMS // max(v, 1))
    for lo in range(0, n, rows):
        hi = min(n, lo + rows)
        x = logits[lo:hi].float()
        y = labels[lo:hi]
        valid = y != ignore_index
        safe = torch.where(valid, y, torch.zeros_like(y))
        lse = torch.logsumexp(x, dim=-1)
        picked = x.gather(1, safe.unsqueeze(1)).squeeze(1)
        out[lo:hi] = torch.where(valid, lse - picked, torch.zeros_like(lse))
    return out


def segment_sum(values: Tensor, seq_index: Tensor, num_seqs: int) -> Tensor:
    """Sum ``values [n]`` into ``num_seqs`` bins given by ``seq_index [n]`` (fp32 out)."""
    out = torch.zeros(num_seqs, dtype=torch.float32, device=values.device)
    return out.index_add_(0, seq_index, values.float())


def per_sample_loss_reference(
    logits: Tensor,
    labels: Tensor,
    seq_index: Tensor,
    num_seqs: int,
    ignore_index: int = -100,
) -> tuple[Tensor, Tensor]:
    """Per-sequence loss sum and valid-token count (both fp32) for ``logits [n, V]``."""
    row = row_losses_reference(logits, labels, ignore_index)
    count = segment_sum((labels != ignore_index).float(), seq_index, num_seqs)
    return segment_sum(row, seq_index, num_seqs), count


def linear_row_losses_reference(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    ignore_index: int = -100,
    bias: Tensor | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """Per-row losses of ``hidden [n, H] @ weight[V, H].T (+ bias)``, chunked over rows.

    Only ``[chunk_size, V]`` logits exist at a time; the matmul runs in the input dtype as
    the model's own ``lm_head`` would.
    """
    n = hidden.shape[0]
    v = weight.shape[0]
    if chunk_size is None:
        chunk_size = max(1, _CHUNK_ELEMS // max(v, 1))
    row = torch.empty(n, dtype=torch.float32, device=hidden.device)
    for lo in range(0, n, chunk_size):
        hi = min(n, lo + chunk_size)
        logits = torch.nn.functional.linear(hidden[lo:hi], weight, bias)
        row[lo:hi] = row_losses_reference(logits, labels[lo:hi], ignore_index)
    return row


def linear_per_sample_loss_reference(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    seq_index: Tensor,
    num_seqs: int,
    ignore_index: int = -100,
    bias: Tensor | None = None,
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-sequence ``(loss_sum, count)`` of the linear head without full ``[n, V]`` logits."""
    row = linear_row_losses_reference(hidden, weight, labels, ignore_index, bias, chunk_size)
    count = segment_sum((labels != ignore_index).float(), seq_index, num_seqs)
    return segment_sum(row, seq_index, num_seqs), count

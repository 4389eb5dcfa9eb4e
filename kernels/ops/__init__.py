"""Scoring kernels behind one dispatcher (spec section 6).

Callers use only the functions below. ``backend="auto"`` runs Triton when the tensors
are on CUDA and ``triton`` imports, the plain-PyTorch reference otherwise; ``"triton"`` forces
the Triton kernels (on CPU this needs ``TRITON_INTERPRET=1`` set before triton is imported,
which is how the parity tests run them) and ``"reference"`` forces PyTorch.
"""

from __future__ import annotations

import functools
from typing import Literal

import torch
from torch import Tensor

from . import reference

Backend = Literal["auto", "triton", "reference"]

__all__ = [
    "Backend",
    "fused_linear_per_sample_loss",
    "per_sample_loss",
    "triton_available",
]


@functools.cache
def triton_available() -> bool:
    """True when triton imports (it is optional: a CPU install may lack it)."""
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def _use_triton(backend: str, *tensors: Tensor) -> bool:
    if backend == "reference":
        return False
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' requested but triton does not import")
        return True
    if backend != "auto":
        raise ValueError(f"backend must be 'auto', 'triton' or 'reference', got {backend!r}")
    return all(t.is_cuda for t in tensors) and triton_available()


def _flatten(
    x: Tensor, labels: Tensor, seq_index: Tensor | None, num_seqs: int | None
) -> tuple[Tensor, Tensor, Tensor | None, int, int | None]:
    """Bring ``[B, T, *]`` or ``[n, *]`` inputs to rows; return ``(x, labels, seq_index, S, T)``.

    ``T`` is the row count per sequence when rows are whole ``[B, T]`` sequences in order
    (then ``seq_index`` is ``None`` and per-sequence sums are a deterministic reshape-sum).
    """
    if x.dim() == 3:
        b, t = x.shape[:2]
        if labels.shape != (b, t):
            raise ValueError(f"labels shape {tuple(labels.shape)} != {(b, t)}")
        if seq_index is not None:
            raise ValueError("seq_index is implied by the [B, T, ...] form; pass None")
        if num_seqs is not None and num_seqs != b:
            raise ValueError(f"num_seqs={num_seqs} but the input has B={b} sequences")
        return x, labels.reshape(b * t), None, b, t
    if x.dim() != 2:
        raise ValueError(f"expected [n, V|H] or [B, T, V|H], got shape {tuple(x.shape)}")
    n = x.shape[0]
    if labels.shape != (n,):
        raise ValueError(f"labels shape {tuple(labels.shape)} != ({n},)")
    if seq_index is None:
        # One sequence holding every row.
        if num_seqs not in (None, 1):
            raise ValueError("num_seqs > 1 needs a seq_index")
        return x, labels, None, 1, n
    if seq_index.shape != (n,):
        raise ValueError(f"seq_index shape {tuple(seq_index.shape)} != ({n},)")
    if seq_index.dtype != torch.int64:
        raise TypeError("seq_index must be int64")
    if num_seqs is None:
        num_seqs = int(seq_index.max().item()) + 1 if n else 0
    return x, labels, seq_index, num_seqs, None


def _sum_rows(
    values: Tensor, seq_index: Tensor | None, num_seqs: int, t: int | None, use_triton: bool
) -> Tensor:
    """Per-sequence sums of per-row ``values``, in a fixed order on every device.

    Float atomics (``index_add_`` on CUDA) would make reruns differ in the last bit, and a
    resumed run must reproduce the same losses, hence the same selection.
    """
    if seq_index is None:
        return values.float().reshape(num_seqs, t).sum(dim=1)
    if use_triton:
        from .per_sample_ce import deterministic_segment_sum

        return deterministic_segment_sum(values, seq_index, num_seqs)
    return reference.segment_sum(values, seq_index, num_seqs)


def per_sample_loss(
    logits: Tensor,
    labels: Tensor,
    seq_index: Tensor | None = None,
    num_seqs: int | None = None,
    ignore_index: int = -100,
    backend: Backend = "auto",
) -> tuple[Tensor, Tensor]:
    """Per-sequence token cross-entropy sum and valid-token count, both fp32 ``[S]``.

    ``logits [n, V]`` with ``labels [n]`` and ``seq_index [n]`` (int64, the sequence of each
    row; ``num_seqs`` defaults to ``max + 1``), or ``logits [B, T, V]`` with ``labels [B, T]``
    (then ``S = B``). Labels are already aligned with logits (the caller does the causal
    shift); ``labels == ignore_index`` count for nothing. Logits may be fp32/bf16/fp16 and a
    non-contiguous view such as ``logits[:, :-1]`` (the last dim must have stride 1 for
    Triton; otherwise it is copied). Mean loss = ``loss_sum / count`` where ``count > 0``.
    """
    x, y, seq, s, t = _flatten(logits, labels, seq_index, num_seqs)
    use_triton = _use_triton(backend, logits)
    if use_triton:
        from .per_sample_ce import row_losses_triton

        row = row_losses_triton(x, y, ignore_index)
    elif x.dim() == 3:
        # Per sequence, so a strided view like logits[:, :-1] is never copied whole.
        y2 = y.view(s, t)
        rows = [reference.row_losses_reference(x[i], y2[i], ignore_index) for i in range(s)]
        row = torch.cat(rows) if rows else y.new_zeros(0, dtype=torch.float32)
    else:
        row = reference.row_losses_reference(x, y, ignore_index)
    count = _sum_rows((y != ignore_index).float(), seq, s, t, use_triton)
    return _sum_rows(row, seq, s, t, use_triton), count


def fused_linear_per_sample_loss(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    seq_index: Tensor | None = None,
    num_seqs: int | None = None,
    ignore_index: int = -100,
    bias: Tensor | None = None,
    chunk_size: int | None = None,
    backend: Backend = "auto",
) -> tuple[Tensor, Tensor]:
    """``per_sample_loss(hidden @ weight.T + bias, ...)`` without the ``[n, V]`` logits.

    ``hidden [n, H]`` (+ ``labels [n]``, ``seq_index [n]``) or ``[B, T, H]`` (+ ``labels
    [B, T]``); ``weight [V, H]`` is the output embedding (``lm_head.weight``), ``bias [V]``
    optional. Rows are processed ``chunk_size`` at a time (default: a chunk of logits of about
    64 Mi elements on Triton, 16 Mi on the reference), so peak extra memory is one chunk of
    logits. Scoring is no-grad: no backward is provided.
    """
    x, y, seq, s, t = _flatten(hidden, labels, seq_index, num_seqs)
    x2 = x.reshape(-1, x.shape[-1])
    if x2.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden size {x2.shape[1]} != weight {tuple(weight.shape)}")
    use_triton = _use_triton(backend, hidden, weight)
    with torch.no_grad():
        if use_triton:
            from .fused_linear import linear_row_losses_triton

            row = linear_row_losses_triton(x2, weight, y, ignore_index, bias, chunk_size)
        else:
            row = reference.linear_row_losses_reference(
                x2, weight, y, ignore_index, bias, chunk_size
            )
        count = _sum_rows((y != ignore_index).float(), seq, s, t, use_triton)
        return _sum_rows(row, seq, s, t, use_triton), count

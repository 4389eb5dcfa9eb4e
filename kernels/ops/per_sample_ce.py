"""Triton kernels: per-row cross-entropy (one pass, online log-sum-exp) and a deterministic
segment sum.

The CE kernel reads each logit once: a running max ``m`` and a running sum
``d = sum(exp(x - m))`` are rescaled whenever the max grows, so no second pass and no
``[n, V]`` fp32 copy are needed. Rows whose label is ignored read no logits at all.
Per-row losses are summed per sequence by a fixed-order kernel rather than atomics, so a
rerun (e.g. after a resume) produces bit-identical losses and hence the same selection.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _row_ce_kernel(
    x_ptr,
    y_ptr,
    out_ptr,
    n_rows,
    rows_per_seq,
    stride_b,
    stride_t,
    V,
    ignore_index,
    ROWS: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * ROWS + tl.arange(0, ROWS).to(tl.int64)
    in_rows = rows < n_rows
    labels = tl.load(y_ptr + rows, mask=in_rows, other=ignore_index).to(tl.int64)
    valid = in_rows & (labels != ignore_index)
    # Rows are addressed through (b, t) strides so views like logits[:, :-1] need no copy.
    b = rows // rows_per_seq
    t = rows - b * rows_per_seq
    row_ptr = x_ptr + b * stride_b + t * stride_t

    m = tl.full((ROWS,), float("-inf"), tl.float32)
    d = tl.zeros((ROWS,), tl.float32)
    # A block whose rows are all ignored skips the loop: no logits are read for it.
    any_valid = tl.max(valid.to(tl.int32), axis=0)
    v_end = tl.where(any_valid > 0, V, 0)
    cols = tl.arange(0, BLOCK_V)
    for start in range(0, v_end, BLOCK_V):
        offs = start + cols
        in_cols = offs < V
        x = tl.load(
            row_ptr[:, None] + offs[None, :],
            mask=valid[:, None] & in_cols[None, :],
            other=0.0,
        ).to(tl.float32)
        # Padding columns are -inf (exp -> 0); ignored rows stay finite (their result is dropped).
        x = tl.where(in_cols[None, :], x, float("-inf"))
        m_new = tl.maximum(m, tl.max(x, axis=1))
        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new[:, None]), axis=1)
        m = m_new
    picked = tl.load(row_ptr + labels, mask=valid, other=0.0).to(tl.float32)
    loss = m + tl.log(tl.where(valid, d, 1.0)) - picked
    tl.store(out_ptr + rows, tl.where(valid, loss, 0.0), mask=in_rows)


def _ce_config(v: int, elem_size: int) -> tuple[int, int, int]:
    """``(ROWS, BLOCK_V, num_warps)``: wide column blocks for LLM vocabularies, several rows
    per program for small V so lanes are not wasted."""
    max_block = 8192 if elem_size <= 2 else 4096
    block_v = min(triton.next_power_of_2(max(v, 1)), max_block)
    rows = max(1, min(64, 4096 // block_v))
    num_warps = 8 if block_v >= 4096 else 4
    return rows, block_v, num_warps


def row_losses_triton(
    logits: Tensor,
    labels: Tensor,
    ignore_index: int = -100,
    *,
    rows_per_program: int | None = None,
    block_v: int | None = None,
) -> Tensor:
    """Per-row CE (fp32 ``[n]``, 0 where ignored) of ``logits [n, V]`` or ``[B, T, V]``.

    ``labels`` has one entry per row (``n`` or ``B*T``). ``rows_per_program`` and ``block_v``
    override the tile (tests use them to exercise partial blocks and multi-block rows).
    """
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    if logits.dim() == 2:
        n, v = logits.shape
        rows_per_seq, stride_b, stride_t = max(n, 1), 0, logits.stride(0)
    else:
        bsz, tlen, v = logits.shape
        n = bsz * tlen
        rows_per_seq, stride_b, stride_t = max(tlen, 1), logits.stride(0), logits.stride(1)
    labels = labels.reshape(-1).contiguous()
    if labels.numel() != n:
        raise ValueError(f"{labels.numel()} labels for {n} rows")
    out = torch.empty(n, dtype=torch.float32, device=logits.device)
    if n == 0:
        return out
    rows, bv, warps = _ce_config(v, logits.element_size())
    rows = rows_per_program or rows
    bv = block_v or bv
    grid = (triton.cdiv(n, rows),)
    _row_ce_kernel[grid](
        logits,
        labels,
        out,
        n,
        rows_per_seq,
        stride_b,
        stride_t,
        v,
        ignore_index,
        ROWS=rows,
        BLOCK_V=bv,
        num_warps=warps,
    )
    return out


@triton.jit
def _segment_sum_kernel(vals_ptr, perm_ptr, bounds_ptr, out_ptr, BLOCK: tl.constexpr):
    seq = tl.program_id(0)
    lo = tl.load(bounds_ptr + seq)
    hi = tl.load(bounds_ptr + seq + 1)
    acc = tl.zeros((BLOCK,), tl.float32)
    for start in range(lo, hi, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < hi
        idx = tl.load(perm_ptr + offs, mask=mask, other=0)
        acc += tl.load(vals_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + seq, tl.sum(acc, axis=0))


def deterministic_segment_sum(values: Tensor, seq_index: Tensor, num_seqs: int) -> Tensor:
    """``out[s] = sum(values[seq_index == s])`` in a fixed order (no float atomics)."""
    out = torch.zeros(num_seqs, dtype=torch.float32, device=values.device)
    if num_seqs == 0 or values.numel() == 0:
        return out
    perm = torch.argsort(seq_index, stable=True)
    edges = torch.arange(num_seqs + 1, device=seq_index.device, dtype=seq_index.dtype)
    bounds = torch.searchsorted(seq_index[perm], edges)
    _segment_sum_kernel[(num_seqs,)](values.contiguous(), perm, bounds, out, BLOCK=256)
    return out

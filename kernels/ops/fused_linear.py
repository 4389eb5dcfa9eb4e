"""Fused linear scoring: per-row CE of ``hidden @ weight.T`` without ``[n, V]`` logits.

Rows are processed in chunks: cuBLAS computes one ``[chunk, V]`` block of logits in the
model's dtype (what ``lm_head`` itself would do), the one-pass Triton CE kernel reduces it
to per-row losses, and the block is reused for the next chunk. Peak extra memory is one
chunk of logits instead of ``n * V``; the matmul stays on tensor cores at full speed because
a chunk of a few hundred rows against the whole vocabulary is still a large GEMM.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .per_sample_ce import row_losses_triton

# Logit elements per chunk (128 MiB in bf16): small next to the full logits of a batch, and
# large enough that each GEMM saturates the GPU.
CHUNK_ELEMS = 1 << 26


def default_chunk_rows(n: int, v: int) -> int:
    """Rows per chunk: ``CHUNK_ELEMS / V`` rounded down to a multiple of 64 (GEMM tiles)."""
    rows = max(64, (CHUNK_ELEMS // max(v, 1)) // 64 * 64)
    return max(1, min(n, rows))


def linear_row_losses_triton(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    ignore_index: int = -100,
    bias: Tensor | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """Per-row losses fp32 ``[n]`` of ``hidden [n, H]`` against ``weight [V, H]`` (no grad)."""
    n = hidden.shape[0]
    v = weight.shape[0]
    out = torch.empty(n, dtype=torch.float32, device=hidden.device)
    if n == 0:
        return out
    rows = chunk_size or default_chunk_rows(n, v)
    buf: Tensor | None = None
    with torch.no_grad():
        for lo in range(0, n, rows):
            hi = min(n, lo + rows)
            h = hidden[lo:hi]
            if buf is None or buf.shape[0] != hi - lo:
                dtype = torch.result_type(h, weight)
                buf = torch.empty(hi - lo, v, dtype=dtype, device=hidden.device)
            # Written in place so the allocator does not hold two chunks at once.
            if bias is None:
                torch.mm(h, weight.t(), out=buf)
            else:
                torch.addmm(bias, h, weight.t(), out=buf)
            out[lo:hi] = row_losses_triton(buf, labels[lo:hi], ignore_index)
    return out

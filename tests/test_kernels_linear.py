"""Fused linear scoring against materialised logits."""

from __future__ import annotations

import pytest
import torch
from es_llm.kernels import fused_linear_per_sample_loss, per_sample_loss, triton_available

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["reference"] + (["triton"] if triton_available() else [])


def _close(a: tuple, b: tuple, dtype: torch.dtype) -> None:
    tol = 2e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(a[0], b[0], rtol=tol, atol=tol)
    torch.testing.assert_close(a[1], b[1], rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("use_bias", [False, True])
@pytest.mark.parametrize("chunk_size", [None, 7])
def test_rows_form(
    backend: str, dtype: torch.dtype, use_bias: bool, chunk_size: int | None
) -> None:
    gen = torch.Generator().manual_seed(5)
    n, h, v = 33, 24, 257
    hidden = torch.randn(n, h, generator=gen).to(dtype).to(DEVICE)
    weight = (torch.randn(v, h, generator=gen) / h**0.5).to(dtype).to(DEVICE)
    bias = torch.randn(v, generator=gen).to(dtype).to(DEVICE) if use_bias else None
    y = torch.randint(0, v, (n,), generator=gen)
    y[::5] = -100
    seq = torch.randint(0, 4, (n,), generator=gen)
    y[seq == 1] = -100
    y, seq = y.to(DEVICE), seq.to(DEVICE)
    got = fused_linear_per_sample_loss(
        hidden, weight, y, seq, 4, bias=bias, chunk_size=chunk_size, backend=backend
    )
    logits = torch.nn.functional.linear(hidden, weight, bias)  # materialised, model dtype
    _close(got, per_sample_loss(logits, y, seq, 4, backend="reference"), dtype)
    assert got[1][1] == 0 and got[0][1] == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_time_form_strided(backend: str) -> None:
    gen = torch.Generator().manual_seed(6)
    hidden = torch.randn(3, 11, 16, generator=gen).to(DEVICE)[:, :-1]
    weight = torch.randn(1000, 16, generator=gen).to(DEVICE)
    y = torch.randint(0, 1000, (3, 10), generator=gen).to(DEVICE)
    y[0, :3] = -100
    got = fused_linear_per_sample_loss(hidden, weight, y, chunk_size=4, backend=backend)
    _close(got, per_sample_loss(hidden @ weight.T, y, backend="reference"), torch.float32)
    assert got[1].tolist() == [7.0, 10.0, 10.0]


def test_default_chunk_bounds_logit_memory() -> None:
    pytest.importorskip("triton")
    from es_llm.kernels.fused_linear import CHUNK_ELEMS, default_chunk_rows

    assert default_chunk_rows(16 * 4096, 128256) * 128256 <= CHUNK_ELEMS
    assert default_chunk_rows(16 * 4096, 128256) % 64 == 0
    assert default_chunk_rows(10, 50) == 10


def test_shape_mismatch() -> None:
    with pytest.raises(ValueError):
        fused_linear_per_sample_loss(
            torch.randn(4, 8), torch.randn(10, 9), torch.zeros(4, dtype=torch.long)
        )

"""Parity of the Triton per-sample CE against the PyTorch reference (and of the reference
against F.cross_entropy). On CPU the Triton kernels run through TRITON_INTERPRET=1
(tests/conftest.py); on a GPU the same tests run the compiled kernels."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from es_llm.kernels import per_sample_loss, triton_available
from es_llm.kernels.reference import per_sample_loss_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
needs_triton = pytest.mark.skipif(not triton_available(), reason="triton not importable")


def _ignore(labels: torch.Tensor, pattern: str, gen: torch.Generator) -> torch.Tensor:
    y = labels.clone()
    if pattern == "random":
        y[torch.rand(y.shape, generator=gen) < 0.3] = -100
    elif pattern == "prefix":
        y[..., : y.shape[-1] // 3] = -100
    elif pattern == "all":
        y[:] = -100
    return y


def _close(a: tuple, b: tuple) -> None:
    torch.testing.assert_close(a[0], b[0], rtol=2e-5, atol=2e-4)
    torch.testing.assert_close(a[1], b[1], rtol=0, atol=0)


def _direct(logits: torch.Tensor, labels: torch.Tensor, seq: torch.Tensor, s: int):
    """Independent check: F.cross_entropy(reduction='none') then a segment sum."""
    ce = F.cross_entropy(logits.float(), labels, ignore_index=-100, reduction="none")
    loss = torch.zeros(s, device=logits.device).index_add_(0, seq, ce)
    cnt = torch.zeros(s, device=logits.device).index_add_(0, seq, (labels != -100).float())
    return loss, cnt


def test_reference_matches_cross_entropy() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(40, 123, generator=gen)
    y = _ignore(torch.randint(0, 123, (40,), generator=gen), "random", gen)
    seq = torch.randint(0, 4, (40,), generator=gen)
    _close(per_sample_loss_reference(x, y, seq, 5), _direct(x, y, seq, 5))


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("v", [50, 257, 1000])
@pytest.mark.parametrize("pattern", ["none", "random", "prefix"])
def test_rows_with_seq_index(v: int, dtype: torch.dtype, pattern: str) -> None:
    gen = torch.Generator().manual_seed(v)
    n = 37  # not a multiple of any tile
    x = (torch.randn(n, v, generator=gen) * 4).to(dtype).to(DEVICE)
    y = _ignore(torch.randint(0, v, (n,), generator=gen), pattern, gen)
    seq = torch.randint(0, 5, (n,), generator=gen)  # unsorted on purpose
    seq[seq == 3] = 4  # sequence 3 has no rows; sequence 5 (num_seqs=6) neither
    y[seq == 2] = -100  # a sequence with every label ignored
    y, seq = y.to(DEVICE), seq.to(DEVICE)
    got = per_sample_loss(x, y, seq, 6, backend="triton")
    ref = per_sample_loss(x, y, seq, 6, backend="reference")
    _close(got, ref)
    _close(ref, _direct(x, y, seq, 6))
    assert got[0].dtype == got[1].dtype == torch.float32
    assert got[1][2] == 0 and got[0][2] == 0 and got[1][3] == 0


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("v", [257, 1000])
def test_batch_time_form_and_strided_view(v: int, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(1)
    full = (torch.randn(3, 10, v, generator=gen) * 2).to(dtype).to(DEVICE)
    x = full[:, :-1]  # the causal-shift view: not viewable as [n, V]
    assert not x.is_contiguous()
    y = torch.randint(0, v, (3, 9), generator=gen)
    y[1] = -100
    y[2, :4] = -100
    y = y.to(DEVICE)
    got = per_sample_loss(x, y, backend="triton")
    ref = per_sample_loss(x, y, backend="reference")
    _close(got, ref)
    seq = torch.arange(3, device=DEVICE).repeat_interleave(9)
    _close(ref, _direct(x.reshape(-1, v), y.reshape(-1), seq, 3))
    assert got[1].tolist() == [9.0, 0.0, 5.0]


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_large_vocab_few_rows(dtype: torch.dtype) -> None:
    """V = 50257 (odd, several column blocks per row) on a handful of rows."""
    gen = torch.Generator().manual_seed(2)
    v, n = 50257, 5
    x = (torch.randn(n, v, generator=gen) * 3).to(dtype).to(DEVICE)
    y = torch.tensor([v - 1, 0, -100, 12345, 50000], device=DEVICE)
    seq = torch.tensor([0, 0, 1, 1, 2], device=DEVICE)
    _close(
        per_sample_loss(x, y, seq, 3, backend="triton"),
        per_sample_loss(x, y, seq, 3, backend="reference"),
    )


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_extreme_logits(dtype: torch.dtype) -> None:
    """+-1e4 logits: the online max keeps exp() finite; losses are ~0 or ~2e4, never inf/NaN."""
    v, n = 300, 6
    x = torch.full((n, v), -1e4)
    x[:, 7] = 1e4
    x[1, 250] = 1e4  # a tie for the max
    x[2] = 1e4  # every logit at the max
    x = x.to(dtype).to(DEVICE)
    y = torch.tensor([7, 7, 3, 8, 299, -100], device=DEVICE)
    seq = torch.arange(n, device=DEVICE)
    got = per_sample_loss(x, y, seq, n, backend="triton")
    ref = per_sample_loss(x, y, seq, n, backend="reference")
    assert torch.isfinite(got[0]).all()
    _close(got, ref)
    gap = x[3, 7].float() - x[3, 8].float()  # 2e4 up to the dtype's rounding of 1e4
    torch.testing.assert_close(got[0][3], gap, rtol=1e-5, atol=0)


@needs_triton
def test_all_ignored_and_empty() -> None:
    x = torch.randn(4, 3, 77, device=DEVICE)
    y = torch.full((4, 3), -100, device=DEVICE)
    loss, cnt = per_sample_loss(x, y, backend="triton")
    assert loss.tolist() == [0.0] * 4 and cnt.tolist() == [0.0] * 4
    e = per_sample_loss(
        torch.empty(0, 9, device=DEVICE),
        torch.empty(0, dtype=torch.long, device=DEVICE),
        torch.empty(0, dtype=torch.long, device=DEVICE),
        2,
        backend="triton",
    )
    assert e[0].tolist() == [0.0, 0.0] and e[1].tolist() == [0.0, 0.0]


@needs_triton
@pytest.mark.parametrize("rows,block_v", [(1, 64), (4, 128), (16, 32), (64, 1024)])
def test_tiles_partial_blocks(rows: int, block_v: int) -> None:
    """Row tiles that do not divide n and column blocks that do not divide V."""
    from es_llm.kernels.per_sample_ce import row_losses_triton
    from es_llm.kernels.reference import row_losses_reference

    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(29, 203, generator=gen).to(DEVICE)
    y = torch.randint(0, 203, (29,), generator=gen)
    y[5:9] = -100
    y = y.to(DEVICE)
    got = row_losses_triton(x, y, -100, rows_per_program=rows, block_v=block_v)
    torch.testing.assert_close(got, row_losses_reference(x, y), rtol=2e-5, atol=2e-5)


@needs_triton
def test_custom_ignore_index_and_determinism() -> None:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(50, 99, generator=gen).to(DEVICE)
    y = torch.randint(0, 99, (50,), generator=gen)
    y[::4] = 0
    y = y.to(DEVICE)
    seq = torch.randint(0, 7, (50,), generator=gen).to(DEVICE)
    a = per_sample_loss(x, y, seq, 7, ignore_index=0, backend="triton")
    b = per_sample_loss(x, y, seq, 7, ignore_index=0, backend="triton")
    _close(a, per_sample_loss(x, y, seq, 7, ignore_index=0, backend="reference"))
    assert torch.equal(a[0], b[0])  # bit-identical reruns (no float atomics)


def test_dispatcher_validation() -> None:
    x = torch.randn(4, 10)
    y = torch.zeros(4, dtype=torch.long)
    with pytest.raises(TypeError):
        per_sample_loss(x, y, torch.zeros(4, dtype=torch.int32), 1)
    with pytest.raises(ValueError):
        per_sample_loss(x, y, backend="cuda")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        per_sample_loss(x.view(2, 2, 10), y, torch.zeros(4, dtype=torch.long))
    # auto on CPU is the reference; num_seqs defaults to max + 1
    loss, cnt = per_sample_loss(x, y, torch.tensor([0, 0, 2, 2]))
    assert loss.shape == (3,) and cnt.tolist() == [2.0, 0.0, 2.0]

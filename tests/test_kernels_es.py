"""The fused ES epilogue against the spec's formula (section 2)."""

from __future__ import annotations

import pytest
import torch
from es_llm.kernels import fused_es_scores, per_sample_loss, triton_available

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["reference"] + (["triton"] if triton_available() else [])


def _inputs(seed: int, s: int = 300):
    gen = torch.Generator().manual_seed(seed)
    count = torch.randint(0, 5, (s,), generator=gen).float()  # ~1/5 have no valid token
    loss_sum = torch.rand(s, generator=gen) * 10 * count
    ids = torch.randperm(1000, generator=gen)[:s] + 5000  # unique global ids, shard offset 5000
    scores = torch.rand(1000, generator=gen)
    return loss_sum.to(DEVICE), count.to(DEVICE), scores.to(DEVICE), ids.to(DEVICE)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("betas", [(0.2, 0.8), (0.5, 0.5), (0.0, 0.99)])
def test_matches_formula(backend: str, betas: tuple[float, float]) -> None:
    b1, b2 = betas
    loss_sum, count, scores, ids = _inputs(0)
    before = scores.clone()
    w, loss, valid = fused_es_scores(
        loss_sum, count, scores, ids, b1, b2, offset=5000, backend=backend
    )
    local = ids - 5000
    s = before[local]
    exp_valid = count > 0
    lv = torch.where(exp_valid, loss_sum / count.clamp_min(1), 0.0)
    assert torch.equal(valid, exp_valid) and valid.dtype == torch.bool
    torch.testing.assert_close(loss, lv)
    torch.testing.assert_close(w, torch.where(exp_valid, b1 * s + (1 - b1) * lv, 0.0))
    expected = before.clone()
    expected[local[exp_valid]] = (b2 * s + (1 - b2) * lv)[exp_valid]
    torch.testing.assert_close(scores, expected)
    # sequences without a valid token: score bit-for-bit untouched
    assert torch.equal(scores[local[~exp_valid]], before[local[~exp_valid]])
    untouched = torch.ones(1000, dtype=torch.bool, device=DEVICE)
    untouched[local] = False
    assert torch.equal(scores[untouched], before[untouched])


@pytest.mark.parametrize("backend", BACKENDS)
def test_never_scored_nan_reads_as_s_init(backend: str) -> None:
    scores = torch.tensor([float("nan"), 0.5, float("nan"), 2.0], device=DEVICE)
    loss_sum = torch.tensor([3.0, 4.0, 5.0], device=DEVICE)
    count = torch.tensor([1.0, 2.0, 0.0], device=DEVICE)
    ids = torch.tensor([0, 1, 2], device=DEVICE)
    w, loss, valid = fused_es_scores(
        loss_sum, count, scores, ids, 0.2, 0.8, unscored_value=0.1, backend=backend
    )
    torch.testing.assert_close(
        w, torch.tensor([0.2 * 0.1 + 0.8 * 3, 0.2 * 0.5 + 0.8 * 2, 0.0], device=DEVICE)
    )
    torch.testing.assert_close(
        scores[:2], torch.tensor([0.8 * 0.1 + 0.2 * 3, 0.8 * 0.5 + 0.2 * 2], device=DEVICE)
    )
    assert torch.isnan(scores[2])  # invalid: still never scored
    assert valid.tolist() == [True, True, False]


@pytest.mark.parametrize("backend", BACKENDS)
def test_end_to_end_with_per_sample_loss(backend: str) -> None:
    """per_sample_loss output feeds the epilogue directly; both backends agree."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(4, 6, 80, generator=gen).to(DEVICE)
    y = torch.randint(0, 80, (4, 6), generator=gen)
    y[2] = -100
    y = y.to(DEVICE)
    ls, cnt = per_sample_loss(x, y, backend=backend)
    scores = torch.full((10,), 0.3, device=DEVICE)
    ids = torch.tensor([9, 0, 4, 7], device=DEVICE)
    w, loss, valid = fused_es_scores(ls, cnt, scores, ids, 0.2, 0.8, backend=backend)
    ref_scores = torch.full((10,), 0.3, device=DEVICE)
    ls_r, cnt_r = per_sample_loss(x, y, backend="reference")
    w_r, loss_r, valid_r = fused_es_scores(
        ls_r, cnt_r, ref_scores, ids, 0.2, 0.8, backend="reference"
    )
    torch.testing.assert_close(w, w_r)
    torch.testing.assert_close(scores, ref_scores)
    assert valid.tolist() == [True, True, False, True]


def test_ids_must_be_int64() -> None:
    with pytest.raises(TypeError):
        fused_es_scores(
            torch.ones(2),
            torch.ones(2),
            torch.zeros(3),
            torch.tensor([0, 1], dtype=torch.int32),
            0.2,
            0.8,
        )

"""The one step estimator: it replays the loop's draw, so burn-in steps (which draw B, not
B_meta) are counted and the planned total equals the steps a run takes."""

from __future__ import annotations

from es_llm.sampling.config import EvolvedSamplingConfig
from es_llm.sampling.schedule import Phase, estimate_total_steps, phase_for_step


def _replay(cfg: EvolvedSamplingConfig, planned: int, n: int, b: int, bm: int, epochs: int) -> int:
    """An independent, literal replay of the training loop's epoch/step structure."""
    spe = max(1, n // b)  # burn-in epochs count plain steps of b
    step = 0
    for _ in range(epochs):
        pos = 0
        while True:
            select = (
                cfg.uses_scoring_forward and phase_for_step(step, planned, cfg, spe) is Phase.SELECT
            )
            need = bm if select else b
            if pos + need > n:
                break
            pos, step = pos + need, step + 1
    return step


def test_uniform_is_epochs_times_batches() -> None:
    cfg = EvolvedSamplingConfig(method="uniform")
    assert (
        estimate_total_steps(cfg, min_local=103, train_per_rank=10, meta_per_rank=10, epochs=3)
        == 30
    )


def test_es_counts_burn_in_steps_that_draw_b() -> None:
    cfg = EvolvedSamplingConfig(method="es", selection_ratio=0.5, burn_in_steps=7)
    total = estimate_total_steps(cfg, min_local=400, train_per_rank=4, meta_per_rank=8, epochs=2)
    # 7 burn-in steps take 28 samples of epoch 0, the rest goes in steps of 8
    assert total == 7 + (400 - 28) // 8 + 400 // 8
    assert _replay(cfg, total, 400, 4, 8, 2) == total


def test_default_burn_in_is_a_fixed_point() -> None:
    cfg = EvolvedSamplingConfig(method="es", selection_ratio=0.8)
    total = estimate_total_steps(cfg, min_local=8192, train_per_rank=32, meta_per_rank=40, epochs=2)
    assert total > 2 * (8192 // 40)  # burn-in adds steps beyond the naive count
    # the loop stops at the planned total, so its replay reaches at least that many steps
    assert _replay(cfg, total, 8192, 32, 40, 2) >= total


def test_anneal_steps_draw_b() -> None:
    cfg = EvolvedSamplingConfig(method="es", anneal_fraction=0.5, burn_in_steps=0)
    total = estimate_total_steps(cfg, min_local=160, train_per_rank=4, meta_per_rank=8, epochs=1)
    assert _replay(cfg, total, 160, 4, 8, 1) == total
    assert total > 160 // 8


def test_max_steps_caps_and_pruning_counts_expected_kept() -> None:
    cfg = EvolvedSamplingConfig(method="eswp", prune_ratio=0.5, burn_in_steps=0)
    full = estimate_total_steps(cfg, min_local=1000, train_per_rank=5, meta_per_rank=10, epochs=4)
    # epoch 0 has no scores yet; epochs 1-3 are pruned (no pruning from ceil(0.875*4) = 4 on),
    # each keeping 75% in expectation (half the samples are below the mean, each pruned w.p. 0.5)
    assert full == 100 + 75 + 75 + 75
    capped = estimate_total_steps(
        cfg, min_local=1000, train_per_rank=5, meta_per_rank=10, epochs=4, max_steps=12
    )
    assert capped == 12


def test_a_burn_in_epoch_trains_the_whole_first_epoch_in_plain_steps() -> None:
    """burn_in_epochs=1 at ratio 0.5: all 400 samples of epoch 0 go in plain steps of 4 (100
    steps), selection (steps of 8) starts with epoch 1."""
    cfg = EvolvedSamplingConfig(method="lp", selection_ratio=0.5, burn_in_epochs=1)
    total = estimate_total_steps(cfg, min_local=400, train_per_rank=4, meta_per_rank=8, epochs=3)
    assert total == 100 + 2 * (400 // 8)
    assert [phase_for_step(s, total, cfg, 100) for s in (0, 99, 100)] == [
        Phase.BURN_IN,
        Phase.BURN_IN,
        Phase.SELECT,
    ]
    assert _replay(cfg, total, 400, 4, 8, 3) == total

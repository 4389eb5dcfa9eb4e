"""A NaN/inf training or validation loss stops the run: one line naming the step and the last
good checkpoint, a non-zero exit, no checkpoint of the bad step and no exported model.

The runs diverge for real: AdamW at learning rate 1e30 moves every weight by about 1e30 in
its first step, and the next forward overflows float32.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import TINY_RUN_ARGS, StartedCli

from es_llm.drivers.deepspeed.export import check_finite_weights
from es_llm.errors import NonFiniteError

DIVERGING = {"optimizer": {"type": "AdamW", "params": {"lr": 1e30, "torch_adam": True}}}


def _one_error_line(proc) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("es-llm")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return errors[0]


@pytest.mark.multiproc
def test_a_diverging_run_stops_at_the_first_non_finite_loss(tmp_path, es_cache, tiny_ds_config):
    args = [*TINY_RUN_ARGS, "--max-steps", "6", "--eval-points", "1"]
    # ES: step 1 is burn-in, step 2 selects; a SELECT step's training losses are checked
    # before the checkpoint after it, which is therefore never written
    es_cfg = tiny_ds_config(evolved_sampling={"burn_in_steps": 1}, **DIVERGING)
    es_out = tmp_path / "es"
    es = StartedCli(
        ["train", "--config", str(es_cfg), "--out", str(es_out), "--save-every", "1", *args],
        es_cache,
        tmp_path / "es-logs",
    )
    # uniform, evaluated after every step: the validation loss after step 1 is the first
    uni_out = tmp_path / "uniform"
    uni = StartedCli(
        ["train", "--config", str(es_cfg), "--method", "uniform", "--out", str(uni_out),
         "--eval-every", "1", *args],
        es_cache,
        tmp_path / "uniform-logs",
    )  # fmt: skip
    line = _one_error_line(es.result())
    assert "the training loss of step 2 is not finite" in line
    assert f"the last good checkpoint is {es_out / 'checkpoints' / 'global_step1'}" in line
    assert (es_out / "checkpoints" / "global_step1").is_dir()
    assert not (es_out / "checkpoints" / "global_step2").exists()
    assert not (es_out / "model").exists()

    line = _one_error_line(uni.result())
    assert "the validation loss (interval) of step 1 is not finite" in line
    assert "no checkpoint was written before it" in line
    assert not (uni_out / "model").exists()


def test_non_finite_weights_are_never_exported(tmp_path: Path) -> None:
    good = {"w": torch.ones(3), "steps": torch.tensor([3])}
    check_finite_weights(good, tmp_path / "model")
    check_finite_weights(None, tmp_path / "model")  # another rank (no process group here)
    bad = {**good, "h.0.attn.weight": torch.tensor([1.0, float("nan")])}
    with pytest.raises(NonFiniteError, match=r"h\.0\.attn\.weight.*no model exported"):
        check_finite_weights(bad, tmp_path / "model")
    with pytest.raises(NonFiniteError):
        check_finite_weights({"w": torch.tensor([float("inf")], dtype=torch.bfloat16)}, tmp_path)

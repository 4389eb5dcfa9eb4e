"""Every collective goes through es_llm/dist.py, on the device its backend needs.

Why: NCCL accepts only CUDA tensors and gloo only CPU ones; a collective built anywhere else
was how every GPU run broke. The 2-rank run below goes through the training paths that
communicate (burn-in and plain steps, selection steps, an ESWP epoch start, a checkpoint) with
a guard on torch.distributed that reports any collective called from elsewhere.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO, TINY_RUN_ARGS, free_port

from es_llm import dist

GUARD = REPO / "tests" / "dist_guard.py"


def test_a_tensor_on_the_wrong_device_is_refused_by_every_collective():
    meta = torch.zeros(2, dtype=torch.int64, device="meta")
    with pytest.raises(dist.CollectiveDeviceError, match="all_gather_cat: tensor on meta"):
        dist.all_gather_cat(meta)
    with pytest.raises(dist.CollectiveDeviceError, match="all_reduce_"):
        dist.all_reduce_(meta, "max")
    with pytest.raises(dist.CollectiveDeviceError, match="lockstep_diverged"):
        dist.lockstep_diverged(meta[0])
    ok = torch.arange(3, dtype=torch.int64, device=dist.device())
    assert torch.equal(dist.all_gather_cat(ok), ok)  # one rank: itself
    assert not bool(dist.lockstep_diverged(ok.sum()))


def test_the_guard_reports_a_collective_called_from_elsewhere(tmp_path):
    """Negative control: the guard is not blind (a direct torch.distributed call is caught)."""
    report = tmp_path / "report"
    proc = subprocess.run(
        [sys.executable, str(GUARD), str(report), "--", "--self-test", str(free_port())],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = (tmp_path / "report.0").read_text().splitlines()
    assert lines and lines[0].startswith("barrier from ") and "dist_guard.py" in lines[0]


@pytest.mark.multiproc
def test_two_rank_training_calls_collectives_only_through_es_llm_dist(
    tmp_path, es_cache, tiny_ds_config
):
    report = tmp_path / "report"
    cfg = tiny_ds_config(evolved_sampling={"method": "eswp", "burn_in_steps": 1})
    args = ["train", "--config", str(cfg), "--out", str(tmp_path / "run"), "--epochs", "2",
            "--max-steps", "6", "--save-every", "5", *TINY_RUN_ARGS, "--max-train-samples", "64"]  # fmt: skip
    env = {**os.environ, "ES_LLM_CACHE": str(es_cache), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2",
           "--master_port", str(free_port()), str(GUARD), str(report), "--", *args]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert (tmp_path / "run" / "summary.json").is_file()
    bad = [f.read_text() for f in tmp_path.glob("report.*")]
    assert not bad, "collectives outside es_llm/dist.py:\n" + "".join(bad)

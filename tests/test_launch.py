"""launch/ scripts as real jobs on this machine, and ZeRO-3 against ZeRO-0.

* two "nodes" on localhost (`launch/multi_node_no_ssh.sh`: the deepspeed launcher with
  --no_ssh --node_rank --master_addr, a hostfile of two distinct node labels with one slot
  each) train and select exactly as a 2-rank single-node job (`launch/single_node.sh 2`);
* a 2-rank ZeRO-3 job (parameters partitioned, the scoring forward gathers them) selects
  what the ZeRO-0 job selects.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from conftest import REPO, free_port
from hf_models import reload_val_loss
from test_train_e2e import assert_quiet

from es_llm.drivers.deepspeed.metrics import read_jsonl

RUN = [
    "--max-train-samples",
    "256",
    "--seq-len",
    "32",
    "--vocab-size",
    "512",
    "--max-val-samples",
    "32",
    "--max-steps",
    "6",
    "--no-progress",
]
ZERO0 = REPO / "es_llm" / "configs" / "ds" / "cpu_test_zero0.json"
ZERO3 = REPO / "es_llm" / "configs" / "ds" / "cpu_test_zero3.json"


def _env(cache: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "ES_LLM_CACHE": str(cache), "OMP_NUM_THREADS": "1", **extra}


def _check(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\nSTDOUT\n{proc.stdout[-3000:]}\nSTDERR\n{proc.stderr[-5000:]}"
    )


def _steps(out: Path) -> list[dict]:
    return [r for r in read_jsonl(out / "metrics.jsonl") if r["type"] == "step"]


def _single_node(out: Path, cache: Path, config: Path) -> list[dict]:
    env = _env(cache, MASTER_PORT=str(free_port()))
    env.pop("DS_ACCELERATOR", None)  # as on a user's machine: the script names the CPU itself
    proc = subprocess.run(
        ["bash", "launch/single_node.sh", "2", "--config", str(config), "--out", str(out), *RUN],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    _check(proc)
    assert_quiet(proc)  # the 2-rank command: no launcher INFO, no warning of any rank
    return _steps(out)


@pytest.fixture(scope="module")
def zero0_two_ranks(tmp_path_factory, es_cache) -> list[dict]:
    return _single_node(tmp_path_factory.mktemp("zero0") / "run", es_cache, ZERO0)


@pytest.mark.multiproc
def test_two_nodes_without_ssh_select_as_one_node(tmp_path, es_cache, zero0_two_ranks):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    out = tmp_path / "run"
    port = str(free_port())
    cmd = [
        "bash",
        "launch/multi_node_no_ssh.sh",
        str(hostfile),
        "--config",
        str(ZERO0),
        "--out",
        str(out),
        *RUN,
    ]
    nodes = [
        subprocess.Popen(
            cmd,
            cwd=REPO,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            # verbose: the launcher's INFO lines say which ranks each node started
            env=_env(
                es_cache,
                NODE_RANK=str(r),
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=port,
                ES_LLM_VERBOSE="1",
            ),  # fmt: skip
        )
        for r in (0, 1)
    ]
    results = []
    for p in nodes:
        stdout, stderr = p.communicate(timeout=600)
        results.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    for r in results:
        _check(r)
    # each launcher started one rank of a 2-rank world
    assert "nnodes=2, num_local_procs=1, node_rank=0" in results[0].stderr + results[0].stdout
    assert "nnodes=2, num_local_procs=1, node_rank=1" in results[1].stderr + results[1].stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 6
    steps = _steps(out)
    assert [r["selection_digest"] for r in steps] == [
        r["selection_digest"] for r in zero0_two_ranks
    ]
    assert [r["train_loss"] for r in steps] == [r["train_loss"] for r in zero0_two_ranks]


@pytest.mark.multiproc
def test_zero3_selects_what_zero0_selects(tmp_path, es_cache, zero0_two_ranks):
    out = tmp_path / "run"
    steps = _single_node(out, es_cache, ZERO3)
    assert json.loads((out / "summary.json").read_text())["zero_stage"] == 3
    assert [r["phase"] for r in steps][:2] == ["burn_in", "select"]
    # Identical selections at every step of this short run. The losses agree to float
    # rounding only: ZeRO-3 reduce-scatters gradients in another order than ZeRO-0's
    # all-reduce, so after a few optimizer steps the last bits differ.
    assert [r["selection_digest"] for r in steps] == [
        r["selection_digest"] for r in zero0_two_ranks
    ]
    for a, b in zip(steps, zero0_two_ranks, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
    # the partitioned parameters gathered onto rank 0 make a whole model transformers reloads
    summary = json.loads((out / "summary.json").read_text())
    assert reload_val_loss(out / "model", es_cache, RUN) == pytest.approx(
        summary["final_val_loss"], rel=1e-5
    )

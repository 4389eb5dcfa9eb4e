"""The GPU check's pieces that need no GPU: the table from run directories, the sync-count
arithmetic, the plain PyTorch loop on a tiny model, and the whole script in --cpu-smoke mode."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest
from conftest import REPO

from es_llm.tools import gpu_check
from es_llm.tools.bench_plain import PlainOptions, run_plain
from es_llm.tools.sync_count import count_syncs, per_step

B, B_META, SEQ = 32, 64, 256


def _write_run(
    d: Path, method: str, step_s: list[float], phases: list[str], timers: dict[str, float]
) -> None:
    d.mkdir(parents=True)
    selecting = [p == "select" for p in phases]
    summary = {
        "method": method,
        "steps": len(step_s),
        "seq_len": SEQ,
        "bp_samples": B * len(step_s),
        "scored_samples": B_META * sum(selecting),
        "time_breakdown_s": timers,
        "time_breakdown_per_step_s": {k: v / len(step_s) for k, v in timers.items()},
        "batch": {"train_batch_size": B},
    }
    (d / "summary.json").write_text(json.dumps(summary))
    with (d / "metrics.jsonl").open("w") as fh:
        fh.write(json.dumps({"type": "eval", "step": 0, "val_loss": 9.0}) + "\n")
        for i, (s, ph) in enumerate(zip(step_s, phases, strict=True)):
            rec = {"type": "step", "step": i + 1, "phase": ph, "selected": B, "step_s": s}
            fh.write(json.dumps(rec) + "\n")


def _runs(tmp_path: Path, *, select_s: float, plain_step: float) -> dict:
    # uniform: 0.100 s/step after a slow first step; fwd+bwd 0.07, optimizer 0.03 per step
    _write_run(tmp_path / "uniform", "uniform", [1.0] + [0.1] * 9, ["plain"] * 10,
               {"score_fwd_s": 0.0, "select_s": 0.0, "train_fwd_bwd_s": 0.7,
                "optimizer_s": 0.3})  # fmt: skip
    # es: one burn-in step, then 9 selection steps of 0.125 s with 0.02 s of scoring each
    _write_run(tmp_path / "es", "es", [1.0] + [0.125] * 9, ["burn_in"] + ["select"] * 9,
               {"score_fwd_s": 0.18, "select_s": select_s * 9, "train_fwd_bwd_s": 0.7,
                "optimizer_s": 0.3})  # fmt: skip
    _write_run(tmp_path / "plain", "plain", [plain_step] * 10, ["plain"] * 10,
               {"score_fwd_s": 0.0, "select_s": 0.0, "train_fwd_bwd_s": 0.6,
                "optimizer_s": 0.2})  # fmt: skip
    return {n: gpu_check.read_run(tmp_path / n) for n in ("uniform", "es", "plain")}


def test_table_from_run_directories(tmp_path: Path) -> None:
    runs = _runs(tmp_path, select_s=0.001, plain_step=0.105)
    report = gpu_check.build_report(
        runs, {"uniform": 1.0, "es": 2.0, "plain": 0.0}, warmup=1,
        kernels={"result": "pass", "summary": "12 passed"}, info={"device": "test"},
    )  # fmt: skip
    rows = {r["run"]: r for r in report["rows"]}
    assert rows["uniform"]["tokens_per_s"] == pytest.approx(B * SEQ / 0.1)
    assert rows["uniform"]["step_ms"] == pytest.approx(100.0)
    assert rows["uniform"]["score_ms"] is None and rows["uniform"]["fwd_bwd_ms"] == 70.0
    assert rows["es"]["select_step_ms"] == pytest.approx(125.0)
    assert rows["es"]["score_ms"] == pytest.approx(20.0)  # per selection step
    assert rows["es"]["select_ms"] == pytest.approx(1.0)
    assert rows["es"]["optimizer_ms"] == pytest.approx(30.0)
    assert rows["es"]["syncs_per_step"] == 2.0
    # scoring: 0.18 s / (9 x 64) samples against fwd+bwd 0.7 s / (10 x 32) samples
    assert report["scoring_cost_ratio"] == pytest.approx((0.18 / 576) / (0.7 / 320))
    # bookkeeping over all selection steps' time (9 x 0.125 s)
    assert report["bookkeeping_share"] == pytest.approx(0.009 / 1.125)
    results = [t["result"] for t in report["targets"]]
    # 0.8% <= 1%; 0.1 s vs 0.105 s per step -> 1.05 >= 0.9; 125 ms <= (100 + 20) x 1.02 = 122.4? no
    assert results == ["pass", "pass", "FAIL"]
    assert report["targets"][2]["value"] == pytest.approx(125.0 / 122.4)
    md = gpu_check.render_markdown(report)
    assert "| uniform | 81,920 | 100.0 |" in md and "| FAIL |" in md and "12 passed" in md


def test_targets_fail_and_missing_runs_are_said(tmp_path: Path) -> None:
    runs = _runs(tmp_path, select_s=0.01, plain_step=0.08)
    report = gpu_check.build_report(runs, {}, warmup=1)
    assert [t["result"] for t in report["targets"]][:2] == ["FAIL", "FAIL"]  # 8%; 0.8x
    runs["plain"] = None
    report = gpu_check.build_report(runs, {}, warmup=1)
    assert report["targets"][1]["result"] == "not measured"
    assert {r["run"]: r["status"] for r in report["rows"]}["plain"] == "not run or failed"
    assert "not run or failed" in gpu_check.render_markdown(report)


def test_sync_counts_per_step() -> None:
    assert per_step({"syncs": 130, "steps": 10}, {"syncs": 170, "steps": 30}) == 2.0
    assert per_step({"syncs": None, "steps": 10}, {"syncs": 170, "steps": 30}) is None
    assert per_step({"syncs": 1, "steps": 10}, {"syncs": 1, "steps": 10}) is None
    import torch

    result, counts = count_syncs(lambda: 41 + 1)
    assert result == 42
    assert (counts is None) == (not torch.cuda.is_available())  # never a made-up count


def test_plain_loop_trains_a_tiny_model_on_cpu(tmp_path: Path, es_cache: Path) -> None:
    opts = PlainOptions(
        out=tmp_path / "plain", config="cpu_tiny", model="gpt2-tiny", seq_len=32,
        vocab_size=512, max_train_samples=256, steps=3, cache_dir=str(es_cache), device="cpu",
    )  # fmt: skip
    s = run_plain(opts)
    assert s["method"] == "plain" and s["steps"] == 3 and s["device"] == "cpu"
    assert s["bp_samples"] == 3 * 32 and s["batch"]["micro_batch_size"] == 16
    assert s["batch"]["gradient_accumulation_steps"] == 2  # cpu_tiny: 32 = 16 x 2
    assert math.isfinite(s["final_train_loss"]) and s["final_train_loss"] > 0
    assert s["time_breakdown_s"]["train_fwd_bwd_s"] > 0 and s["time_breakdown_s"]["optimizer_s"] > 0
    assert json.loads((tmp_path / "plain" / "summary.json").read_text()) == s
    run = gpu_check.read_run(tmp_path / "plain")
    assert [r["step"] for r in run["steps"]] == [1, 2, 3]
    assert gpu_check.run_stats(run, warmup=1)["tokens_per_s"] > 0


@pytest.mark.multiproc
def test_check_script_cpu_smoke(tmp_path: Path, es_cache: Path) -> None:
    out = tmp_path / "check"
    proc = subprocess.run(
        ["bash", "launch/gpu_check.sh", str(out), "--cpu-smoke", "--skip", "kernels,compare",
         "--steps", "2", "--cache-dir", str(es_cache)],
        cwd=REPO, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert {r["run"]: r["status"] for r in report["rows"]} == {
        "uniform": "ok", "es": "ok", "plain": "ok"
    }  # fmt: skip
    assert report["cpu_smoke"] and report["device"].startswith("cpu")
    assert all(t["result"] in ("pass", "FAIL") for t in report["targets"])
    assert (out / "gpu_check.md").read_text() in proc.stdout
    assert report["runs"]["es"]["select_steps"] == 1  # burn-in step, then one selection step

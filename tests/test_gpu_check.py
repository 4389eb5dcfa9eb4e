"""The GPU check's pieces that need no GPU: the table from run directories, the sync-count
arithmetic, the plain PyTorch loop on a tiny model, and the whole script in --cpu-smoke mode."""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import subprocess
from pathlib import Path

import pytest
from conftest import REPO

from es_llm.tools import gpu_check
from es_llm.tools import gpu_check_table as table
from es_llm.tools.bench_plain import PlainOptions, run_plain
from es_llm.tools.sync_count import (
    SyncCounter,
    count_syncs,
    marking_train_steps,
    per_step_from_marks,
)

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
    return {n: table.read_run(tmp_path / n) for n in ("uniform", "es", "plain")}


def test_table_from_run_directories(tmp_path: Path) -> None:
    runs = _runs(tmp_path, select_s=0.001, plain_step=0.105)
    report = table.build_report(
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
    md = table.render_markdown(report)
    assert "| uniform | 81,920 | 100.0 |" in md and "| FAIL |" in md and "12 passed" in md


def test_targets_fail_and_missing_runs_are_said(tmp_path: Path) -> None:
    runs = _runs(tmp_path, select_s=0.01, plain_step=0.08)
    report = table.build_report(runs, {}, warmup=1)
    assert [t["result"] for t in report["targets"]][:2] == ["FAIL", "FAIL"]  # 8%; 0.8x
    runs["plain"] = None
    report = table.build_report(runs, {}, warmup=1)
    assert report["targets"][1]["result"] == "not measured"
    assert {r["run"]: r["status"] for r in report["rows"]}["plain"] == "not run or failed"
    assert "not run or failed" in table.render_markdown(report)


def test_sync_counts_per_step_from_marks(tmp_path: Path) -> None:
    # the running total at the end of steps 10 and 30: 40 more syncs over 20 steps
    marks = [[s, 100 + 2 * s] for s in range(1, 31)]
    assert per_step_from_marks(marks, 10, 30) == 2.0
    assert per_step_from_marks(marks[:20], 10, 30) is None  # stopped before step 30
    assert per_step_from_marks([], 10, 30) is None  # nothing counted (no CUDA)
    import torch

    result, counts = count_syncs(lambda: 41 + 1)
    assert result == 42
    assert (counts is None) == (not torch.cuda.is_available())  # never a made-up count
    # es-llm train's step records mark the counter; other records do not
    from es_llm.drivers.deepspeed.metrics import MetricsWriter

    counter = SyncCounter()
    writer = MetricsWriter(tmp_path / "metrics.jsonl")
    with marking_train_steps(counter):
        writer.write({"type": "eval", "step": 0, "val_loss": 1.0})
        counter.counts["stream"] += 3  # as the trace callbacks would
        writer.write({"type": "step", "step": 1, "train_loss": 1.0})
        counter.counts["event"] += 2
        writer.write({"type": "step", "step": 2, "train_loss": 1.0})
    writer.write({"type": "step", "step": 3, "train_loss": 1.0})  # unhooked again
    writer.close()
    assert counter.marks == [(1, 3), (2, 5)]
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 4


def test_plain_loop_trains_a_tiny_model_on_cpu(tmp_path: Path, es_cache: Path) -> None:
    opts = PlainOptions(
        out=tmp_path / "plain", config="cpu_tiny", model="gpt2-tiny", seq_len=32,
        vocab_size=512, max_train_samples=256, steps=3, cache_dir=str(es_cache), device="cpu",
    )  # fmt: skip
    marked: list[int] = []
    s = run_plain(opts, on_step=marked.append)
    assert marked == [1, 2, 3]  # the sync counter's marks
    assert s["method"] == "plain" and s["steps"] == 3 and s["device"] == "cpu"
    assert s["bp_samples"] == 3 * 32 and s["batch"]["micro_batch_size"] == 16
    assert s["batch"]["gradient_accumulation_steps"] == 2  # cpu_tiny: 32 = 16 x 2
    assert math.isfinite(s["final_train_loss"]) and s["final_train_loss"] > 0
    assert s["time_breakdown_s"]["train_fwd_bwd_s"] > 0 and s["time_breakdown_s"]["optimizer_s"] > 0
    assert json.loads((tmp_path / "plain" / "summary.json").read_text()) == s
    run = table.read_run(tmp_path / "plain")
    assert [r["step"] for r in run["steps"]] == [1, 2, 3]
    assert table.run_stats(run, warmup=1)["tokens_per_s"] > 0


def test_profiles_order_sizes_and_budget(tmp_path: Path) -> None:
    # most valuable first: kernel parity, the two es-llm runs, the plain loop, then the rest
    assert gpu_check.PIECES == (
        "kernels", "uniform", "es", "plain", "proxy", "syncs", "megatron", "compare"
    )  # fmt: skip
    assert gpu_check.WORKER_PIECES == ("es", "plain", "proxy")  # one warm process
    d = gpu_check.profile_setup("default", tmp_path, REPO, set())
    assert d.config == "zero1_bf16" and d.model == "gpt2-124m" and d.steps == 100
    # the Megatron-core piece: a few ES steps of the same model, bf16 config, TP=1
    megatron = d.megatron_args(tmp_path / "m")
    assert megatron[megatron.index("--engine") + 1] == "megatron"
    assert megatron[megatron.index("--tensor-parallel-size") + 1] == "1"
    assert megatron[megatron.index("--max-steps") + 1] == str(d.megatron_steps) == "10"
    assert megatron[megatron.index("--config") + 1] == "zero1_bf16"
    # the proxy piece: the proxy's cost against this learner's scoring forward, <= 30 s
    proxy = d.proxy_args(tmp_path / "p")
    assert proxy[:2] == ["bench", "proxy"] and proxy[proxy.index("--model") + 1] == "gpt2-124m"
    assert float(proxy[proxy.index("--max-seconds") + 1]) + 5 <= d.estimates["proxy"] <= 30
    assert d.kernel_tests == gpu_check.PARITY_TESTS  # the parity tests, not the bench ...
    assert d.kernel_pytest_args == ("-m", "not multiproc")  # ... nor a CPU DeepSpeed process
    assert all((REPO / "tests" / t).is_file() for t in d.kernel_tests)
    # every piece has an estimate, and together they fit the budget, which fits 7 minutes
    assert set(d.estimates) == set(gpu_check.PIECES)
    assert sum(d.estimates.values()) <= d.budget_s <= 7 * 60 - 2 * gpu_check.STOP_GRACE_S
    f = gpu_check.profile_setup("full", tmp_path, REPO, set())
    assert (f.steps, f.compare_train_samples, f.kernel_tests, f.budget_s) == (300, 4096, (), None)
    assert f.kernel_pytest_args == ()  # every kernel test
    assert f.sync_steps == d.sync_steps == (10, 30)
    smoke = gpu_check.profile_setup("cpu-smoke", tmp_path, REPO, {"compare"})
    assert smoke.cpu_smoke and smoke.model == "gpt2-tiny" and smoke.skip == {"compare"}
    # the worker process reads the setup back from JSON
    assert gpu_check.Setup.from_json(json.loads(json.dumps(smoke.to_json()))) == smoke


def test_budget_too_small_runs_nothing_and_says_so(tmp_path: Path) -> None:
    out = tmp_path / "check"
    rc = gpu_check.main([str(out), "--cpu-smoke", "--budget-s", "1", "--skip", "syncs"])
    assert rc == 0  # pieces left out by the budget are reported, not failures
    report = json.loads((out / "gpu_check.json").read_text())
    assert list(report["pieces"]) == list(gpu_check.PIECES)
    status = {p: v["status"] for p, v in report["pieces"].items()}
    assert status.pop("syncs") == "skipped"
    assert set(status.values()) == {"not run (budget)"}
    assert not (out / "logs").exists()  # no process was started
    md = (out / "gpu_check.md").read_text()
    assert "| 2 | uniform | not run (budget) |" in md and "whole check budget: 1 s" in md
    assert {r["run"]: r["status"] for r in report["rows"]}["es"] == "not run (budget)"
    assert [t["result"] for t in report["targets"]] == ["not measured"] * 3


@pytest.mark.multiproc
def test_check_script_cpu_smoke(tmp_path: Path, es_cache: Path) -> None:
    """The real script: pieces in order, the table rewritten as each piece starts and ends,
    es and plain in one process, and a budget that leaves the last piece out."""
    import time

    out = tmp_path / "check"
    # compare's cpu-smoke estimate (300 s) never fits a 290 s budget; the rest do
    assert gpu_check.SMOKE_ESTIMATES["compare"] > 290
    proc = subprocess.Popen(
        ["bash", "launch/gpu_check.sh", str(out), "--cpu-smoke", "--skip", "kernels,syncs",
         "--steps", "2", "--budget-s", "290", "--cache-dir", str(es_cache)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    seen: list[tuple[str, ...]] = []  # the piece statuses each time the table changed
    while proc.poll() is None:
        with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
            pieces = json.loads((out / "gpu_check.json").read_text())["pieces"]
            snap = tuple(v["status"] for v in pieces.values())
            if not seen or seen[-1] != snap:
                seen.append(snap)
        time.sleep(0.1)
    stdout = proc.stdout.read() if proc.stdout else ""
    assert proc.returncode == 0, stdout[-5000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert list(report["pieces"]) == list(gpu_check.PIECES)
    status = {p: v["status"] for p, v in report["pieces"].items()}
    assert status == {"kernels": "skipped", "uniform": "ok", "es": "ok", "plain": "ok",
                      "proxy": "ok", "syncs": "skipped", "megatron": "ok",
                      "compare": "not run (budget)"}  # fmt: skip
    # the proxy scorer's cost, measured in the worker after plain
    px = report["proxy"]
    assert px["learner"] == "gpt2-tiny" and px["proxy"]["proxy_model"] == "gpt2-nano"
    assert px["per_sample_ms"]["proxy_score_ms"] > 0
    assert "Proxy scorer `gpt2-nano`" in (out / "gpu_check.md").read_text()
    # the Megatron-core driver trained (through the test-only CPU launcher) and exported
    m = report["megatron"]
    assert (m["steps"], m["select_steps"], m["tensor_parallel_size"]) == (3, 2, 1)
    assert math.isfinite(m["final_val_loss"]) and m["tokens_per_s"] > 0
    assert m["export"] == str(out / "megatron" / "model")
    assert (
        "Megatron-core (`--engine megatron`, TP=1): 3 steps (2 selecting)"
        in (out / "gpu_check.md").read_text()
    )
    # each piece's table was on disk before the next piece ended: the order of the snapshots
    order = ["uniform", "es", "plain", "proxy", "megatron"]
    idx = {p: list(gpu_check.PIECES).index(p) for p in order}
    for done, nxt in itertools.pairwise(order):
        assert any(s[idx[done]] == "ok" and s[idx[nxt]] in ("not run", "running") for s in seen), (
            seen
        )
    assert any(s[idx["uniform"]] == "running" for s in seen), seen
    starts = [report["pieces"][p]["started_s"] for p in order]
    assert starts == sorted(starts)
    # es and plain shared one process; uniform had its own
    pids = {p: report["pieces"][p]["pid"] for p in order}
    assert pids["es"] == pids["plain"] == pids["proxy"] != pids["uniform"] != pids["megatron"]
    assert {r["run"]: r["status"] for r in report["rows"]} == {
        "uniform": "ok", "es": "ok", "plain": "ok"
    }  # fmt: skip
    assert report["cpu_smoke"] and report["device"].startswith("cpu")
    assert all(t["result"] in ("pass", "FAIL") for t in report["targets"])
    assert (out / "gpu_check.md").read_text() in stdout
    assert report["runs"]["es"]["select_steps"] == 1  # burn-in step, then one selection step
    # plain's sync count ran after it in the worker (nothing to count on a CPU: no marks)
    plain_syncs = json.loads((out / "syncs" / "plain.json").read_text())
    assert plain_syncs["returncode"] == 0 and plain_syncs["syncs"] is None
    assert json.loads((out / "syncs" / "plain-run" / "summary.json").read_text())["steps"] == 3
    assert "plain loop: 2 steps" in (out / "logs" / "plain.log").read_text()


@pytest.mark.multiproc
def test_a_terminated_check_stops_its_piece_and_leaves_the_table(tmp_path: Path) -> None:
    """SIGTERM to the check (a caller's time limit) while the first piece runs: the piece's
    process group is stopped with it, and the table says which piece was cut."""
    import os
    import signal
    import time

    out = tmp_path / "check"
    # a cache of its own: the session's shared one must never see a build cut short
    proc = subprocess.Popen(
        ["bash", "launch/gpu_check.sh", str(out), "--cpu-smoke", "--skip", "kernels,syncs",
         "--steps", "2", "--cache-dir", str(tmp_path / "cache")],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    child = None
    deadline = time.monotonic() + 300
    while child is None and proc.poll() is None and time.monotonic() < deadline:
        with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
            child = json.loads((out / "pieces.json").read_text())["uniform"].get("pid")
        time.sleep(0.05)
    assert child is not None, proc.communicate()[0][-3000:]
    proc.send_signal(signal.SIGTERM)
    stdout = proc.communicate(timeout=120)[0]
    assert proc.returncode == 128 + signal.SIGTERM, stdout[-3000:]
    with pytest.raises(ProcessLookupError):  # the training process went with the check
        os.kill(child, 0)
    report = json.loads((out / "gpu_check.json").read_text())
    status = {p: v["status"] for p, v in report["pieces"].items()}
    assert status == {"kernels": "skipped", "uniform": "cut off (check stopped)", "es": "not run",
                      "plain": "not run", "proxy": "not run", "syncs": "skipped",
                      "megatron": "not run", "compare": "not run"}  # fmt: skip
    assert "| 2 | uniform | cut off (check stopped) |" in (out / "gpu_check.md").read_text()

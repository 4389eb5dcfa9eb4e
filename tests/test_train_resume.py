"""Checkpoint and exact resume (spec section 5) and rank failure, with real processes.

A run stopped (or killed) after a checkpoint and resumed must select exactly the samples of a
run that never stopped, step for step, and end with the same weights. Runs are started as
`es-llm train` / the deepspeed launcher; pairs that do not depend on each other run
concurrently to keep the wall-clock down. OMP_NUM_THREADS=1 everywhere: identical float
reductions in every run, so the comparison can be exact.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
import torch
from conftest import REPO, free_port

from es_llm.drivers.deepspeed.checkpoint import MARKER, find_complete_tag, read_marker
from es_llm.drivers.deepspeed.metrics import read_jsonl

MODEL = str(REPO / "es_llm" / "configs" / "models" / "gpt2-tiny.json")
SCHEDULER = {
    "type": "WarmupCosineLR",
    "params": {"total_num_steps": "auto", "warmup_num_steps": "auto", "cos_min_ratio": 0.1},
}


def _args(cfg: Path, out: Path, *extra: str, samples: int = 128, epochs: int = 2) -> list[str]:
    return [
        "train", "--config", str(cfg), "--out", str(out), "--model", MODEL,
        "--seq-len", "32", "--vocab-size", "512", "--max-train-samples", str(samples),
        "--max-val-samples", "32", "--epochs", str(epochs), "--no-progress", *extra,
    ]  # fmt: skip


def _start(args: list[str], cache: Path, log: Path, ranks: int = 1) -> subprocess.Popen:
    env = {**os.environ, "ES_LLM_CACHE": str(cache), "PYTHONUNBUFFERED": "1",
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    if ranks == 1:
        cmd = [sys.executable, "-m", "es_llm.cli", *args]
    else:
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks),
               "--master_port", str(free_port()), "--module", "es_llm.cli", *args]  # fmt: skip
    fh = log.open("w")
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT)


def _kill_tree(proc: subprocess.Popen) -> None:
    """Kill a process this test started and everything below it (the launcher's ranks)."""
    if proc.poll() is not None:
        return
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        children = []
    for child in children:
        with contextlib.suppress(psutil.Error):
            child.kill()
    proc.kill()
    proc.wait()


def _finish(proc: subprocess.Popen, log: Path, timeout: float = 300) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_tree(proc)
        raise AssertionError(f"timed out:\n{log.read_text()[-4000:]}") from None


def _ok(proc: subprocess.Popen, log: Path) -> None:
    rc = _finish(proc, log)
    assert rc == 0, f"exit {rc}\n{log.read_text()[-5000:]}"


def _steps(out: Path) -> list[dict]:
    return [r for r in read_jsonl(out / "metrics.jsonl") if r["type"] == "step"]


def _weights(out: Path) -> dict[str, torch.Tensor]:
    tag = find_complete_tag(out / "checkpoints")
    path = out / "checkpoints" / tag / "mp_rank_00_model_states.pt"
    return torch.load(path, map_location="cpu", weights_only=False)["module"]


def _assert_same_run(ref: Path, resumed: Path, from_step: int) -> None:
    """Every step after `from_step` selects what the reference selected; same end state."""
    a, b = _steps(ref), _steps(resumed)
    assert [r["step"] for r in b] == [r["step"] for r in a]  # no step lost or repeated
    later = [r["step"] for r in a if r["step"] > from_step]
    assert later, "the resumed run trained no step"
    for ra, rb in zip(a, b, strict=True):
        assert ra["selection_digest"] == rb["selection_digest"], ra["step"]
        assert ra["epoch"] == rb["epoch"] and ra["phase"] == rb["phase"]
        if ra["lr"] is not None:  # the LR schedule continues (DeepSpeed's scheduler state)
            assert rb["lr"] == pytest.approx(ra["lr"], rel=1e-6)
    wa, wb = _weights(ref), _weights(resumed)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k].float(), wa[k].float(), rtol=1e-5, atol=1e-5)
    sa = json.loads((ref / "summary.json").read_text())
    sb = json.loads((resumed / "summary.json").read_text())
    for k in ("steps", "epochs", "bp_samples", "scored_samples", "pruned_sample_epochs"):
        assert sa[k] == sb[k], k
    assert sb["final_val_loss"] == pytest.approx(sa["final_val_loss"], abs=1e-5)


def _stop_then_resume(
    tmp_path: Path,
    cache: Path,
    cfg: Path,
    stop: int,
    extra: tuple[str, ...] = (),
    before_resume: Callable[[Path], None] | None = None,
    **kw,
) -> tuple[Path, Path]:
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    p_ref = _start(_args(cfg, ref, "--save-every", "3", *extra, **kw), cache, tmp_path / "ref.log")
    p_cut = _start(_args(cfg, cut, "--save-every", "3", "--stop-after", str(stop), *extra, **kw),
                   cache, tmp_path / "cut.log")  # fmt: skip
    try:
        _ok(p_ref, tmp_path / "ref.log")
        _ok(p_cut, tmp_path / "cut.log")
    finally:
        _kill_tree(p_ref)
        _kill_tree(p_cut)
    assert [r["step"] for r in _steps(cut)][-1] == stop
    assert find_complete_tag(cut / "checkpoints") == f"global_step{stop}"
    if before_resume is not None:
        before_resume(cut)
    # --resume DIR continues in DIR: the --out given here must not matter
    resume = _args(cfg, tmp_path / "ignored", "--save-every", "3", "--resume", str(cut), *extra,
                   **kw)  # fmt: skip
    _ok(_start(resume, cache, tmp_path / "resume.log"), tmp_path / "resume.log")
    assert not (tmp_path / "ignored").exists()
    return ref, cut


def _reference_source(path: Path) -> Path:
    """A small clean reference set: the first standard-library files, one document each."""
    from es_llm.data.documents import stdlib_files

    texts = [f.read_text(errors="replace") for _, f in stdlib_files(40)]
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


@pytest.mark.multiproc
def test_excess_stop_and_resume_selects_what_an_uninterrupted_run_selects(
    tmp_path, es_cache, tiny_ds_config
):
    # ES on the excess loss: the ES selection plus the reference's per-sample column, which
    # the checkpoint restores; the three runs share one trained reference (cache, lock)
    cfg = tiny_ds_config(scheduler=SCHEDULER, evolved_sampling={"burn_in_steps": 2})
    refdata = str(_reference_source(tmp_path / "clean.jsonl"))
    reference = ("--method", "excess", "--reference-data", refdata, "--reference-steps", "4")
    entry: list[Path] = []

    def drop_the_cached_reference(cut: Path) -> None:
        info = json.loads((cut / "summary.json").read_text())["reference"]
        entry.append(Path(info["cache_entry"]))
        evals = [r for r in read_jsonl(entry[0] / "run" / "metrics.jsonl") if r["type"] == "eval"]
        assert {r["where"] for r in evals} <= {"start", "epoch_end", "stop", "end"}  # no curve
        shutil.rmtree(entry[0])

    ref, cut = _stop_then_resume(
        tmp_path, es_cache, cfg, stop=5, extra=reference, before_resume=drop_the_cached_reference
    )
    _assert_same_run(ref, cut, from_step=5)
    infos = [json.loads((d / "summary.json").read_text())["reference"] for d in (ref, cut)]
    assert infos[0]["cache_entry"] == infos[1]["cache_entry"] == str(entry[0])
    # the resumed run neither trained the reference nor ran its pass again: l_ref and the
    # report came back from the checkpoint (the selections above equal the uninterrupted run's)
    assert infos[1]["restored"] is True and "restored" not in infos[0]
    assert not entry[0].exists()  # with its cache entry gone, a rebuild would have re-made it
    for info in infos:
        assert info["steps"] == 4 and info["train_s"] > 0 and info["pass_s"] > 0
        d = info["disjoint"]
        assert d["documents"] == 40 == d["kept"] + d["dropped_val_group"] + d["dropped_val_text"]
    kinds = [r["type"] for r in read_jsonl(cut / "metrics.jsonl")]
    assert kinds.count("resume") == 1 and kinds.count("step") == len(_steps(ref))

    # truncated ES state files in every tag: an error naming the file, never a fresh start
    # (one damaged tag alone is skipped for an older intact one: test_checkpoint_integrity)
    bad = tmp_path / "bad"
    shutil.copytree(cut, bad)
    (bad / "summary.json").unlink()  # the copied run had finished: now a run killed mid-way
    tag_dir = bad / "checkpoints" / find_complete_tag(bad / "checkpoints")
    state = tag_dir / "es_state_rank0.pt"
    for each in (bad / "checkpoints").glob("global_step*/es_state_rank0.pt"):
        each.write_bytes(each.read_bytes()[:100])
    log = tmp_path / "bad.log"
    rc = _finish(_start(_args(cfg, bad, "--resume", str(bad)), es_cache, log), log)
    assert rc == 2, log.read_text()[-3000:]
    text = log.read_text()
    assert str(state) in text and "truncated" in text and "Traceback" not in text


@pytest.mark.multiproc
def test_proxy_stop_and_resume_selects_what_an_uninterrupted_run_selects(
    tmp_path, es_cache, tiny_ds_config
):
    # scorer proxy: the proxy's weights and optimizer come back from the checkpoint, so the
    # resumed proxy scores (and the run selects) exactly what the uninterrupted one does
    cfg = tiny_ds_config(
        scheduler=SCHEDULER, evolved_sampling={"burn_in_steps": 2, "scorer": "proxy"}
    )

    def another_split_is_refused(cut: Path) -> None:
        # --val-share changes the split: resuming with another one is one line, nothing run
        log = tmp_path / "share.log"
        rc = _finish(_start(_args(cfg, cut, "--resume", str(cut), "--val-share", "0.3"),
                            es_cache, log), log)  # fmt: skip
        text = log.read_text()
        assert rc == 2 and "different run configuration" in text, text[-3000:]
        assert "'val_share': 0.05" in text and "'val_share': 0.3" in text
        assert "Traceback" not in text

    ref, cut = _stop_then_resume(
        tmp_path, es_cache, cfg, stop=5, before_resume=another_split_is_refused
    )
    _assert_same_run(ref, cut, from_step=5)
    for run in (ref, cut):
        s = json.loads((run / "summary.json").read_text())
        proxy, tb = s["proxy"], s["time_breakdown_s"]
        # gpt2-tiny at vocabulary 512, length 32: the default proxy is gpt2-nano, 0.16 of it
        assert proxy["proxy_model"] == "gpt2-nano" and proxy["default"] is True
        assert 0 < proxy["flops_ratio"] <= 0.2 and proxy["updates"] == s["steps"]
        assert tb["proxy_fwd_s"] > 0 and tb["proxy_train_s"] > 0 and tb["score_fwd_s"] == 0
    assert [r["proxy_fwd_s"] > 0 for r in _steps(ref)] == [
        r["phase"] == "select" for r in _steps(ref)
    ]


@pytest.mark.multiproc
def test_eswp_resume_restores_the_epoch_plan_and_replans_the_next_epoch(
    tmp_path, es_cache, tiny_ds_config
):
    cfg = tiny_ds_config(
        scheduler=SCHEDULER, evolved_sampling={"method": "eswp", "burn_in_steps": 2}
    )
    # 3 epochs, delta 0.875: epochs 1 and 2 are pruned. Stop inside epoch 1 (its saved plan
    # must come back: replanning from the scores updated since would differ), then epoch 2 is
    # planned from the restored scores.
    ref, cut = _stop_then_resume(tmp_path, es_cache, cfg, stop=10, epochs=3)
    epochs = {r["step"]: r["epoch"] for r in _steps(ref)}
    assert epochs[10] == 1 and epochs[11] == 1 and max(epochs.values()) == 2
    _assert_same_run(ref, cut, from_step=10)
    assert json.loads((ref / "summary.json").read_text())["pruned_sample_epochs"] > 0
    # the uninterrupted run is finished: --resume says so and changes nothing (before, it
    # rewrote summary.json from the last checkpoint's evaluations, the final one dropped)
    before = {p.name: p.read_bytes() for p in ref.iterdir() if p.is_file()}
    assert json.loads(before["summary.json"])["finished"] is True
    log = tmp_path / "finished.log"
    rc = _finish(_start(_args(cfg, ref, "--resume", str(ref), epochs=3), es_cache, log), log)
    text = log.read_text()
    assert rc == 2, text[-3000:]
    assert f"--resume {ref}: that run is finished" in text and "Traceback" not in text
    assert {p.name: p.read_bytes() for p in ref.iterdir() if p.is_file()} == before


def _rank_process(launcher: subprocess.Popen, rank: int) -> psutil.Process | None:
    for child in psutil.Process(launcher.pid).children(recursive=True):
        try:
            env = child.environ()
            if env.get("RANK") == str(rank) and "es_llm.cli" in " ".join(child.cmdline()):
                return child
        except psutil.Error:
            continue
    return None


def _kill_one_rank_after_a_checkpoint(p_run: subprocess.Popen, run: Path, log: Path) -> None:
    """Wait for a complete checkpoint, then kill -9 rank 1 while the run goes on."""
    deadline = time.monotonic() + 240
    while not (run / "checkpoints" / "latest").is_file():
        assert p_run.poll() is None, f"run ended early:\n{log.read_text()[-4000:]}"
        assert time.monotonic() < deadline, log.read_text()[-4000:]
        time.sleep(0.05)
    victim = _rank_process(p_run, 1)
    assert victim is not None, "rank 1 not found among the launcher's children"
    os.kill(victim.pid, signal.SIGKILL)
    rc = _finish(p_run, log, timeout=90)
    assert rc != 0, "the launcher must report a killed rank"


@pytest.mark.multiproc
def test_two_ranks_killed_rank_then_resume_from_last_complete_checkpoint(
    tmp_path, es_cache, tiny_ds_config
):
    cfg = tiny_ds_config(
        scheduler=SCHEDULER, evolved_sampling={"method": "eswp", "burn_in_steps": 1}
    )
    ref, run = tmp_path / "ref", tmp_path / "run"
    extra = ("--save-every", "4")
    # 256 samples on 2 ranks: 16 steps in epoch 0 (1 burn-in + 248 / 16), a pruned epoch 1
    # after them. The kill comes right after the first checkpoint (step 4), with 20-odd steps
    # still to go: the run cannot have finished first (asserted below), and the resume then
    # crosses the epoch boundary and replans the pruned epoch, as with more data.
    p_ref = _start(_args(cfg, ref, *extra, samples=256), es_cache, tmp_path / "ref.log", ranks=2)
    p_run = _start(_args(cfg, run, *extra, samples=256), es_cache, tmp_path / "run.log", ranks=2)
    try:
        _kill_one_rank_after_a_checkpoint(p_run, run, tmp_path / "run.log")
        _ok(p_ref, tmp_path / "ref.log")
    finally:
        _kill_tree(p_run)
        _kill_tree(p_ref)
    assert len(_steps(run)) < len(_steps(ref)), "the kill came after the run had finished"

    # whatever the kill left behind, resume reads only a complete checkpoint
    root = run / "checkpoints"
    tag = find_complete_tag(root)
    marker = read_marker(root / tag)
    assert marker["world_size"] == 2
    assert set(marker["files"]) == {"es_state_rank0.pt", "es_state_rank1.pt"}
    half = root / "global_step999"  # a save cut short: DeepSpeed's file there, no marker
    half.mkdir(exist_ok=True)
    (half / "mp_rank_00_model_states.pt").write_bytes(b"partial")
    assert find_complete_tag(root) == tag and not (half / MARKER).exists()

    resume_log = tmp_path / "resume.log"
    resume = _args(cfg, run, *extra, "--resume", str(run), samples=256)
    _ok(_start(resume, es_cache, resume_log, ranks=2), resume_log)
    shutil.rmtree(half)
    _assert_same_run(ref, run, from_step=marker["step"])

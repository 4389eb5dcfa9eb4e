"""`es-llm train` end to end as real processes: 1 rank, 2 ranks through the deepspeed launcher,
and what a run leaves behind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import TINY_RUN_ARGS, run_cli
from hf_models import reload_val_loss

from es_llm.drivers.deepspeed.metrics import read_jsonl

STEP_KEYS = {
    "step",
    "epoch",
    "train_loss",
    "lr",
    "scored",
    "selected",
    "wall_clock_s",
    "selection_digest",
}
SUMMARY_KEYS = {
    "method",
    "wall_clock_s",
    "steps",
    "epochs",
    "bp_samples",
    "scored_samples",
    "final_val_loss",
}


def _ok(proc) -> None:
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\nSTDOUT\n{proc.stdout[-3000:]}\nSTDERR\n{proc.stderr[-5000:]}"
    )


def _steps(out: Path) -> list[dict]:
    return [r for r in read_jsonl(out / "metrics.jsonl") if r["type"] == "step"]


# What a default (not --verbose) run must not print: warnings of Python, DeepSpeed or its
# launcher, and DeepSpeed's notice for an op it loaded from the cache.
NOISE = ("Warning", "WARNING", "warnings.warn", "[INFO]", "built successfully")


def assert_quiet(proc, *, launcher_logs: bool = False) -> None:
    """No noise line in the output; `launcher_logs`: the deepspeed launcher was started
    directly (not through launch/*.sh, which quiet it), so its own log lines are allowed."""
    lines = (proc.stdout + proc.stderr).splitlines()
    if launcher_logs:
        lines = [ln for ln in lines if "[runner.py:" not in ln and "[launch.py:" not in ln]
    noisy = [ln for ln in lines if any(n in ln for n in NOISE)]
    assert not noisy, "\n".join(noisy)


def warmup_cosine_lrs(lr: float, total: int, warmup: int, iterations) -> list[float]:
    """DeepSpeed's WarmupCosineLR (log warmup from 0) at the given iterations, computed by
    DeepSpeed itself on a one-parameter optimizer."""
    from deepspeed.runtime.lr_schedules import WarmupCosineLR

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = WarmupCosineLR(opt, total_num_steps=total, warmup_num_steps=warmup)
    out = []
    for it in iterations:
        sched.step(it)
        out.append(opt.param_groups[0]["lr"])
    return out


def _csv(path: Path) -> list[list[str]]:
    import csv

    with path.open() as fh:
        return list(csv.reader(fh))


@pytest.mark.multiproc
def test_single_rank_es_run_leaves_metrics_summary_and_plot(tmp_path, es_cache, tiny_ds_config):
    out = tmp_path / "run"
    # DeepSpeed's own CSV monitor on (no output_path: es-llm routes it to OUT/monitor/), and a
    # warmup from learning rate 0
    sched = {"total_num_steps": "auto", "warmup_num_steps": 4, "warmup_min_ratio": 0.0}
    cfg = tiny_ds_config(
        evolved_sampling={"burn_in_steps": 2},
        csv_monitor={"enabled": True},
        scheduler={"type": "WarmupCosineLR", "params": sched},
    )
    proc = run_cli(
        [
            "train",
            "--config",
            str(cfg),
            "--out",
            str(out),
            "--epochs",
            "1",
            "--max-steps",
            "8",
            *TINY_RUN_ARGS,
        ],
        es_cache,
    )
    _ok(proc)
    steps = _steps(out)
    assert len(steps) == 8
    for r in steps:
        assert r.keys() >= STEP_KEYS
        assert len(r["selection_digest"]) == 40
    # burn-in trains B uniformly without scoring; then each step scores B_meta = 2B
    assert [r["phase"] for r in steps[:3]] == ["burn_in", "burn_in", "select"]
    # step k trains at iteration k of the schedule, and logs the rate it trained at: the first
    # step already learns (DeepSpeed alone trains steps 1 and 2 at iterations -1 and 0, both 0)
    assert [r["lr"] for r in steps] == pytest.approx(warmup_cosine_lrs(3e-3, 8, 4, range(1, 9)))
    assert steps[0]["lr"] > 0
    assert steps[0]["scored"] == 0 and steps[2]["scored"] == 16 and steps[2]["selected"] == 8
    summary = json.loads((out / "summary.json").read_text())
    assert summary.keys() >= SUMMARY_KEYS
    assert summary["method"] == "es" and summary["steps"] == 8
    assert summary["bp_samples"] == 8 * 8
    assert summary["scored_samples"] == 6 * 16
    assert summary["final_val_loss"] < summary["val_history"][0]["val_loss"]
    assert (out / "loss_curve.png").stat().st_size > 1000
    assert "final validation loss" in proc.stdout
    assert_quiet(proc)
    # validation: the start, about ten points (here every step of 8), the end on the whole split
    evals = [r for r in read_jsonl(out / "metrics.jsonl") if r["type"] == "eval"]
    assert [r["step"] for r in evals] == list(range(9))
    assert evals[-1]["set"] == "full" and evals[-1]["where"] == "stop"  # --max-steps
    assert summary["final_val"] == {"step": 8, "where": "stop", "set": "full", "sequences": 32}
    assert summary["data_replacements"] is not None
    from PIL import Image

    title = Image.open(out / "loss_curve.png").text["Title"]
    assert title.startswith("es-llm es · model gpt2-tiny · data stdlib · 256 train / 32 ")
    # the CSV monitor got every step and evaluation, ES's counts and timers included
    csv_dir = out / "monitor" / "es-llm"
    selected = _csv(csv_dir / "Train_ES_selected.csv")
    assert selected[0] == ["step", "selected"]
    assert [(int(s), float(v)) for s, v in selected[1:]] == [(r["step"], 8.0) for r in steps]
    scored = _csv(csv_dir / "Train_ES_scored.csv")
    assert [float(v) for _, v in scored[1:]] == [float(r["scored"]) for r in steps]
    select_s = _csv(csv_dir / "Train_ES_select_s.csv")
    assert len(select_s) == 9 and sum(float(v) for _, v in select_s[1:]) > 0
    losses = _csv(csv_dir / "Train_ES_train_loss.csv")
    assert [float(v) for _, v in losses[1:]] == pytest.approx([r["train_loss"] for r in steps])
    val = _csv(csv_dir / "Eval_val_loss.csv")
    assert [int(s) for s, _ in val[1:]] == list(range(9))
    assert float(val[-1][1]) == pytest.approx(summary["final_val_loss"])
    assert (csv_dir / "Train_Samples_lr.csv").is_file()  # DeepSpeed's own events, same place
    # OUT/model: transformers reloads the weights the final validation loss was measured with
    reloaded = reload_val_loss(out / "model", es_cache, TINY_RUN_ARGS)
    assert reloaded == pytest.approx(summary["final_val_loss"], rel=1e-5)
    _continue_from_export(out / "model", tmp_path, es_cache, cfg)
    # the public seam: examples/deepspeed_loop.py, a user's own loop around the same data
    # path, selects exactly what `es-llm train` selects on the same config and data
    example = _run_example(cfg, es_cache, ["--epochs", "1", "--steps", "8"], tmp_path / "example")
    assert [r["digest"] for r in example] == [r["selection_digest"] for r in steps]
    assert [r["train_loss"] for r in example] == [r["train_loss"] for r in steps]


def _continue_from_export(model: Path, tmp_path: Path, cache: Path, cfg: Path) -> None:
    """Fine-tune continuation: `--model OUT/model` starts from the exported weights, with the
    exported tokenizer (a small text file: the corpus is built again with that tokenizer)."""
    data = tmp_path / "more.txt"
    data.write_text("\n\n".join(f"def f{i}(x):\n    return x * {i} + {i * i}" for i in range(300)))
    out = tmp_path / "continued"
    args = ["--model", str(model), "--data", str(data), "--seq-len", "32", "--vocab-size", "512",
            "--max-val-samples", "16", "--no-progress"]  # fmt: skip
    proc = run_cli(
        ["train", "--config", str(cfg), "--out", str(out), "--max-steps", "2", *args], cache
    )
    _ok(proc)
    summary = json.loads((out / "summary.json").read_text())
    start = summary["val_history"][0]["val_loss"]  # before any step: the exported model's loss
    assert start == pytest.approx(reload_val_loss(model, cache, args), rel=1e-5)
    assert summary["steps"] == 2
    assert reload_val_loss(out / "model", cache, args) == pytest.approx(
        summary["final_val_loss"], rel=1e-5
    )


def _run_example(cfg: Path, cache: Path, extra: list[str], cwd: Path) -> list[dict]:
    """Run examples/deepspeed_loop.py on the tiny run's data, in `cwd` (a user's own loop
    leaves DeepSpeed's monitor files in its working directory); its per-step JSON lines."""
    import os
    import subprocess
    import sys

    from conftest import REPO

    data = ["--seq-len", "32", "--vocab-size", "512", "--max-train-samples", "256"]
    cwd.mkdir(parents=True, exist_ok=True)
    assert all(a in TINY_RUN_ARGS for a in data)  # the data of `es-llm train ... TINY_RUN_ARGS`
    proc = subprocess.run(
        [sys.executable, str(REPO / "examples" / "deepspeed_loop.py"), "--config", str(cfg),
         *data, *extra],
        cwd=cwd, env={**os.environ, "ES_LLM_CACHE": str(cache)}, capture_output=True,
        text=True, timeout=600,
    )  # fmt: skip
    _ok(proc)
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


@pytest.mark.multiproc
def test_config_without_section_is_plain_uniform_training(tmp_path, es_cache, tiny_ds_config):
    out = tmp_path / "run"
    cfg = tiny_ds_config(evolved_sampling=False)
    _ok(
        run_cli(
            ["train", "--config", str(cfg), "--out", str(out), "--max-steps", "3", *TINY_RUN_ARGS],
            es_cache,
        )
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "uniform"
    assert summary["scored_samples"] == 0
    assert all(r["scored"] == 0 for r in _steps(out))


@pytest.mark.multiproc
def test_two_ranks_through_the_deepspeed_launcher(tmp_path, es_cache, tiny_ds_config):
    out = tmp_path / "run2"
    cfg = tiny_ds_config(evolved_sampling={"method": "eswp", "burn_in_steps": 1})
    proc = run_cli(
        [
            "train",
            "--config",
            str(cfg),
            "--out",
            str(out),
            "--epochs",
            "2",
            "--max-steps",
            "20",
            *TINY_RUN_ARGS,
        ],
        es_cache,
        ranks=2,
    )
    _ok(proc)
    assert_quiet(proc, launcher_logs=True)  # no rank warns (the launcher: see test_launch.py)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert summary["batch"]["gradient_accumulation_steps"] == 1  # 8 = 4 x 1 x 2 ranks
    steps = _steps(out)
    assert len(steps) == 20
    assert {r["epoch"] for r in steps} == {0, 1}  # crossed an epoch: pruning planned at epoch 1
    assert summary["pruned_sample_epochs"] > 0
    assert all(r["selected"] == 8 for r in steps)
    # records only (docs/scale.md): a SELECT step all-gathers 8 samples x 24 bytes per rank
    # plus a 24-byte all-reduce (lock-step digest, stop flag); the burn-in step 4 x 16 bytes
    # plus one 16-byte row (stop flag); never token ids
    assert summary["collective_bytes_sent_per_step"] == pytest.approx((19 * 216 + 80) / 20)
    # ZeRO-0 on 2 ranks: rank 0 alone writes OUT/model, the weights every rank holds
    reloaded = reload_val_loss(out / "model", es_cache, TINY_RUN_ARGS)
    assert reloaded == pytest.approx(summary["final_val_loss"], rel=1e-5)


@pytest.mark.multiproc
def test_nan_scoring_losses_are_never_selected_and_training_goes_on(
    tmp_path, es_cache, tiny_ds_config
):
    """Poison the scoring pass for ids divisible by 3 (through the public scorer seam):
    counted, never selected, run finishes."""
    out = tmp_path / "nan"
    cfg = tiny_ds_config(evolved_sampling={"burn_in_steps": 0})
    script = tmp_path / "poisoned.py"
    script.write_text(
        "import sys, torch\n"
        "from es_llm.cli import build_parser\n"
        "from es_llm.cliargs import options_from_args\n"
        "from es_llm.sampling.datapath import ESDataPath\n"
        "from es_llm.drivers.deepspeed.loop import train\n"
        "def poison(inner):\n"
        "    def scorer(tokens, ids):\n"
        "        loss, valid = inner(tokens, ids)\n"
        "        bad = ids % 3 == 0\n"
        "        loss = torch.where(bad, torch.full_like(loss, float('nan')), loss)\n"
        "        return loss, valid & ~bad\n"
        "    return scorer\n"
        "real_select = ESDataPath.select\n"
        "def checked(self, draw, losses, valid):\n"
        "    a = real_select(self, draw, losses, valid)\n"
        "    assert not bool((a.ids % 3 == 0).any()), 'a poisoned sample was selected'\n"
        "    return a\n"
        "ESDataPath.select = checked\n"
        "opts = options_from_args(build_parser().parse_args(sys.argv[1:]))\n"
        "train(opts, wrap_scorer=poison)\n"
    )
    import os
    import subprocess
    import sys

    proc = subprocess.run(
        [
            sys.executable,
            str(script),
            "train",
            "--config",
            str(cfg),
            "--out",
            str(out),
            "--max-steps",
            "6",
            *TINY_RUN_ARGS,
        ],
        env={**os.environ, "ES_LLM_CACHE": str(es_cache)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    _ok(proc)
    steps = _steps(out)
    assert len(steps) == 6
    assert sum(r["invalid"] for r in steps) > 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["invalid_samples"] == sum(r["invalid"] for r in steps)
    assert all(r["train_loss"] == r["train_loss"] for r in steps)  # no NaN reached training


def test_selected_ids_exclude_invalid(tmp_path):
    """Unit-level companion of the NaN test: the digest of a selection never covers NaN ids."""
    import torch

    from es_llm.dist import Communicator
    from es_llm.sampling.config import EvolvedSamplingConfig
    from es_llm.sampling.global_selection import select_global
    from es_llm.sampling.scores import ScoreTable

    cfg = EvolvedSamplingConfig(method="es", selection_ratio=0.5)
    table = ScoreTable(16, offset=0, s_init=1 / 16)
    ids = torch.arange(16, dtype=torch.int64)
    losses = torch.linspace(1, 4, 16)
    losses[ids % 3 == 0] = float("nan")
    valid = torch.isfinite(losses)
    gs = select_global(
        cfg,
        table,
        comm=Communicator(),
        step=3,
        seed=0,
        ids=ids,
        losses=losses,
        valid=valid,
        prune_weights=torch.ones(16),
        k=8,
    )
    assert not bool((gs.selected_ids % 3 == 0).any())
    assert torch.equal(gs.selected_ids, gs.gathered.ids[gs.selection.positions])
    before = table.gather(ids[~valid])
    assert torch.equal(before, torch.full_like(before, 1 / 16))  # NaN never updated a score

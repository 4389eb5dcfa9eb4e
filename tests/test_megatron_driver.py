"""The Megatron-core driver (`es-llm train --engine megatron`) with real gloo processes.

Every rank is a real process with its own gloo process group, forked by
tests/megatron_launch.py after it applied the test-only CPU shim (tests/megatron_shim.py) and
imported the libraries once; each rank then calls `es-llm` as under torchrun. Checked:

* tensor parallelism changes nothing ES decides: TP=2 x DP=2 selects exactly the ids
  TP=1 x DP=2 selects, with training losses equal to float tolerance;
* the data path's collectives span the data-parallel group only (its ranks are recorded);
* a run stopped and resumed from its checkpoint ends exactly where an uninterrupted one does;
* the exported Hugging Face directory computes what the Megatron model computed (logits at
  TP=1; the final validation loss of a TP=2 run, reloaded by transformers);
* examples/megatron_loop.py, a user's own loop, selects what `es-llm train` selects;
* bad input is one line naming the flag or field, before any process group exists.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, free_port
from hf_models import reload_val_loss

MULTIPROC = pytest.mark.multiproc  # the tests that start rank processes

LAUNCH = REPO / "tests" / "megatron_launch.py"
DATA = ["--model", "gpt2-tiny", "--seq-len", "32", "--vocab-size", "512",
        "--max-train-samples", "256", "--max-val-samples", "32", "--no-progress"]  # fmt: skip
CONFIG = {
    "train_batch_size": 8,
    "train_micro_batch_size_per_gpu": 4,
    "gradient_clipping": 1.0,
    "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "weight_decay": 0.01}},
    "scheduler": {
        "type": "WarmupCosineLR",
        "params": {"total_num_steps": "auto", "warmup_num_steps": 2, "cos_min_ratio": 0.1},
    },
    "evolved_sampling": {"method": "es", "selection_ratio": 0.5, "burn_in_steps": 1},
}
LLAMA = [x if x != "gpt2-tiny" else "llama-tiny" for x in DATA]  # GQA, SwiGLU, untied
STEPS = ["--epochs", "1", "--max-steps", "6"]


def _launch(ranks: int, args: list[str], cache: Path, timeout: int = 300, torchrun=False):
    """`ranks` real gloo processes of tests/megatron_launch.py: forked after the imports, or
    started by torchrun (as the docs launch the driver; slower: each rank imports all)."""
    cmd = [sys.executable, str(LAUNCH), "--nproc", str(ranks), *args]
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
               "--master_port", str(free_port()), str(LAUNCH), *args]  # fmt: skip
    env = {**os.environ, "ES_LLM_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def _train(ranks: int, tp: int, out: Path, cfg: Path, cache: Path, *extra: str,
           data: list[str] = DATA, torchrun: bool = False) -> Path:  # fmt: skip
    _launch(ranks, ["train", "--engine", "megatron", "--tensor-parallel-size", str(tp),
                      "--config", str(cfg), *data, *STEPS, *extra, *(
                          [] if "--resume" in extra else ["--out", str(out)])], cache,
            torchrun=torchrun)  # fmt: skip
    return out


def _steps(out: Path) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["type"] == "step"]


def _summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def _config(folder: Path, **changes) -> Path:
    cfg = {**json.loads(json.dumps(CONFIG)), **changes}
    path = folder / "megatron.json"
    path.write_text(json.dumps({k: v for k, v in cfg.items() if v is not None}))
    return path


@pytest.fixture(scope="module")
def dp1_runs(tmp_path_factory, es_cache):
    """TP=2 uninterrupted, TP=2 stopped after step 3 and resumed: at DP=1."""
    root = tmp_path_factory.mktemp("megatron_dp1")
    cfg = _config(root)
    tp2 = _train(2, 2, root / "tp2", cfg, es_cache, "--save-every", "3")
    resumed = _train(2, 2, root / "resumed", cfg, es_cache, "--save-every", "3",
                     "--stop-after", "3")  # fmt: skip
    assert _summary(resumed)["steps"] == 3
    _train(2, 2, resumed, cfg, es_cache, "--save-every", "3", "--resume", str(resumed))
    return {"tp2": tp2, "resumed": resumed}


@pytest.fixture(scope="module")
def dp2_runs(tmp_path_factory, es_cache):
    """At DP=2 (no LR schedule), a Llama preset: TP=2 on 4 processes, TP=1 on 2 (started
    by torchrun), and the example loop."""
    root = tmp_path_factory.mktemp("megatron_dp2")
    cfg = _config(root, scheduler=None)
    tp2 = _train(4, 2, root / "tp2", cfg, es_cache, data=LLAMA)
    tp1 = _train(2, 1, root / "tp1", cfg, es_cache, data=LLAMA, torchrun=True)
    example = _launch(2, ["--example", "--config", str(cfg), "--model", "llama-tiny",
                          "--seq-len", "32", "--vocab-size", "512", "--max-train-samples",
                          "256", "--epochs", "1", "--steps", "6"], es_cache)  # fmt: skip
    lines = [json.loads(x) for x in example.stdout.splitlines() if x.startswith("{")]
    return {"tp2": tp2, "tp1": tp1, "example": lines}


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("megatron_export")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "megatron_export_check.py"),
                           str(out)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


def _same_training(a: Path, b: Path) -> None:
    sa, sb = _steps(a), _steps(b)
    assert [r["step"] for r in sa] == list(range(1, 7))
    assert [r["selection_digest"] for r in sa] == [r["selection_digest"] for r in sb]
    assert [r["phase"] for r in sa] == [r["phase"] for r in sb]
    assert [r["train_loss"] for r in sa] == pytest.approx([r["train_loss"] for r in sb], abs=1e-4)
    assert _summary(a)["final_val_loss"] == pytest.approx(_summary(b)["final_val_loss"], abs=1e-4)


@MULTIPROC
def test_stopped_and_resumed_run_ends_where_an_uninterrupted_one_does(dp1_runs):
    full, resumed = dp1_runs["tp2"], dp1_runs["resumed"]
    sf, sr = _steps(full), _steps(resumed)
    assert [r["selection_digest"] for r in sf] == [r["selection_digest"] for r in sr]
    assert [r["train_loss"] for r in sf] == [r["train_loss"] for r in sr]  # exact
    assert [r["lr"] for r in sf] == [r["lr"] for r in sr]
    assert {r["phase"] for r in sf} == {"burn_in", "select"}
    assert _summary(full)["scored_samples"] > 0
    lrs = [r["lr"] for r in sf]
    assert lrs[0] > 0 and lrs[1] == pytest.approx(3e-3) and lrs[-1] < lrs[1]  # warmup, cosine
    assert _summary(full)["final_val_loss"] == _summary(resumed)["final_val_loss"]
    tag = resumed / "checkpoints" / "global_step3"
    marker = json.loads((tag / "es_complete.json").read_text())
    assert sorted(marker["files"]) == ["es_state_rank0.pt", "es_state_rank1.pt"]
    assert sorted(marker["engine_files"]) == [
        "megatron_tp00_model_states.pt", "megatron_tp01_model_states.pt"]  # fmt: skip
    assert (resumed / "checkpoints" / "latest").read_text().strip() == "global_step6"


@MULTIPROC
def test_tp2_export_reloads_with_transformers_at_the_runs_validation_loss(dp1_runs, es_cache):
    out = dp1_runs["tp2"]
    summary = _summary(out)
    assert summary["export"]["model_dir"] == str(out / "model")
    assert reload_val_loss(out / "model", es_cache, DATA) == pytest.approx(
        summary["final_val_loss"], rel=1e-4
    )


@MULTIPROC
def test_from_the_same_pretrained_model_megatron_trains_what_deepspeed_trains(
    dp1_runs, es_cache, tmp_path
):
    """Both engines fine-tune the TP=2 run's exported model on the same data and config
    (constant lr, no weight decay): Megatron at TP=2 and DeepSpeed on one rank (both DP=1)
    select the same samples at every step, with the same training and validation losses."""
    from conftest import StartedCli

    cfg = tmp_path / "eq.json"
    cfg.write_text(json.dumps({
        **{k: CONFIG[k] for k in ("train_batch_size", "train_micro_batch_size_per_gpu",
                                  "gradient_clipping", "evolved_sampling")},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.0,
                                                  "torch_adam": True}},
        "zero_optimization": {"stage": 0}, "steps_per_print": 10**6,
    }))  # fmt: skip
    model = str(dp1_runs["tp2"] / "model")  # its own tokenizer: no --vocab-size
    data = tmp_path / "more.txt"  # small: the corpus is tokenized anew with that tokenizer
    data.write_text("\n\n".join(f"def f{i}(x):\n    return x * {i} + {i * i}"
                                  for i in range(1500)))  # fmt: skip
    args = ["--config", str(cfg), "--model", model, "--data", str(data), "--seq-len", "32",
            "--max-train-samples", "256", "--max-val-samples", "32", "--no-progress",
            *STEPS]  # fmt: skip
    ds = tmp_path / "deepspeed"  # beside the Megatron ranks: its start-up overlaps theirs
    deepspeed = StartedCli(["train", *args, "--out", str(ds)], es_cache, tmp_path / "ds-logs")
    mg = tmp_path / "megatron"
    try:
        _launch(2, ["train", "--engine", "megatron", "--tensor-parallel-size", "2", *args,
                    "--out", str(mg)], es_cache)  # fmt: skip
    finally:
        proc = deepspeed.result()
    assert proc.returncode == 0, proc.stderr[-4000:]
    _same_training(mg, ds)  # step 1 included: the import starts from the exported weights
    assert [r["val_loss"] for r in _summary(mg)["val_history"]] == pytest.approx(
        [r["val_loss"] for r in _summary(ds)["val_history"]], abs=1e-4
    )


@MULTIPROC
@pytest.mark.parametrize("preset", ["gpt2-tiny", "llama-tiny"])
def test_export_logits_equal_the_megatron_models(preset, exported):
    """At TP=1 with random weights: transformers' model of the export computes the Megatron
    model's logits (tests/megatron_export_check.py wrote both)."""
    from transformers import AutoModelForCausalLM

    want = torch.load(exported / preset / "logits.pt", weights_only=True)
    model = AutoModelForCausalLM.from_pretrained(exported / preset / "model", dtype=torch.float32)
    assert type(model).__name__ == {"gpt2-tiny": "GPT2LMHeadModel",
                                    "llama-tiny": "LlamaForCausalLM"}[preset]  # fmt: skip
    with torch.no_grad():
        got = model.eval()(input_ids=want["tokens"]).logits.float()
    assert got.shape == want["logits"].shape == (3, 31, 256)
    assert want["logits"].abs().max() > 1.0  # random weights: logits far from zero
    assert (got - want["logits"]).abs().max() < 1e-4


@MULTIPROC
def test_tp2_dp2_selects_what_tp1_dp2_selects_over_the_dp_group_only(dp2_runs):
    tp2, tp1 = _summary(dp2_runs["tp2"]), _summary(dp2_runs["tp1"])
    assert (tp2["world_size"], tp2["tensor_parallel_size"], tp2["data_parallel_size"]) == (4, 2, 2)
    # rank 0's data path gathers from its DP peer (rank 2), not from its TP peer (rank 1)
    assert tp2["es_group_ranks"] == [0, 2]
    assert tp1["es_group_ranks"] == [0, 1]
    _same_training(dp2_runs["tp2"], dp2_runs["tp1"])


@MULTIPROC
def test_tp2_llama_export_reloads_with_transformers_at_the_runs_validation_loss(dp2_runs, es_cache):
    out = dp2_runs["tp2"]
    summary = _summary(out)
    assert summary["export"]["format"] == "transformers LlamaForCausalLM"
    assert reload_val_loss(out / "model", es_cache, LLAMA) == pytest.approx(
        summary["final_val_loss"], rel=1e-4
    )


@MULTIPROC
def test_example_loop_selects_what_es_llm_train_selects(dp2_runs):
    steps = _steps(dp2_runs["tp1"])
    example = dp2_runs["example"]
    assert [r["digest"] for r in example] == [r["selection_digest"] for r in steps]
    assert [r["train_loss"] for r in example] == pytest.approx(
        [r["train_loss"] for r in steps], abs=1e-6
    )


# ---------------------------------------------------------------- bad input: one line each
def _bad(argv: list[str], world: int, monkeypatch, capsys) -> str:
    from es_llm.cli import main

    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("RANK", "0")
    code = main(["train", "--engine", "megatron", *DATA, *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert not torch.distributed.is_initialized()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    return err


@pytest.mark.parametrize(
    ("argv", "world", "names"),
    [
        (["--tensor-parallel-size", "2"], 3, "--tensor-parallel-size 2"),
        (["--pipeline-parallel-size", "2"], 2, "--pipeline-parallel-size 2"),
        (["--tensor-parallel-size", "3"], 3, "attention heads"),
        (["--tensor-parallel-size", "2", "--vocab-size", "511"], 2, "vocabulary of 511"),
        (["--method", "excess"], 1, "evolved_sampling.method 'excess'"),
        (["--model", "llama-tiny", "--tensor-parallel-size", "4"], 4, "2 key/value heads"),
        (["--model", "base:gpt2-tiny"], 1, "built by the DeepSpeed engine"),
    ],
)
def test_bad_input_is_one_line_before_any_process_group(
    argv, world, names, tmp_path, monkeypatch, capsys
):
    err = _bad([*argv, "--out", str(tmp_path / "o")], world, monkeypatch, capsys)
    assert names in err
    assert not (tmp_path / "o").exists()


def test_config_megatron_section_sets_the_sizes_and_is_checked(tmp_path, monkeypatch, capsys):
    cfg = _config(tmp_path, megatron={"tensor_parallel_size": 2, "pipeline_parallel_size": 1})
    err = _bad(["--config", str(cfg), "--out", str(tmp_path / "o")], 3, monkeypatch, capsys)
    assert "--tensor-parallel-size 2" in err  # from the section: 2 does not divide 3 ranks
    cfg = _config(tmp_path, megatron={"tensor_parallel": 2})
    err = _bad(["--config", str(cfg), "--out", str(tmp_path / "o")], 1, monkeypatch, capsys)
    assert "megatron.tensor_parallel" in err


def test_parallel_sizes_without_engine_megatron_are_refused(tmp_path, monkeypatch, capsys):
    from es_llm.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    code = main(["train", *DATA, "--tensor-parallel-size", "2", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err == (
        "es-llm: error: --tensor-parallel-size needs --engine megatron (DeepSpeed trains "
        "data-parallel)"
    )


def test_a_scorer_other_than_the_learner_or_stale_is_refused():
    from es_llm.drivers.megatron.checks import check_es_fields
    from es_llm.errors import InputError
    from es_llm.sampling.config import EvolvedSamplingConfig

    check_es_fields(EvolvedSamplingConfig(method="es", scorer="stale"))
    proxy = EvolvedSamplingConfig(method="es", scorer="proxy")
    with pytest.raises(InputError, match="evolved_sampling.scorer 'proxy'"):
        check_es_fields(proxy)


def test_engine_megatron_without_megatron_core_is_one_line(tmp_path):
    """A `megatron` package without `core` shadows the installed one: as if not installed."""
    (tmp_path / "shadow" / "megatron").mkdir(parents=True)
    (tmp_path / "shadow" / "megatron" / "__init__.py").write_text("")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "shadow")}
    proc = subprocess.run([sys.executable, "-m", "es_llm.cli", "train", "--engine", "megatron",
                           *DATA, "--out", str(tmp_path / "o")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "es-llm: error: the Megatron-core driver needs megatron-core, which is not installed: "
        'pip install -c constraints.txt -e ".[megatron]"'
    ]


def test_the_cpu_shim_stays_in_tests():
    package = REPO / "es_llm"
    users = [p for p in package.rglob("*.py") if "megatron_shim" in p.read_text()]
    assert users == []


@MULTIPROC
def test_a_signal_to_one_tensor_parallel_rank_stops_both_at_the_same_step(tmp_path, es_cache):
    """SIGTERM to rank 1 only (TP=2, DP=1: each rank is its own DP group, so only the TP
    lock-step all-reduce can tell rank 0): both stop after the same step, the checkpoint of
    that step is written, and --resume would continue from it."""
    import signal
    import time

    import psutil

    out = tmp_path / "run"
    cfg = _config(tmp_path, scheduler=None)
    cmd = [sys.executable, str(LAUNCH), "--nproc", "2", "train", "--engine", "megatron",
           "--tensor-parallel-size", "2", "--config", str(cfg), *DATA, "--epochs", "50",
           "--max-steps", "400", "--out", str(out)]  # fmt: skip
    pids = tmp_path / "pids"
    env = {**os.environ, "ES_LLM_CACHE": str(es_cache), "OMP_NUM_THREADS": "1",
           "MEGATRON_LAUNCH_PIDS": str(pids)}  # fmt: skip
    logs = (tmp_path / "stdout.txt").open("w"), (tmp_path / "stderr.txt").open("w")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=logs[0], stderr=logs[1])
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            metrics = out / "metrics.jsonl"
            if metrics.is_file() and '"type": "step"' in metrics.read_text():
                break
            time.sleep(0.05)
        rank1 = int(pids.read_text().split()[1])
        assert rank1 in [c.pid for c in psutil.Process(proc.pid).children()]
        os.kill(rank1, signal.SIGTERM)
        rc = proc.wait(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
        for fh in logs:
            fh.close()
    err = (tmp_path / "stderr.txt").read_text()
    assert rc in (128 + signal.SIGTERM, 128 + signal.SIGINT), err[-4000:]
    summary = _summary(out)
    step = summary["steps"]
    assert 1 <= step < 400 and summary["stopped"]["step"] == step
    assert [r["step"] for r in _steps(out)] == list(range(1, step + 1))
    tag = out / "checkpoints" / f"global_step{step}"
    marker = json.loads((tag / "es_complete.json").read_text())
    assert marker["step"] == step and len(marker["engine_files"]) == 2  # both TP ranks saved
    # rank 0 (which prints) was not signalled: it learnt of the stop from its TP peer
    assert f"stopped by a signal on another rank after step {step} " in err
    assert f"--resume {out}" in err

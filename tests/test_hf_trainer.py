"""es_llm.drivers.hf.ESTrainer against the native loop: same seed, data, model init and DeepSpeed
config -> the same selection (sha1 digest of the selected global ids) at every step.

Both sides run as real processes (torchrun for the Trainer, es-llm train / the deepspeed
launcher natively). The HF config has "auto" batch fields filled by the Trainer from
per_device_train_batch_size=2, gradient_accumulation_steps=2, so the comparison also covers
"auto" and gradient accumulation (2 micro-batches per rank per step)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, StartedCli, free_port, run_cli, write_instruct_jsonl

from es_llm.drivers.deepspeed.metrics import read_jsonl

HF_CONFIG = REPO / "es_llm" / "configs" / "ds" / "cpu_test_hf.json"
DATA_ARGS = ["--seq-len", "32", "--vocab-size", "512", "--max-val-samples", "32"]
THREADS = {"OMP_NUM_THREADS": "1"}  # two ranks on two shared cores


def _ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\nSTDOUT\n{proc.stdout[-3000:]}\nSTDERR\n{proc.stderr[-5000:]}"
    )


def _run_hf(out: Path, cache: Path, ranks: int, config: Path, *extra: str) -> list[dict]:
    env = {**os.environ, "ES_LLM_CACHE": str(cache), **THREADS}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(ranks),
        "--master_port",
        str(free_port()),
        str(REPO / "tests" / "hf_train_script.py"),
        "--config",
        str(config),
        "--out",
        str(out),
        *extra,
    ]
    _ok(subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600))
    return read_jsonl(out / "es_metrics.jsonl")


def _run_native(out: Path, cache: Path, ranks: int, config: Path, *extra: str) -> list[dict]:
    proc = run_cli(
        ["train", "--config", str(config), "--out", str(out), *DATA_ARGS, "--no-progress", *extra],
        cache,
        ranks=ranks,
        env=THREADS,
    )
    _ok(proc)
    return [r for r in read_jsonl(out / "metrics.jsonl") if r["type"] == "step"]


@pytest.fixture
def native_beside(es_cache):
    """Start the native run of a 1-rank comparison in the background: one single-threaded
    process, it trains on the second core while the test runs the Trainer side (the runs are
    independent). Returns a function that waits for it and gives its steps, as _run_native.
    Whatever is still running at the end of the test is killed."""
    started: list[StartedCli] = []

    def start(out: Path, config: Path, *extra: str):
        args = ["train", "--config", str(config), "--out", str(out), *DATA_ARGS, "--no-progress",
                *extra]  # fmt: skip
        s = StartedCli(args, es_cache, out.parent / f"{out.name}_logs", env=THREADS)
        started.append(s)

        def steps() -> list[dict]:
            _ok(s.result())
            return [r for r in read_jsonl(out / "metrics.jsonl") if r["type"] == "step"]

        return steps

    yield start
    for s in started:
        s.kill()


def _key(r: dict) -> tuple:
    return (r["step"], r["epoch"], r["phase"], r["scored"], r["selected"], r["selection_digest"])


@pytest.fixture(scope="module")
def hf_six_steps(tmp_path_factory, es_cache):
    """The uninterrupted 6-step Trainer run with HF_CONFIG, once per world size: the native-loop
    comparison and the resume test both compare against this very run (the same command line
    either test started on its own before), so it is trained once per module, not twice."""
    runs: dict[int, list[dict]] = {}

    def get(ranks: int) -> tuple[Path, list[dict]]:
        out = tmp_path_factory.getbasetemp() / f"hf_six_steps_{ranks}"
        if ranks not in runs:
            runs[ranks] = _run_hf(out, es_cache, ranks, HF_CONFIG, "--max-steps", "6")
        return out, runs[ranks]

    return get


@pytest.mark.multiproc
@pytest.mark.parametrize("ranks", [1, 2])
def test_trainer_selects_what_the_native_loop_selects(
    tmp_path, es_cache, hf_six_steps, native_beside, ranks
):
    before = HF_CONFIG.read_text()
    native_args = ("--max-train-samples", "256", "--max-steps", "6")
    if ranks == 1:  # beside the Trainer run (a 2-rank run takes both cores: one after the other)
        native_steps = native_beside(tmp_path / "native", HF_CONFIG, *native_args)
        hf_out, hf = hf_six_steps(ranks)
        native = native_steps()
    else:
        hf_out, hf = hf_six_steps(ranks)
        native = _run_native(tmp_path / "native", es_cache, ranks, HF_CONFIG, *native_args)
    # (hf_train_script.py also checks, in every run, that the config file was left as it was)
    assert HF_CONFIG.read_text() == before  # the section was stripped from HF's copy only
    assert [r["phase"] for r in hf] == ["burn_in"] + ["select"] * 5
    assert hf[1]["scored"] == 8 * ranks and hf[1]["selected"] == 4 * ranks
    assert [_key(r) for r in hf] == [_key(r) for r in native]
    # scoring losses are bitwise equal too: the same model state at every step
    assert [r["meta_loss"] for r in hf] == [r["meta_loss"] for r in native]
    summary = json.loads((hf_out / "summary.json").read_text())
    assert summary["global_step"] == 6 and summary["world_size"] == ranks
    if ranks == 2:
        # ZeRO-3 through the Trainer: partitioned parameters, gathered by the scoring forward
        cfg = json.loads(HF_CONFIG.read_text())
        cfg["zero_optimization"] = {"stage": 3, "stage3_param_persistence_threshold": 0}
        path = tmp_path / "zero3.json"
        path.write_text(json.dumps(cfg))
        z3 = _run_hf(tmp_path / "hf_zero3", es_cache, ranks, path, "--max-steps", "6")
        assert [_key(r) for r in z3] == [_key(r) for r in native]


@pytest.mark.multiproc
@pytest.mark.parametrize("scorer", ["proxy", "stale"])
def test_trainer_with_a_cheap_scorer_selects_what_the_native_loop_selects(
    tmp_path, es_cache, native_beside, scorer
):
    """scorer proxy and stale through ESTrainer: the same proxy (chosen, seeded and learning
    alike), or the same stored losses, weigh the same meta-batches as in the native loop, so
    both select the same samples."""
    cfg = json.loads(HF_CONFIG.read_text())
    # stale's default burn-in is a whole epoch: one step here, as the other runs have; its
    # uniform share must fill at least one of the B = 4 places
    cfg["evolved_sampling"].update(scorer=scorer, burn_in_steps=1)
    if scorer == "stale":
        cfg["evolved_sampling"]["epsilon"] = 0.25
    path = tmp_path / f"{scorer}.json"
    path.write_text(json.dumps(cfg))
    args = ("--max-train-samples", "256", "--max-steps", "6")
    native_steps = native_beside(tmp_path / "native", path, *args)
    hf = _run_hf(tmp_path / "hf", es_cache, 1, path, "--max-steps", "6")
    native = native_steps()
    assert [r["phase"] for r in hf] == ["burn_in"] + ["select"] * 5
    assert [_key(r) for r in hf] == [_key(r) for r in native]
    assert [r["meta_loss"] for r in hf] == [r["meta_loss"] for r in native]
    proxy = json.loads((tmp_path / "native" / "summary.json").read_text())["proxy"]
    if scorer == "proxy":
        assert proxy["proxy_model"] == "gpt2-nano" and proxy["updates"] == 6
    else:
        assert proxy is None


@pytest.mark.multiproc
def test_trainer_eswp_across_epochs_matches_native(tmp_path, es_cache, native_beside):
    """ESWP over 2 epochs on instruction data, the Trainer side through TRL's SFTTrainer
    (`ESSFTTrainer`) fed the rows as TRL users have them (no padding, varying length, labels,
    attention_mask): padded back to fixed rows, the pruned second epoch, its rescale weights
    and the epoch boundary inside the stream follow the native loop step for step."""
    cfg = json.loads(HF_CONFIG.read_text())
    cfg["evolved_sampling"]["method"] = "eswp"
    path = tmp_path / "eswp.json"
    path.write_text(json.dumps(cfg))
    data = ["--data", str(write_instruct_jsonl(tmp_path / "instruct.jsonl"))]
    native_steps = native_beside(
        tmp_path / "native", path, "--epochs", "2", "--max-train-samples", "64", *data
    )  # beside the Trainer run
    hf_out = tmp_path / "hf"
    hf = _run_hf(hf_out, es_cache, 1, path, "--epochs", "2", "--max-train-samples", "64", *data,
                 "--trl")  # fmt: skip
    native = native_steps()
    # Both drive the same data path, which stops at the planned step count (14 here) or when
    # the pruned epochs run out. Every step the Trainer ran is the native one.
    assert len(hf) >= 12 and len(native) >= len(hf)
    assert {r["epoch"] for r in hf} == {0, 1}
    assert [_key(r) for r in hf] == [_key(r) for r in native[: len(hf)]]
    assert [r["meta_loss"] for r in hf] == [r["meta_loss"] for r in native[: len(hf)]]
    # the SFT run selected (half of each scored meta-batch) and trained
    assert any(r["phase"] == "select" and r["selected"] < r["scored"] for r in hf)
    summary = json.loads((hf_out / "summary.json").read_text())
    assert summary["global_step"] == len(hf) and math.isfinite(summary["train_loss"])
    native_summary = json.loads((tmp_path / "native" / "summary.json").read_text())
    report = native_summary["data_composition"]["instruct"]
    assert report["records"] == 300 and report["truncated_completions"] == 75


@pytest.mark.multiproc
@pytest.mark.parametrize("ranks", [1, 2])
def test_trainer_resumes_from_its_checkpoint_and_selects_what_an_uninterrupted_run_selects(
    tmp_path, es_cache, hf_six_steps, ranks
):
    """Stop after step 3 (observed: the Trainer's own step counter), resume from the Trainer
    checkpoint with resume_from_checkpoint: every step selects what the uninterrupted run
    selects, with bitwise-equal scoring losses (same weights, same scores, same position)."""
    _, ref = hf_six_steps(ranks)
    assert [r["step"] for r in ref] == [1, 2, 3, 4, 5, 6]
    cut_dir = tmp_path / "cut"
    cut = _run_hf(cut_dir, es_cache, ranks, HF_CONFIG, "--max-steps", "6", "--save-steps", "3",
                  "--stop-after", "3")  # fmt: skip
    assert [r["step"] for r in cut] == [1, 2, 3]
    ckpt = cut_dir / "checkpoint-3"
    assert sorted(p.name for p in ckpt.glob("es_state_rank*.pt")) == [
        f"es_state_rank{r}.pt" for r in range(ranks)
    ]
    resumed = _run_hf(cut_dir, es_cache, ranks, HF_CONFIG, "--max-steps", "6", "--resume",
                      str(ckpt))  # fmt: skip
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]  # no step lost or repeated
    assert [_key(r) for r in resumed] == [_key(r) for r in ref]
    assert [r["meta_loss"] for r in resumed] == [r["meta_loss"] for r in ref]

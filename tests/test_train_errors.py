"""Bad input gets one clear line on stderr and exit status 2, never a traceback."""

from __future__ import annotations

import json

import pytest
from conftest import TINY_RUN_ARGS, run_cli

from es_llm.drivers.deepspeed.dsconfig import deepspeed_config, es_config_for_run
from es_llm.sampling.geometry import BatchConfigError, resolve_geometry


def _fails_cleanly(proc, *fragments: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for f in fragments:
        assert f in proc.stderr, (f, proc.stderr[-3000:])


def test_unknown_method_flag(tmp_path, es_cache):
    proc = run_cli(["train", "--method", "greedy", "--out", str(tmp_path)], es_cache)
    _fails_cleanly(proc, "invalid choice: 'greedy'")


def test_unknown_method_in_config(tmp_path, es_cache, tiny_ds_config):
    cfg = tiny_ds_config(evolved_sampling={"method": "greedy"})
    proc = run_cli(
        ["train", "--config", str(cfg), "--out", str(tmp_path), *TINY_RUN_ARGS], es_cache
    )
    _fails_cleanly(proc, "evolved_sampling.method")


@pytest.mark.parametrize("ratio", [0.0, 1.5, -0.2])
def test_selection_ratio_outside_unit_interval(tmp_path, es_cache, ratio):
    proc = run_cli(
        ["train", "--es", f"selection_ratio={ratio}", "--out", str(tmp_path), *TINY_RUN_ARGS],
        es_cache,
    )
    _fails_cleanly(proc, "selection_ratio", "(0, 1]")


def test_batch_that_does_not_divide_into_micro_batches(tmp_path, es_cache, tiny_ds_config):
    cfg = tiny_ds_config(train_batch_size=10)
    proc = run_cli(
        ["train", "--config", str(cfg), "--out", str(tmp_path), *TINY_RUN_ARGS], es_cache
    )
    _fails_cleanly(proc, "train_batch_size 10", "train_micro_batch_size_per_gpu 4")


def test_meta_batch_that_is_not_whole(tmp_path, es_cache, tiny_ds_config):
    cfg = tiny_ds_config(evolved_sampling={"selection_ratio": 0.3})
    proc = run_cli(
        ["train", "--config", str(cfg), "--out", str(tmp_path), *TINY_RUN_ARGS], es_cache
    )
    _fails_cleanly(proc, "selection_ratio 0.3", "not")


def test_empty_dataset(tmp_path, es_cache):
    data = tmp_path / "empty.jsonl"
    data.write_text(json.dumps({"text": ""}) + "\n" + json.dumps({"text": "   "}) + "\n")
    proc = run_cli(
        ["train", "--data", str(data), "--out", str(tmp_path / "o"), "--no-progress"], es_cache
    )
    _fails_cleanly(proc, str(data))


def test_documents_shorter_than_the_sequence_length(tmp_path, es_cache):
    data = tmp_path / "short"
    data.mkdir()
    for i in range(30):
        (data / f"d{i}.txt").write_text(f"tiny document number {i}")
    proc = run_cli(
        [
            "train",
            "--data",
            str(data),
            "--seq-len",
            "4096",
            "--out",
            str(tmp_path / "o"),
            "--no-progress",
        ],
        es_cache,
    )
    _fails_cleanly(proc, "seq_len")


def test_too_little_data_for_one_meta_batch(tmp_path, es_cache, tiny_ds_config):
    cfg = tiny_ds_config(train_batch_size=64, train_micro_batch_size_per_gpu=8)
    args = [a if a != "256" else "100" for a in TINY_RUN_ARGS]  # --max-train-samples 100
    out = tmp_path / "out"  # tmp_path holds the config: a non-empty --out is refused first
    proc = run_cli(["train", "--config", str(cfg), "--out", str(out), *args], es_cache)
    _fails_cleanly(proc, "fewer than one meta-batch of 128")


def test_missing_config_file(tmp_path, es_cache):
    proc = run_cli(
        ["train", "--config", str(tmp_path / "nope.json"), "--out", str(tmp_path)], es_cache
    )
    _fails_cleanly(proc, "nope.json")


# ---- the same rules, as pure functions -------------------------------------------------------


def test_geometry_derives_gradient_accumulation_per_world_size():
    cfg = {"train_batch_size": 32, "train_micro_batch_size_per_gpu": 4}
    g1 = resolve_geometry(cfg, 1, 0.5)
    g4 = resolve_geometry(cfg, 4, 0.5)
    assert (g1.grad_accum, g1.meta_batch, g1.meta_per_rank, g1.train_per_rank) == (8, 64, 64, 32)
    assert (g4.grad_accum, g4.meta_batch, g4.meta_per_rank, g4.train_per_rank) == (2, 64, 16, 8)


def test_geometry_rejects_a_meta_batch_that_does_not_split_across_ranks():
    cfg = {
        "train_batch_size": 12,
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 2,
    }
    with pytest.raises(BatchConfigError, match="does not split evenly across 3 ranks"):
        resolve_geometry(cfg, 3, 0.75)  # 12 / 0.75 = 16 is whole, but not divisible by 3


def test_geometry_rejects_inconsistent_triplet():
    cfg = {
        "train_batch_size": 32,
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 3,
    }
    with pytest.raises(BatchConfigError, match="!= train_micro_batch_size_per_gpu 4"):
        resolve_geometry(cfg, 2, 1.0)


def test_method_flag_overrides_and_uniform_without_section():
    assert es_config_for_run({}, None).method == "uniform"
    assert es_config_for_run({}, "eswp").method == "eswp"
    cfg = es_config_for_run(
        {"evolved_sampling": {"method": "es", "beta1": 0.3}}, "topk", {"tau": 2.0}
    )
    assert (cfg.method, cfg.beta1, cfg.tau) == ("topk", 0.3, 2.0)


def test_deepspeed_config_strips_section_and_fills_auto():
    from es_llm.sampling.geometry import BatchGeometry

    ds = {
        "train_batch_size": 32,
        "scheduler": {
            "type": "WarmupCosineLR",
            "params": {"total_num_steps": "auto", "warmup_num_steps": "auto"},
        },
        "evolved_sampling": {"method": "es"},
    }
    out = deepspeed_config(ds, BatchGeometry(2, 32, 8, 2, 64), total_steps=200)
    assert "evolved_sampling" not in out and "evolved_sampling" in ds  # user's dict untouched
    assert out["scheduler"]["params"] == {"total_num_steps": 200, "warmup_num_steps": 10}
    assert (out["train_micro_batch_size_per_gpu"], out["gradient_accumulation_steps"]) == (8, 2)

"""Every shipped file in es_llm/configs/ parses, validates and builds.

DeepSpeed configs: the evolved_sampling section (es_llm.sampling.config), the batch geometry for
several world sizes, the dict handed to DeepSpeed (no section, no "auto" left) through
DeepSpeed's own config validation. Model presets: built on CPU (small ones, with a scoring
forward) or on the meta device (large ones) with their parameter count checked.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import REPO

from es_llm.drivers.deepspeed.dsconfig import deepspeed_config, es_config_for_run, load_ds_config
from es_llm.drivers.scoring import scoring_losses
from es_llm.model import build_model, count_parameters, load_model_preset
from es_llm.sampling.config import SECTION
from es_llm.sampling.geometry import resolve_geometry

DS_FILES = sorted((REPO / "es_llm" / "configs" / "ds").glob("*.json"))
MODEL_FILES = sorted((REPO / "es_llm" / "configs" / "models").glob("*.json"))

# preset -> (lower, upper) parameter count with the preset's own vocabulary
LARGE = {
    "gpt2-124m": (124_000_000, 125_000_000),  # 124,439,808 with tied 50257 x 768 embeddings
    "gpt2-350m": (354_000_000, 356_000_000),
    "llama-1b": (1_000_000_000, 1_300_000_000),
}


def test_the_expected_files_are_shipped():
    names = {p.stem for p in DS_FILES}
    assert {"cpu_tiny", "zero1_bf16", "zero2_bf16", "zero3_bf16", "cpu_test_zero3"} <= names
    assert set(LARGE) | {"gpt2-tiny", "llama-tiny"} <= {p.stem for p in MODEL_FILES}


@pytest.mark.parametrize("path", DS_FILES, ids=lambda p: p.stem)
def test_ds_config_validates(path):
    from deepspeed.runtime.config import DeepSpeedConfig

    raw = json.loads(path.read_text())
    assert SECTION in raw, f"{path.name} has no evolved_sampling section"
    cfg = load_ds_config(str(path))
    es = es_config_for_run(cfg, None)
    assert es.enabled
    if path.stem.startswith("zero"):
        stage = int(path.stem[4])
        assert cfg["zero_optimization"]["stage"] == stage
        assert cfg["bf16"]["enabled"] is True
    worlds = [1, 2, 8] if cfg.get("train_batch_size") == "auto" else [1, 2]
    for world in worlds:
        geo = resolve_geometry(cfg, world, es.effective_selection_ratio)
        assert geo.train_batch == geo.micro * geo.grad_accum * world
        assert geo.meta_batch % world == 0
    out = deepspeed_config(cfg, resolve_geometry(cfg, 1, es.effective_selection_ratio), 1000)
    assert SECTION not in out and SECTION in cfg  # the caller's dict is left alone
    assert "auto" not in json.dumps(out)
    ds = DeepSpeedConfig(out)  # DeepSpeed's own schema (unknown keys are errors there)
    assert ds.zero_optimization_stage == cfg.get("zero_optimization", {}).get("stage", 0)


@pytest.mark.parametrize("path", MODEL_FILES, ids=lambda p: p.stem)
def test_model_preset_builds(path):
    preset = load_model_preset(str(path))
    name = path.stem
    if name in LARGE:
        model = build_model(preset, vocab_size=512, seq_len=128, device="meta")
        lo, hi = LARGE[name]
        n = count_parameters(model)
        assert lo <= n <= hi, f"{name}: {n:,} parameters"
        assert all(p.device.type == "meta" for p in model.parameters())
        if preset["family"] == "gpt2":
            assert model.config.vocab_size == 50257 and model.config.n_positions == 1024
        return
    torch.manual_seed(0)
    model = build_model(preset, vocab_size=512, seq_len=32)
    assert count_parameters(model) < 10_000_000
    ids = torch.randint(0, 512, (2, 32))
    loss_sum, count = scoring_losses(model, ids)
    assert torch.isfinite(loss_sum).all() and (count == 31).all()

"""scoring_losses against a plain transformers forward + F.cross_entropy on tiny models
(random init, local configs, no downloads)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from es_llm.drivers.scoring import scoring_losses

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
V = 101


def _gpt2() -> torch.nn.Module:
    cfg = GPT2Config(
        vocab_size=V, n_positions=32, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0
    )
    return GPT2LMHeadModel(cfg)


def _llama() -> torch.nn.Module:
    cfg = LlamaConfig(
        vocab_size=V,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    return LlamaForCausalLM(cfg)


MODELS = {"gpt2": _gpt2, "llama": _llama}


def _expected(model, ids, labels):
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
    b, t = ids.shape
    ce = F.cross_entropy(
        logits[:, :-1].reshape(-1, V),
        labels[:, 1:].reshape(-1),
        ignore_index=-100,
        reduction="none",
    ).view(b, t - 1)
    return ce.sum(1), (labels[:, 1:] != -100).float().sum(1)


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("fused", [True, False])
def test_matches_plain_forward(name: str, fused: bool) -> None:
    torch.manual_seed(0)
    model = MODELS[name]().to(DEVICE).eval()
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (4, 17), generator=gen).to(DEVICE)
    labels = ids.clone()
    labels[1, 3:8] = -100
    labels[2, 1:] = -100  # no valid target at all
    loss, count = scoring_losses(model, ids, labels=labels, use_fused_linear=fused)
    exp_loss, exp_count = _expected(model, ids, labels)
    torch.testing.assert_close(loss, exp_loss, rtol=1e-4, atol=1e-4)
    assert torch.equal(count, exp_count)
    assert count[2] == 0 and loss[2] == 0
    assert loss.dtype == count.dtype == torch.float32 and not loss.requires_grad
    # labels default to input_ids
    loss2, count2 = scoring_losses(model, ids, use_fused_linear=fused)
    torch.testing.assert_close(loss2, _expected(model, ids, ids)[0], rtol=1e-4, atol=1e-4)
    assert count2.tolist() == [16.0] * 4


@pytest.mark.parametrize("name", list(MODELS))
def test_fused_path_never_builds_logits(name: str) -> None:
    model = MODELS[name]().to(DEVICE).eval()

    def boom(*args, **kwargs):
        raise AssertionError("lm_head was called: the [B, T, V] logits were materialised")

    ids = torch.randint(0, V, (2, 9), device=DEVICE)
    expected = _expected(model, ids, ids)
    model.lm_head.forward = boom
    loss, _ = scoring_losses(model, ids)
    torch.testing.assert_close(loss, expected[0], rtol=1e-4, atol=1e-4)


def test_unwraps_engine_like_wrapper_and_keeps_train_mode() -> None:
    model = _gpt2().to(DEVICE).eval()

    class Engine(torch.nn.Module):  # DeepSpeedEngine / DDP keep the model at .module
        def __init__(self, m):
            super().__init__()
            self.module = m

        def forward(self, **kw):
            return self.module(**kw)

    ids = torch.randint(0, V, (2, 9), device=DEVICE)
    for fused in (True, False):
        loss, _ = scoring_losses(Engine(model), ids, use_fused_linear=fused)
        torch.testing.assert_close(loss, _expected(model, ids, ids)[0], rtol=1e-4, atol=1e-4)
    model.train()
    scoring_losses(model, ids)
    assert model.training


# A real ZeRO-3 engine in its own process (DeepSpeed keeps process-group state): after
# deepspeed.initialize every parameter is partitioned, so the scoring forward must gather the
# lm_head (and the engine's hooks the rest) to match the plain model it was built from.
ZERO3_SCRIPT = """
import copy, json, os, sys
import torch
import deepspeed
from test_kernels_scoring import _expected, _llama
from es_llm.drivers.deepspeed.dsconfig import deepspeed_config, load_ds_config
from es_llm.sampling.geometry import resolve_geometry
from es_llm.drivers.scoring import scoring_losses

torch.manual_seed(0)
model = _llama().eval()
plain = copy.deepcopy(model)
ds = load_ds_config(sys.argv[1])
config = deepspeed_config(ds, resolve_geometry(ds, 1, 1.0), total_steps=10)
engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
engine.eval()
head = engine.module.lm_head.weight
ids = torch.randint(0, 101, (3, 9), generator=torch.Generator().manual_seed(2))
labels = ids.clone()
labels[1, 2:6] = -100
expected, _ = _expected(plain, ids, labels)
out = {"stage": engine.zero_optimization_stage(), "partitioned": hasattr(head, "ds_id"),
       "head_numel_outside_gather": head.numel(), "expected": expected.tolist()}
for fused in (True, False):  # on the engine's device (a GPU where DeepSpeed has one)
    loss, count = scoring_losses(
        engine, ids.to(engine.device), labels=labels.to(engine.device), use_fused_linear=fused
    )
    out[f"fused={fused}"] = loss.cpu().tolist()
out["head_numel_after"] = head.numel()
print("RESULT " + json.dumps(out))
"""


@pytest.mark.multiproc
def test_zero3_engine_scores_like_the_plain_model(tmp_path) -> None:
    """A single-process ZeRO-3 engine (DeepSpeed on CPU, es_llm/configs/ds/cpu_test_zero3.json)."""
    import json
    import os
    import subprocess
    import sys

    from conftest import REPO, free_port

    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-c", ZERO3_SCRIPT, str(REPO / "es_llm/configs/ds/cpu_test_zero3.json")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-5000:]
    out = json.loads(lines[-1].removeprefix("RESULT "))
    assert out["stage"] == 3 and out["partitioned"]
    # partitioned: the rank holds none of the weight outside a gather, before and after
    assert out["head_numel_outside_gather"] == 0 and out["head_numel_after"] == 0
    expected = torch.tensor(out["expected"])
    for fused in (True, False):
        torch.testing.assert_close(
            torch.tensor(out[f"fused={fused}"]), expected, rtol=1e-4, atol=1e-4
        )


def test_logit_softcapping_takes_plain_forward() -> None:
    model = _gpt2().to(DEVICE).eval()
    model.config.final_logit_softcapping = 30.0
    called = []
    orig = model.lm_head.forward
    model.lm_head.forward = lambda x: called.append(1) or orig(x)
    scoring_losses(model, torch.randint(0, V, (1, 5), device=DEVICE))
    assert called

"""scoring_losses against a plain transformers forward + F.cross_entropy on tiny models
(random init, local configs, no downloads)."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from es_llm.train.scoring import scoring_losses

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


def test_zero3_partitioned_head_is_gathered(monkeypatch: pytest.MonkeyPatch) -> None:
    """A param carrying ds_id (ZeRO-3) is read inside deepspeed.zero.GatheredParameters."""
    deepspeed = pytest.importorskip("deepspeed")
    model = _llama().to(DEVICE).eval()
    ids = torch.randint(0, V, (2, 9), device=DEVICE)
    expected = _expected(model, ids, ids)[0]
    full = model.lm_head.weight.data.clone()
    model.lm_head.weight.ds_id = 7
    model.lm_head.weight.data = torch.empty(0, device=DEVICE)  # "partitioned"
    calls = []

    @contextlib.contextmanager
    def fake_gather(params, modifier_rank=None):
        calls.append((list(params), modifier_rank))
        params[0].data = full
        yield
        params[0].data = torch.empty(0, device=DEVICE)

    monkeypatch.setattr(deepspeed.zero, "GatheredParameters", fake_gather)
    loss, _ = scoring_losses(model, ids)
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-4)
    assert len(calls) == 1 and calls[0][1] is None and calls[0][0][0] is model.lm_head.weight


def test_logit_softcapping_takes_plain_forward() -> None:
    model = _gpt2().to(DEVICE).eval()
    model.config.final_logit_softcapping = 30.0
    called = []
    orig = model.lm_head.forward
    model.lm_head.forward = lambda x: called.append(1) or orig(x)
    scoring_losses(model, torch.randint(0, V, (1, 5), device=DEVICE))
    assert called

"""Instruction data: a `labels` column (-100 on prompt and padding) read by global id beside
`input_ids`, scored and trained as the mean over the tokens whose label is not -100. One
process, a tiny random GPT-2, the real scorer (fused and plain paths)."""

from __future__ import annotations

import datasets
import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

from es_llm.dist import Communicator
from es_llm.drivers.losses import training_losses, weighted_step_loss
from es_llm.drivers.scoring import ModelScorer
from es_llm.sampling.config import EvolvedSamplingConfig
from es_llm.sampling.datapath import ESDataPath
from es_llm.sampling.plan import RunPlan

N, T, V = 40, 8, 37
DS = {"train_batch_size": 4, "train_micro_batch_size_per_gpu": 2}


def _rows() -> tuple[list[list[int]], list[list[int]]]:
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, V, (N, T), generator=g)
    labels = tokens.clone()
    prompt = torch.arange(N) % 4 + 1  # the first 1..4 tokens are the prompt
    labels[torch.arange(T)[None, :] < prompt[:, None]] = -100
    labels[torch.arange(N) % 5 == 2] = -100  # fully masked: nothing to learn
    return tokens.tolist(), labels.tolist()


def _model() -> torch.nn.Module:
    torch.manual_seed(1)
    cfg = GPT2Config(vocab_size=V, n_positions=T, n_embd=16, n_layer=1, n_head=2)
    return GPT2LMHeadModel(cfg).eval()


def _expected(model, tokens, labels):
    with torch.no_grad():
        logits = model(input_ids=tokens).logits.float()
    ce = F.cross_entropy(
        logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), reduction="none"
    ).view(len(tokens), T - 1)
    keep = labels[:, 1:] != -100
    return (ce * keep).sum(1) / keep.sum(1).clamp(min=1), keep.any(1)


@pytest.mark.parametrize("fused", [True, False])
def test_the_scorer_averages_over_unmasked_tokens_and_flags_fully_masked_samples(fused):
    model = _model()
    tokens, labels = (torch.tensor(x) for x in _rows())
    scorer = ModelScorer(lambda: model, micro_batch=3, use_fused_linear=fused)
    loss, valid = scorer(tokens, torch.arange(N), labels)
    want, has_tokens = _expected(model, tokens, labels)
    assert torch.equal(valid, has_tokens) and not bool(valid[2])
    torch.testing.assert_close(loss[valid], want[valid], rtol=1e-5, atol=1e-5)
    # labels equal to the tokens are packed pre-training data: exactly the unlabelled loss
    same, _ = scorer(tokens, torch.arange(N), tokens.clone())
    plain, _ = scorer(tokens, torch.arange(N))
    assert torch.equal(same, plain)


def test_the_training_loss_averages_over_unmasked_tokens():
    model = _model()
    tokens, labels = (torch.tensor(x) for x in _rows())
    logits = model(input_ids=tokens).logits
    per_sample, count = training_losses(logits, tokens, -100, labels)
    want, has_tokens = _expected(model, tokens, labels)
    torch.testing.assert_close(per_sample.detach(), torch.where(has_tokens, want, 0.0))
    assert torch.equal(count, (labels[:, 1:] != -100).sum(1))
    w = torch.linspace(0.5, 2.0, N)
    loss, ps = weighted_step_loss(logits, tokens, w, -100, labels)
    assert torch.equal(loss, (ps * w).mean())
    unlabelled, _ = training_losses(logits, tokens, -100)
    assert torch.equal(training_losses(logits, tokens, -100, tokens)[0], unlabelled)


def test_the_data_path_reads_labels_by_id_and_never_selects_a_fully_masked_sample():
    tokens, labels = _rows()
    ds = datasets.Dataset.from_dict({"input_ids": tokens, "labels": labels})
    es = EvolvedSamplingConfig(method="es", selection_ratio=0.5, burn_in_steps=1)
    plan = RunPlan.build(DS, es, dp_size=1, num_samples=N, epochs=2, seed=4)
    model = _model()
    dp = ESDataPath(plan, ds, comm=Communicator(), scorer=ModelScorer(lambda: model, micro_batch=4))
    want_labels = torch.tensor(labels)
    selects = 0
    while (draw := dp.next_step()) is not None:
        assert torch.equal(draw.labels, want_labels[draw.ids])
        a = dp.assign(draw)
        assert torch.equal(a.labels, want_labels[a.ids])
        assert torch.equal(a.tokens, torch.tensor(tokens)[a.ids])
        if draw.selecting:
            selects += 1
            assert not bool((a.ids % 5 == 2).any()), "a fully-masked sample was selected"
        for i in range(0, a.ids.numel(), 2):
            ids = a.ids[i : i + 2]
            dp.observe_training_losses(a, ids, ids.float().cos())
        rec = dp.finish_step(a)
        if draw.selecting:
            assert rec["invalid"] == int((draw.ids % 5 == 2).sum())
    assert selects >= 5 and dp.totals["invalid_samples"] > 0
    assert dp.state_dict()["fingerprint"]["labels"] is True

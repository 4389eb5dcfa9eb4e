"""Forward FLOPs per token (es_llm/flops.py) against torch's own count of a real forward."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import LlamaConfig, LlamaForCausalLM

from es_llm.flops import flops_breakdown, forward_flops_per_token, preset_flops_per_token
from es_llm.model import build_model, load_model_preset

V, T = 512, 32


def _counted_matmul_flops(model: torch.nn.Module, batch: int = 2) -> float:
    """FLOPs per token of every matmul torch counts in one forward (not the CPU attention
    kernel, which FlopCounterMode does not see here: that part is checked by formula)."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(input_ids=torch.randint(0, V, (batch, T)))
    return counter.get_total_flops() / (batch * T)


@pytest.mark.parametrize("preset", ["gpt2-tiny", "llama-tiny", "gpt2-nano"])
def test_the_weight_and_head_flops_are_what_torch_counts(preset):
    model = build_model(load_model_preset(preset), vocab_size=V, seq_len=T).eval()
    parts = flops_breakdown(model.config, T)
    assert parts["layers"] + parts["head"] == _counted_matmul_flops(model)
    assert forward_flops_per_token(model.config, T) == sum(parts.values())


def test_grouped_query_attention_and_head_dim_count_their_own_sizes():
    config = LlamaConfig(vocab_size=V, hidden_size=96, intermediate_size=200,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                         head_dim=32, max_position_embeddings=T)  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    parts = flops_breakdown(config, T)
    assert parts["layers"] + parts["head"] == _counted_matmul_flops(model)
    # scores and values: 2 matmuls of 2 * T * head_dim FLOPs per head, layer and token
    assert parts["attention"] == 2 * 2 * 2 * T * 32 * 4
    assert parts["head"] == 2 * V * 96


def test_the_cpu_learner_has_proxies_at_least_5x_cheaper():
    flops = {
        p: preset_flops_per_token(p, vocab_size=4096, seq_len=128)
        for p in ("gpt2-mini", "gpt2-tiny", "gpt2-nano")
    }
    assert flops["gpt2-mini"] / flops["gpt2-tiny"] >= 5
    assert flops["gpt2-mini"] / flops["gpt2-nano"] >= 5
    assert flops["gpt2-tiny"] / flops["gpt2-nano"] < 5  # why gpt2-tiny is not the learner


def test_other_architectures_are_refused_by_name():
    class Config:
        model_type = "mamba"

    with pytest.raises(ValueError, match="not 'mamba'"):
        forward_flops_per_token(Config(), T)

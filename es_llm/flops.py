"""Forward FLOPs per token of a GPT-2 or Llama model, from its transformers config.

What decides whether a scorer pays is its cost against the learner's, and on a small model
the vocabulary's head is a large share of it: a 4-layer GPT-2 of width 128 with a 4,096-token
vocabulary spends about a third of its forward FLOPs in the head. So the count includes:

- every weight matmul of every layer, 2 FLOPs per weight per token: the attention
  projections (query, keys and values with their grouped-query sizes, output), the MLP
  (GPT-2: two matrices of ``n_inner``, default 4 x width; Llama: gate, up and down of
  ``intermediate_size``);
- attention itself: scores and the weighted sum of the values, ``2 x 2 x seq_len x
  head_dim x heads`` per layer and token, over the whole context (the convention of Kaplan et
  al., and what a dense kernel computes; a causal kernel skips about half);
- the head: ``2 x vocab_size x width`` (the input embedding is a lookup and costs nothing).

Norms, activations, biases and softmax are left out: a small fraction of a percent at these
sizes. A training step costs about 3 times the forward (backward = 2 x forward).
"""

from __future__ import annotations

from typing import Any

__all__ = ["flops_breakdown", "forward_flops_per_token", "preset_flops_per_token"]


def _dims(config: Any) -> tuple[int, int, int, int, int, int, int]:
    """(layers, width, heads, kv heads, head dim, MLP matrices x inner width, vocab)."""
    kind = getattr(config, "model_type", None)
    if kind == "gpt2":
        d, heads = int(config.n_embd), int(config.n_head)
        inner = int(config.n_inner or 4 * d)
        return int(config.n_layer), d, heads, heads, d // heads, 2 * inner, int(config.vocab_size)
    if kind == "llama":
        d, heads = int(config.hidden_size), int(config.num_attention_heads)
        kv = int(getattr(config, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(config, "head_dim", None) or d // heads)
        mlp = 3 * int(config.intermediate_size)
        return int(config.num_hidden_layers), d, heads, kv, head_dim, mlp, int(config.vocab_size)
    raise ValueError(f"FLOPs are counted for gpt2 and llama configs, not {kind!r}")


def flops_breakdown(config: Any, seq_len: int) -> dict[str, int]:
    """Forward FLOPs per token by part: ``layers`` (their weight matmuls), ``attention``
    (scores and the weighted sum, over ``seq_len``) and ``head`` (the vocabulary's matmul)."""
    layers, d, heads, kv, head_dim, mlp, vocab = _dims(config)
    projections = d * heads * head_dim + 2 * d * kv * head_dim + heads * head_dim * d
    return {
        "layers": layers * 2 * (projections + mlp * d),
        "attention": layers * 2 * 2 * seq_len * heads * head_dim,
        "head": 2 * vocab * d,
    }


def forward_flops_per_token(config: Any, seq_len: int) -> int:
    """Forward FLOPs per token of the model ``config`` describes, at context ``seq_len``."""
    return sum(flops_breakdown(config, seq_len).values())


def preset_flops_per_token(preset: str, *, vocab_size: int, seq_len: int) -> int:
    """The same for a model preset (``es_llm/configs/models``) on a vocabulary of this size."""
    from es_llm.model import load_model_preset, model_config

    config = model_config(load_model_preset(preset), vocab_size=vocab_size, seq_len=seq_len)
    return forward_flops_per_token(config, seq_len)

"""The trained Megatron GPT model as a Hugging Face model directory (``OUT/model``).

Why a conversion of our own: a preset is built in Megatron as the same maths as its
`transformers` model, so the weights map one to one. A GPT-2 preset (learned positions,
pre-LayerNorm blocks, biases, GELU with GPT-2's approximation, tied embeddings) becomes a
`GPT2LMHeadModel`:

=====================================================  =========================================
Megatron (local spec)                                  GPT2LMHeadModel
=====================================================  =========================================
embedding.word_embeddings.weight (vocab-parallel)      transformer.wte.weight (= lm_head.weight)
embedding.position_embeddings.weight                   transformer.wpe.weight
decoder.layers.i.input_layernorm.*                     transformer.h.i.ln_1.*
decoder.layers.i.self_attention.linear_qkv.*           transformer.h.i.attn.c_attn.* (see below)
decoder.layers.i.self_attention.linear_proj.*          transformer.h.i.attn.c_proj.* (transposed)
decoder.layers.i.pre_mlp_layernorm.*                   transformer.h.i.ln_2.*
decoder.layers.i.mlp.linear_fc1.*                      transformer.h.i.mlp.c_fc.* (transposed)
decoder.layers.i.mlp.linear_fc2.*                      transformer.h.i.mlp.c_proj.* (transposed)
decoder.final_layernorm.*                              transformer.ln_f.*
=====================================================  =========================================

A Llama preset (RoPE, RMSNorm, SwiGLU, grouped-query attention, no biases) becomes a
`LlamaForCausalLM`: ``embedding.word_embeddings`` -> ``model.embed_tokens``, ``output_layer`` ->
``lm_head`` (untied presets), per layer ``input_layernorm`` -> ``input_layernorm``,
``linear_qkv`` -> ``self_attn.{q,k,v}_proj``, ``linear_proj`` -> ``self_attn.o_proj``,
``pre_mlp_layernorm`` -> ``post_attention_layernorm``, ``linear_fc1`` = [gate; up] ->
``mlp.gate_proj`` and ``mlp.up_proj``, ``linear_fc2`` -> ``mlp.down_proj``, and
``decoder.final_layernorm`` -> ``model.norm``.

Megatron's fused QKV rows are grouped per key/value group ([q heads of the group, k, v] for
each group; with GPT-2's full attention a group is one head); GPT-2's `c_attn` columns are
[all q | all k | all v] and GPT-2's `Conv1D` stores weights transposed (in x out); Llama has
separate q, k, v projections. Under tensor parallelism each rank holds a slice (rows of
column-parallel weights and of the vocabulary, columns of row-parallel ones; a SwiGLU rank's
fc1 rows are its gate slice then its up slice): the slices are gathered over the
tensor-parallel group first. tests/megatron_export_check.py compares the logits of the
Megatron model and of its export, for both families.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from es_llm import dist
from es_llm.drivers.deepspeed.export import MODEL_DIR, write_model_dir
from es_llm.errors import NonFiniteError

__all__ = [
    "MODEL_DIR",
    "export_hf",
    "full_weights",
    "gpt2_state_dict",
    "hf_model",
    "llama_state_dict",
    "load_hf_weights",
    "megatron_weights",
]


# tensor-parallel split dimension of each Megatron weight (by name suffix); the rest are whole
_SPLIT_DIM = {
    "embedding.word_embeddings.weight": 0,
    "self_attention.linear_qkv.weight": 0,
    "self_attention.linear_qkv.bias": 0,
    "mlp.linear_fc1.weight": 0,
    "mlp.linear_fc1.bias": 0,
    "self_attention.linear_proj.weight": 1,
    "mlp.linear_fc2.weight": 1,
    "output_layer.weight": 0,
}
_GLU = ("mlp.linear_fc1.weight", "mlp.linear_fc1.bias")  # [gate; up] on every TP rank


def _split_dim(name: str) -> int | None:
    for suffix, d in _SPLIT_DIM.items():
        if name.endswith(suffix):
            return d
    return None


# TransformerEngine's layer spec fuses each block's LayerNorms into the linear layer after
# them; their weights are renamed to the local spec's names (not run here: no TE installed)
_TE_NAMES = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "self_attention.linear_qkv.layer_norm_bias": "input_layernorm.bias",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
    "mlp.linear_fc1.layer_norm_bias": "pre_mlp_layernorm.bias",
}


def _local_name(name: str) -> str:
    for te, local in _TE_NAMES.items():
        if name.endswith(te):
            return name[: -len(te)] + local
    return name


def full_weights(model: Any, tp_group: Any, *, glu: bool = False) -> dict[str, torch.Tensor]:
    """Every weight of the Megatron model whole (fp32, on the CPU, named as in the local
    layer spec), on every rank of the tensor-parallel group (collective over it). `glu`: the
    MLP's fc1 is gated (SwiGLU): its gathered rows are put back in [all gate; all up] order."""
    tp = torch.distributed.get_world_size(tp_group) if dist.is_initialized() else 1
    dev = dist.device()
    out: dict[str, torch.Tensor] = {}
    for raw, t in model.state_dict().items():
        name = _local_name(raw)
        if not torch.is_tensor(t) or name.endswith("_extra_state"):
            continue
        d = _split_dim(name)
        t = t.detach().float()
        if tp > 1 and d is not None:
            part = (t if d == 0 else t.t()).contiguous().to(dev)
            whole = dist.all_gather_cat(part, group=tp_group)
            t = whole if d == 0 else whole.t()
            if glu and name.endswith(_GLU):  # [g0; u0; g1; u1; ...] -> [g0; g1; ...; u0; u1; ...]
                t = t.reshape(tp, 2, -1, *t.shape[1:]).transpose(0, 1).reshape(t.shape)
        out[name] = t.cpu().contiguous()
    return out


def gpt2_state_dict(w: dict[str, torch.Tensor], *, layers: int, heads: int) -> dict[str, Any]:
    """GPT2LMHeadModel's parameters from the whole Megatron weights `w` (see the module doc)."""
    hidden = w["embedding.word_embeddings.weight"].shape[1]
    d = hidden // heads

    def qkv(t: torch.Tensor) -> torch.Tensor:  # [3h, ...] per head -> [q | k | v]
        per_head = t.reshape(heads, 3, d, *t.shape[1:])
        return torch.cat([per_head[:, j].reshape(hidden, *t.shape[1:]) for j in range(3)])

    sd = {
        "transformer.wte.weight": w["embedding.word_embeddings.weight"],
        "transformer.wpe.weight": w["embedding.position_embeddings.weight"],
        "transformer.ln_f.weight": w["decoder.final_layernorm.weight"],
        "transformer.ln_f.bias": w["decoder.final_layernorm.bias"],
    }
    for i in range(layers):
        m, h = f"decoder.layers.{i}.", f"transformer.h.{i}."
        sd.update(
            {
                h + "ln_1.weight": w[m + "input_layernorm.weight"],
                h + "ln_1.bias": w[m + "input_layernorm.bias"],
                h + "attn.c_attn.weight": qkv(w[m + "self_attention.linear_qkv.weight"]).t(),
                h + "attn.c_attn.bias": qkv(w[m + "self_attention.linear_qkv.bias"]),
                h + "attn.c_proj.weight": w[m + "self_attention.linear_proj.weight"].t(),
                h + "attn.c_proj.bias": w[m + "self_attention.linear_proj.bias"],
                h + "ln_2.weight": w[m + "pre_mlp_layernorm.weight"],
                h + "ln_2.bias": w[m + "pre_mlp_layernorm.bias"],
                h + "mlp.c_fc.weight": w[m + "mlp.linear_fc1.weight"].t(),
                h + "mlp.c_fc.bias": w[m + "mlp.linear_fc1.bias"],
                h + "mlp.c_proj.weight": w[m + "mlp.linear_fc2.weight"].t(),
                h + "mlp.c_proj.bias": w[m + "mlp.linear_fc2.bias"],
            }
        )
    return {k: v.contiguous() for k, v in sd.items()}


def llama_state_dict(
    w: dict[str, torch.Tensor], *, layers: int, heads: int, kv_heads: int, tied: bool
) -> dict[str, Any]:
    """LlamaForCausalLM's parameters from the whole Megatron weights `w` (see the module doc)."""
    hidden = w["embedding.word_embeddings.weight"].shape[1]
    d, per_group = hidden // heads, heads // kv_heads
    sd = {
        "model.embed_tokens.weight": w["embedding.word_embeddings.weight"],
        "model.norm.weight": w["decoder.final_layernorm.weight"],
    }
    if not tied:
        sd["lm_head.weight"] = w["output_layer.weight"]
    for i in range(layers):
        m, h = f"decoder.layers.{i}.", f"model.layers.{i}."
        qkv = w[m + "self_attention.linear_qkv.weight"].reshape(kv_heads, per_group + 2, d, hidden)
        gate, up = w[m + "mlp.linear_fc1.weight"].chunk(2, dim=0)
        sd.update(
            {
                h + "input_layernorm.weight": w[m + "input_layernorm.weight"],
                h + "self_attn.q_proj.weight": qkv[:, :per_group].reshape(heads * d, hidden),
                h + "self_attn.k_proj.weight": qkv[:, per_group].reshape(kv_heads * d, hidden),
                h + "self_attn.v_proj.weight": qkv[:, per_group + 1].reshape(kv_heads * d, hidden),
                h + "self_attn.o_proj.weight": w[m + "self_attention.linear_proj.weight"],
                h + "post_attention_layernorm.weight": w[m + "pre_mlp_layernorm.weight"],
                h + "mlp.gate_proj.weight": gate,
                h + "mlp.up_proj.weight": up,
                h + "mlp.down_proj.weight": w[m + "mlp.linear_fc2.weight"],
            }
        )
    return {k: v.contiguous() for k, v in sd.items()}


def hf_model(weights: dict[str, torch.Tensor], hf_config: Any) -> Any:
    """The `transformers` model (GPT2LMHeadModel or LlamaForCausalLM) holding `weights`."""
    from transformers import GPT2LMHeadModel, LlamaForCausalLM

    if hf_config.model_type == "gpt2":
        hf = GPT2LMHeadModel(hf_config)
        sd = gpt2_state_dict(weights, layers=hf_config.n_layer, heads=hf_config.n_head)
    elif hf_config.model_type == "llama":
        hf = LlamaForCausalLM(hf_config)
        heads = hf_config.num_attention_heads
        sd = llama_state_dict(
            weights,
            layers=hf_config.num_hidden_layers,
            heads=heads,
            kv_heads=hf_config.num_key_value_heads or heads,
            tied=bool(hf_config.tie_word_embeddings),
        )
    else:
        raise ValueError(f"no Megatron export for model type {hf_config.model_type!r}")
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    untied = [k for k in missing if not (k == "lm_head.weight" and hf_config.tie_word_embeddings)]
    if untied or unexpected:
        raise RuntimeError(f"Megatron export: missing {untied}, unexpected {unexpected}")
    hf.tie_weights()
    return hf


def megatron_weights(sd: dict[str, torch.Tensor], hf_config: Any) -> dict[str, torch.Tensor]:
    """The whole Megatron weights (local-spec names) of a transformers GPT-2 or Llama state
    dict `sd`: the inverse of `gpt2_state_dict` / `llama_state_dict`."""
    sd = {k: v.detach().float() for k, v in sd.items()}
    w: dict[str, torch.Tensor] = {}
    if hf_config.model_type == "gpt2":
        layers, heads = hf_config.n_layer, hf_config.n_head
        hidden = sd["transformer.wte.weight"].shape[1]
        d = hidden // heads

        def per_head(t: torch.Tensor) -> torch.Tensor:  # [q | k | v] -> per head [q_h, k_h, v_h]
            q, k, v = (x.reshape(heads, d, *t.shape[1:]) for x in t.chunk(3, dim=0))
            return torch.stack([q, k, v], dim=1).reshape(t.shape)

        w["embedding.word_embeddings.weight"] = sd["transformer.wte.weight"]
        w["embedding.position_embeddings.weight"] = sd["transformer.wpe.weight"]
        w["decoder.final_layernorm.weight"] = sd["transformer.ln_f.weight"]
        w["decoder.final_layernorm.bias"] = sd["transformer.ln_f.bias"]
        for i in range(layers):
            m, h = f"decoder.layers.{i}.", f"transformer.h.{i}."
            w.update(
                {
                    m + "input_layernorm.weight": sd[h + "ln_1.weight"],
                    m + "input_layernorm.bias": sd[h + "ln_1.bias"],
                    m + "self_attention.linear_qkv.weight": per_head(
                        sd[h + "attn.c_attn.weight"].t()
                    ),
                    m + "self_attention.linear_qkv.bias": per_head(sd[h + "attn.c_attn.bias"]),
                    m + "self_attention.linear_proj.weight": sd[h + "attn.c_proj.weight"].t(),
                    m + "self_attention.linear_proj.bias": sd[h + "attn.c_proj.bias"],
                    m + "pre_mlp_layernorm.weight": sd[h + "ln_2.weight"],
                    m + "pre_mlp_layernorm.bias": sd[h + "ln_2.bias"],
                    m + "mlp.linear_fc1.weight": sd[h + "mlp.c_fc.weight"].t(),
                    m + "mlp.linear_fc1.bias": sd[h + "mlp.c_fc.bias"],
                    m + "mlp.linear_fc2.weight": sd[h + "mlp.c_proj.weight"].t(),
                    m + "mlp.linear_fc2.bias": sd[h + "mlp.c_proj.bias"],
                }
            )
        return {k: v.contiguous() for k, v in w.items()}
    layers, heads = hf_config.num_hidden_layers, hf_config.num_attention_heads
    kv_heads = hf_config.num_key_value_heads or heads
    hidden = sd["model.embed_tokens.weight"].shape[1]
    d, per_group = hidden // heads, heads // kv_heads
    w["embedding.word_embeddings.weight"] = sd["model.embed_tokens.weight"]
    w["decoder.final_layernorm.weight"] = sd["model.norm.weight"]
    if not hf_config.tie_word_embeddings:
        w["output_layer.weight"] = sd["lm_head.weight"]
    for i in range(layers):
        m, h = f"decoder.layers.{i}.", f"model.layers.{i}."
        q = sd[h + "self_attn.q_proj.weight"].reshape(kv_heads, per_group, d, hidden)
        k = sd[h + "self_attn.k_proj.weight"].reshape(kv_heads, 1, d, hidden)
        v = sd[h + "self_attn.v_proj.weight"].reshape(kv_heads, 1, d, hidden)
        w.update(
            {
                m + "input_layernorm.weight": sd[h + "input_layernorm.weight"],
                m + "self_attention.linear_qkv.weight": torch.cat([q, k, v], dim=1).reshape(
                    -1, hidden
                ),
                m + "self_attention.linear_proj.weight": sd[h + "self_attn.o_proj.weight"],
                m + "pre_mlp_layernorm.weight": sd[h + "post_attention_layernorm.weight"],
                m + "mlp.linear_fc1.weight": torch.cat(
                    [sd[h + "mlp.gate_proj.weight"], sd[h + "mlp.up_proj.weight"]]
                ),
                m + "mlp.linear_fc2.weight": sd[h + "mlp.down_proj.weight"],
            }
        )
    return {k: v.contiguous() for k, v in w.items()}


def load_hf_weights(model: Any, sd: dict[str, torch.Tensor], hf_config: Any) -> None:
    """Copy a transformers GPT-2 / Llama state dict into an unwrapped Megatron GPTModel: each
    tensor-parallel rank takes its slice (the GLU fc1 slice as its gate rows, then its up
    rows). Local layer spec names; a missing or left-over weight is an error."""
    from megatron.core import parallel_state

    tp = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    whole = megatron_weights(sd, hf_config)
    glu = hf_config.model_type == "llama"
    mine = {  # by local-spec name (TransformerEngine's fused norms renamed; not run here)
        _local_name(k): v
        for k, v in model.state_dict().items()
        if not k.endswith("_extra_state") and torch.is_tensor(v)
    }
    if set(mine) != set(whole):
        raise ValueError(
            f"Megatron import: missing {sorted(set(mine) - set(whole))[:3]}, left over "
            f"{sorted(set(whole) - set(mine))[:3]}"
        )
    with torch.no_grad():
        for name, target in mine.items():
            t, dim = whole[name], _split_dim(name)
            if tp > 1 and dim is not None:
                if glu and name.endswith(_GLU):
                    t = torch.cat([half.chunk(tp, dim=0)[rank] for half in t.chunk(2, dim=0)])
                else:
                    t = t.chunk(tp, dim=dim)[rank]
            if t.shape != target.shape:
                raise ValueError(f"Megatron import: {name} is {tuple(t.shape)}, the model "
                                 f"holds {tuple(target.shape)}")  # fmt: skip
            target.copy_(t)


def export_hf(
    model: Any,
    hf_config: Any,
    out: Path,
    tokenizer: Callable[[], Any],
    *,
    tp_group: Any,
) -> Path:
    """Write ``out/model`` (config, safetensors weights, tokenizer) from a Megatron model of
    a GPT-2 or Llama preset (`hf_config`: the preset's transformers config); every rank calls
    it (the gather is collective), global rank 0 writes. The directory appears whole or not
    at all (written beside it, then renamed)."""
    final = Path(out) / MODEL_DIR
    weights = full_weights(model, tp_group, glu=hf_config.model_type == "llama")
    bad = [k for k, v in weights.items() if not bool(torch.isfinite(v).all())]
    if dist.all_reduce_sum([float(len(bad))])[0] > 0:
        raise NonFiniteError(
            f"the trained weights hold NaN or inf ({', '.join(bad[:3]) or 'another rank'}): "
            f"no model exported to {final}"
        )
    if dist.rank() == 0:
        write_model_dir(final, hf_model(weights, hf_config).save_pretrained, tokenizer)
    dist.barrier()
    return final

"""The trained Megatron GPT model as a Hugging Face GPT-2 directory (``OUT/model``).

Why a conversion of our own: a GPT-2 preset is built in Megatron as the same maths (learned
positions, pre-LayerNorm blocks, biases, GELU with GPT-2's approximation, tied embeddings),
so its weights map one to one onto `transformers`' `GPT2LMHeadModel`:

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

Megatron's fused QKV rows are grouped per head ([q_h, k_h, v_h] for each head h), GPT-2's
`c_attn` columns are [all q | all k | all v], and GPT-2's `Conv1D` stores weights transposed
(in x out). Under tensor parallelism each rank holds a slice (rows of column-parallel
weights and of the vocabulary, columns of row-parallel ones): the slices are gathered over
the tensor-parallel group first. tests/megatron_export_check.py compares the logits of the
two models on the same input.

Llama presets are not exported (their checkpoint stays in ``OUT/checkpoints``); docs/megatron.md
says so.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from es_llm import dist
from es_llm.drivers.deepspeed.export import _no_progress_bars
from es_llm.errors import NonFiniteError

__all__ = ["MODEL_DIR", "export_gpt2", "full_weights", "gpt2_state_dict"]

MODEL_DIR = "model"

# tensor-parallel split dimension of each Megatron weight (by name suffix); the rest are whole
_SPLIT_DIM = {
    "embedding.word_embeddings.weight": 0,
    "self_attention.linear_qkv.weight": 0,
    "self_attention.linear_qkv.bias": 0,
    "mlp.linear_fc1.weight": 0,
    "mlp.linear_fc1.bias": 0,
    "self_attention.linear_proj.weight": 1,
    "mlp.linear_fc2.weight": 1,
}


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


def full_weights(model: Any, tp_group: Any) -> dict[str, torch.Tensor]:
    """Every weight of the Megatron model whole (fp32, on the CPU, named as in the local
    layer spec), on every rank of the tensor-parallel group (collective over it)."""
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


def export_gpt2(
    model: Any,
    hf_config: Any,
    out: Path,
    tokenizer: Callable[[], Any],
    *,
    tp_group: Any,
) -> Path:
    """Write ``out/model`` (config, safetensors weights, tokenizer) from a GPT-2-shaped
    Megatron model; every rank calls it (the gather is collective), global rank 0 writes.
    The directory appears whole or not at all (written beside it, then renamed)."""
    from transformers import GPT2LMHeadModel

    final = Path(out) / MODEL_DIR
    weights = full_weights(model, tp_group)
    bad = [k for k, v in weights.items() if not bool(torch.isfinite(v).all())]
    if dist.all_reduce_sum([float(len(bad))])[0] > 0:
        raise NonFiniteError(
            f"the trained weights hold NaN or inf ({', '.join(bad[:3]) or 'another rank'}): "
            f"no model exported to {final}"
        )
    if dist.rank() == 0:
        hf = GPT2LMHeadModel(hf_config)
        sd = gpt2_state_dict(weights, layers=hf_config.n_layer, heads=hf_config.n_head)
        missing, unexpected = hf.load_state_dict(sd, strict=False)
        untied = [k for k in missing if k != "lm_head.weight"]
        if untied or unexpected:
            raise RuntimeError(f"GPT-2 export: missing {untied}, unexpected {unexpected}")
        hf.tie_weights()
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{MODEL_DIR}-", dir=final.parent))
        try:
            with _no_progress_bars():
                hf.save_pretrained(tmp)
            tokenizer().save_pretrained(tmp)
            if final.exists():  # a resumed run replaces the model of its earlier part
                shutil.rmtree(final)
            tmp.rename(final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    return final

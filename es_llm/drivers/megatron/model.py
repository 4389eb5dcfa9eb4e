"""A Megatron-core `GPTModel` from an es-llm model preset or a pretrained GPT-2/Llama
directory's config, with Megatron's DDP and optimizer.

Why from the transformers config: the same `--model` means the same architecture on both
engines. A preset goes through `es_llm.model.model_config` (the config the DeepSpeed driver
builds), a directory brings its own, and the fields are mapped onto a `TransformerConfig`:
GPT-2 becomes a learned-position, LayerNorm, GELU model with tied embeddings; Llama a RoPE,
RMSNorm, SwiGLU model with grouped-query attention. A directory's weights are imported
(`export.load_hf_weights`). The layer spec is TransformerEngine's when `transformer_engine`
is importable, else Megatron's local one.

Call `build_gpt` after `parallel_state.initialize_model_parallel` (it needs the groups).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any

import torch

from es_llm.drivers.megatron.checks import check_model_fits
from es_llm.errors import InputError
from es_llm.model import model_config

__all__ = ["GPT2_ACTIVATIONS", "MegatronParts", "build_gpt", "transformer_config_fields"]


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's `gelu_new`: GELU with the tanh approximation."""
    return torch.nn.functional.gelu(x, approximate="tanh")


# transformers' GPT-2 activation names -> the function Megatron's MLP applies (the same maths,
# so an exported model computes what the Megatron model computed)
GPT2_ACTIVATIONS = {
    "gelu_new": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu": torch.nn.functional.gelu,
}


@dataclass
class MegatronParts:
    """What `build_gpt` returns: the DDP-wrapped model, its optimizer and configs."""

    model: Any  # megatron.core.distributed.DistributedDataParallel around a GPTModel
    optimizer: Any  # megatron.core.optimizer.MegatronOptimizer
    config: Any  # megatron.core.transformer.TransformerConfig
    vocab_size: int
    seq_len: int


def hf_config_of(model: Any, *, vocab_size: int, seq_len: int) -> Any:
    """The transformers config of a preset dict (`es_llm.model.model_config`), or `model`
    itself when it is one already (a pretrained directory's config)."""
    if isinstance(model, dict):
        return model_config(model, vocab_size=vocab_size, seq_len=seq_len)
    return model


def rope_theta(hf: Any) -> float:
    """A Llama config's RoPE base; a scaled RoPE (rope_type other than default) is refused."""
    rope = dict(getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {})
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind != "default":
        raise InputError(
            f"the model's RoPE scaling {kind!r}: the Megatron-core driver builds plain RoPE only"
        )
    return float(rope.get("rope_theta") or getattr(hf, "rope_theta", None) or 10000.0)


def transformer_config_fields(
    model: Any, *, vocab_size: int, seq_len: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(TransformerConfig keyword arguments, GPTModel keyword arguments) of a preset dict or
    a GPT-2 / Llama transformers config."""
    hf = hf_config_of(model, vocab_size=vocab_size, seq_len=seq_len)
    if hf.model_type not in ("gpt2", "llama"):
        raise InputError(
            f"model type {hf.model_type!r}: the Megatron-core driver builds GPT-2 and Llama "
            "models only"
        )
    if hf.model_type == "gpt2":
        heads = int(hf.n_head)
        act = GPT2_ACTIVATIONS.get(str(hf.activation_function))
        if act is None:
            raise InputError(
                f"GPT-2 activation_function {hf.activation_function!r}: the Megatron-core "
                f"driver maps GPT-2 models with {sorted(GPT2_ACTIVATIONS)} only"
            )
        cfg = {
            "num_layers": int(hf.n_layer),
            "hidden_size": int(hf.n_embd),
            "num_attention_heads": heads,
            "ffn_hidden_size": int(hf.n_inner or 4 * hf.n_embd),
            "hidden_dropout": float(hf.resid_pdrop),
            "attention_dropout": float(hf.attn_pdrop),
            "layernorm_epsilon": float(hf.layer_norm_epsilon),
            "normalization": "LayerNorm",
            "add_bias_linear": True,
            "activation_func": act,
        }
        gpt = {
            "position_embedding_type": "learned_absolute",
            "share_embeddings_and_output_weights": True,
            "max_sequence_length": int(hf.n_positions),
        }
    else:
        heads = int(hf.num_attention_heads)
        cfg = {
            "num_layers": int(hf.num_hidden_layers),
            "hidden_size": int(hf.hidden_size),
            "num_attention_heads": heads,
            "num_query_groups": int(hf.num_key_value_heads or heads),
            "ffn_hidden_size": int(hf.intermediate_size),
            "hidden_dropout": 0.0,
            "attention_dropout": float(getattr(hf, "attention_dropout", 0.0)),
            "layernorm_epsilon": float(hf.rms_norm_eps),
            "normalization": "RMSNorm",
            "add_bias_linear": False,
            "gated_linear_unit": True,
            "activation_func": torch.nn.functional.silu,
        }
        gpt = {
            "position_embedding_type": "rope",
            "rotary_base": rope_theta(hf),
            "share_embeddings_and_output_weights": bool(hf.tie_word_embeddings),
            "max_sequence_length": int(hf.max_position_embeddings),
        }
    return cfg, {"vocab_size": int(hf.vocab_size), **gpt}


def _layer_spec(config: Any) -> Any:
    """TransformerEngine's GPT layer spec when it is installed, else Megatron's local one."""
    if importlib.util.find_spec("transformer_engine") is not None:
        from megatron.core.models.gpt.gpt_layer_specs import (
            get_gpt_layer_with_transformer_engine_spec,
        )

        return get_gpt_layer_with_transformer_engine_spec()
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    return get_gpt_layer_local_spec(normalization=config.normalization)


def build_gpt(
    preset: Any,
    *,
    vocab_size: int,
    seq_len: int,
    lr: float = 3e-3,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    clip_grad: float = 1.0,
    bf16: bool = False,
    seed: int = 0,
    preset_name: str = "the model",
    hf_weights: dict[str, torch.Tensor] | None = None,
) -> MegatronParts:
    """The preset (a preset dict, or a GPT-2 / Llama transformers config) as a Megatron
    `GPTModel` on this process's device, wrapped in Megatron's DDP, with its Adam optimizer
    (decoupled weight decay, not applied to biases and norms; no distributed optimizer).
    Parameters are initialised on the CPU from `seed`: the full weight, then this rank's
    slice of it, so every tensor-parallel size starts from the same model; `hf_weights` (the
    transformers model's state dict) replaces them, this rank's slices, before the optimizer
    copies them."""
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.models.gpt import GPTModel
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.transformer import TransformerConfig

    tp = parallel_state.get_tensor_model_parallel_world_size()
    cfg_fields, gpt_fields = transformer_config_fields(
        preset, vocab_size=vocab_size, seq_len=seq_len
    )
    check_model_fits(
        heads=cfg_fields["num_attention_heads"],
        vocab_size=gpt_fields["vocab_size"],
        tp=tp,
        preset=preset_name,
        kv_heads=cfg_fields.get("num_query_groups"),
    )
    dtype = torch.bfloat16 if bf16 else torch.float32
    config = TransformerConfig(
        **cfg_fields,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
        use_cpu_initialization=True,
        bf16=bf16,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
    )
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    model = GPTModel(
        config=config,
        transformer_layer_spec=_layer_spec(config),
        pre_process=True,
        post_process=True,
        parallel_output=True,
        **gpt_fields,
    )
    if hf_weights is not None:
        from es_llm.drivers.megatron.export import load_hf_weights

        load_hf_weights(model, hf_weights, hf_config_of(preset, vocab_size=vocab_size,
                                                        seq_len=seq_len))  # fmt: skip
    device = _device()
    model = model.to(device)
    ddp = DistributedDataParallel(
        config,
        DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=False
        ),
        model,
    )
    # the schedule syncs the gradients only through these hooks (what Megatron-LM's own
    # training loop sets): accumulate without a reduce, then all-reduce once per step
    config.no_sync_func = ddp.no_sync
    config.finalize_model_grads_func = finalize_model_grads
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=lr,
            weight_decay=weight_decay,
            adam_beta1=float(betas[0]),
            adam_beta2=float(betas[1]),
            adam_eps=float(eps),
            clip_grad=clip_grad,
            bf16=bf16,
            params_dtype=dtype,
            use_distributed_optimizer=False,
        ),
        [ddp],
    )
    # Megatron's groups carry a `wd_mult` (0 for biases and norms) that its LR scheduler
    # applies at each step; applied here too, so a run without a scheduler decays only weights
    for group in optimizer.param_groups:
        group["weight_decay"] = weight_decay * float(group.get("wd_mult", 1.0))
    return MegatronParts(
        model=ddp,
        optimizer=optimizer,
        config=config,
        vocab_size=gpt_fields["vocab_size"],
        seq_len=seq_len,
    )


def _device() -> torch.device:
    """This rank's CUDA device, or the CPU without one (the gloo tests)."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")

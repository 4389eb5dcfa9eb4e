"""Model presets: JSON files in `configs/models/` turned into Hugging Face causal LMs.

A preset names a `family` (gpt2 or llama) and that family's `transformers` config fields.
`vocab_size` and the context length follow the tokenizer and the corpus unless the preset
pins them (a GPT-2 124M preset keeps 50257 with the GPT-2 tokenizer, for example).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported where a model is built: presets load without it
    import torch

from es_llm.errors import InputError

FAMILIES = ("gpt2", "llama")
DEFAULT_MODEL_PRESET = "gpt2-tiny"


def configs_dir() -> Path:
    """The shipped `configs/` folder (installed as the package `es_llm.configs`)."""
    import es_llm.configs

    return Path(es_llm.configs.__file__).resolve().parent


def resolve_preset_path(name_or_path: str, kind: str) -> Path:
    """A preset is a path to a JSON file, or the stem of a file in configs/<kind>/."""
    p = Path(name_or_path)
    if p.suffix == ".json" or p.exists():
        if not p.is_file():
            raise InputError(f"{kind} config {str(p)!r} does not exist")
        return p
    candidate = configs_dir() / kind / f"{name_or_path}.json"
    if candidate.is_file():
        return candidate
    available = sorted(x.stem for x in (configs_dir() / kind).glob("*.json"))
    raise InputError(
        f"unknown {kind} preset {name_or_path!r}: not a file and not one of {available}"
    )


def load_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise InputError(
            f"{path}: invalid JSON ({e.msg} at line {e.lineno} column {e.colno})"
        ) from e


def load_model_preset(name_or_path: str) -> dict[str, Any]:
    path = resolve_preset_path(name_or_path, "models")
    preset = load_json(path)
    family = preset.get("family")
    if family not in FAMILIES:
        raise InputError(f"{path}: 'family' must be one of {FAMILIES}, got {family!r}")
    return preset


def build_model(
    preset: dict[str, Any], *, vocab_size: int, seq_len: int, device: str | torch.device = "cpu"
) -> torch.nn.Module:
    """Instantiate the preset with random weights (pre-training starts from scratch)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    fields = {k: v for k, v in preset.items() if k not in ("family", "description", "seq_len")}
    fields.setdefault("vocab_size", vocab_size)
    if fields["vocab_size"] < vocab_size:
        raise InputError(
            f"model preset vocab_size {fields['vocab_size']} is smaller than the tokenizer's "
            f"{vocab_size}"
        )
    family = preset["family"]
    if family == "gpt2":
        fields.setdefault("n_positions", seq_len)
        if fields["n_positions"] < seq_len:
            raise InputError(f"model n_positions {fields['n_positions']} < seq_len {seq_len}")
        fields.setdefault("bos_token_id", None)
        fields.setdefault("eos_token_id", None)
        config = GPT2Config(**fields)
        cls: type = GPT2LMHeadModel
    else:
        fields.setdefault("max_position_embeddings", max(seq_len, 128))
        fields.setdefault("bos_token_id", None)
        fields.setdefault("eos_token_id", None)
        config = LlamaConfig(**fields)
        cls = LlamaForCausalLM
    with torch.device(device):
        model = cls(config)
    return model


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())

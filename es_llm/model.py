"""The model of a run: a preset (random weights) or a local Hugging Face model directory.

A preset is a JSON file in `es_llm/configs/models/` naming a `family` (gpt2 or llama) and that
family's `transformers` config fields. `vocab_size` and the context length follow the
tokenizer and the corpus unless the preset pins them (a GPT-2 124M preset keeps 50257 with the
GPT-2 tokenizer, for example).

A directory is a pretrained causal LM (`config.json` + weights, as `save_pretrained` writes
it): `resolve_model` tells the two apart and checks the directory without loading weights
(config, and every safetensors file's header against its size), `load_model` builds either
one and refuses weights that are not finite. Nothing runs code from a directory: every
`from_pretrained` passes ``trust_remote_code=False``, and a directory whose config names code
of its own (``auto_map``) is refused. See docs/models.md.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported where a model is built: presets load without it
    import torch
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

from es_llm.errors import InputError

FAMILIES = ("gpt2", "llama")
DEFAULT_MODEL_PRESET = "gpt2-tiny"
# What `save_pretrained` writes as weights (single file or sharded with an index).
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
SAFETENSORS_INDEX = "model.safetensors.index.json"
# The files in which a Hugging Face directory can name code of its own (`auto_map`), which
# `from_pretrained` would import from the directory if trust_remote_code allowed it.
REMOTE_CODE_FILES = ("config.json", "tokenizer_config.json")


def configs_dir() -> Path:
    """The shipped `es_llm/configs/` folder (installed as the package `es_llm.configs`)."""
    import es_llm.configs

    return Path(es_llm.configs.__file__).resolve().parent


def resolve_preset_path(name_or_path: str, kind: str) -> Path:
    """A preset is a path to a JSON file, or the stem of a file in es_llm/configs/<kind>/."""
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


def model_config(
    preset: dict[str, Any], *, vocab_size: int, seq_len: int, eod_id: int | None = None
) -> PretrainedConfig:
    """The transformers config of a preset for this corpus (its vocabulary and ``seq_len``).

    ``eod_id``: the corpus's end-of-document token, recorded as the config's bos/eos id (what
    `generate` stops at once the model is exported) unless the preset names its own.
    """
    from transformers import GPT2Config, LlamaConfig

    fields = {k: v for k, v in preset.items() if k not in ("family", "description", "seq_len")}
    fields.setdefault("vocab_size", vocab_size)
    if fields["vocab_size"] < vocab_size:
        raise InputError(
            f"model preset vocab_size {fields['vocab_size']} is smaller than the tokenizer's "
            f"{vocab_size}"
        )
    fields.setdefault("bos_token_id", eod_id)
    fields.setdefault("eos_token_id", eod_id)
    if preset["family"] == "gpt2":
        fields.setdefault("n_positions", seq_len)
        if fields["n_positions"] < seq_len:
            raise InputError(f"model n_positions {fields['n_positions']} < seq_len {seq_len}")
        return GPT2Config(**fields)
    fields.setdefault("max_position_embeddings", max(seq_len, 128))
    return LlamaConfig(**fields)


def build_model(
    preset: dict[str, Any],
    *,
    vocab_size: int,
    seq_len: int,
    device: str | torch.device = "cpu",
    eod_id: int | None = None,
) -> torch.nn.Module:
    """Instantiate the preset with random weights (pre-training starts from scratch); see
    ``model_config`` for the config."""
    import torch
    from transformers import GPT2LMHeadModel, LlamaForCausalLM

    config = model_config(preset, vocab_size=vocab_size, seq_len=seq_len, eod_id=eod_id)
    cls: type = GPT2LMHeadModel if preset["family"] == "gpt2" else LlamaForCausalLM
    with torch.device(device):
        model = cls(config)
    return model


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------- any model
@dataclass(frozen=True)
class ModelSpec:
    """What ``--model`` names: a preset (``preset`` set) or a pretrained directory (``path``)."""

    name: str
    preset: dict[str, Any] | None = None
    path: Path | None = None
    vocab_size: int | None = None  # pretrained: rows of its embedding (token ids must be below)
    max_positions: int | None = None  # pretrained: longest sequence it takes, when it says

    @property
    def pretrained(self) -> bool:
        return self.path is not None


def resolve_model(name_or_path: str) -> ModelSpec:
    """A preset name or JSON file, or a local Hugging Face causal-LM directory (no weights read).

    Raises InputError for an unknown preset, or a directory that is not such a model.
    """
    p = Path(name_or_path).expanduser()
    if p.is_dir():
        return _pretrained_spec(p, name_or_path)
    presets = configs_dir() / "models"
    if not p.exists() and p.suffix != ".json" and not (presets / f"{name_or_path}.json").is_file():
        available = sorted(x.stem for x in presets.glob("*.json"))
        raise InputError(
            f"model {name_or_path!r} is neither a preset ({', '.join(available)}) nor a local "
            f"Hugging Face model directory (hub names are not downloaded: fetch the model into "
            f"a directory first)"
        )
    return ModelSpec(name_or_path, preset=load_model_preset(name_or_path))


def _pretrained_spec(path: Path, name: str) -> ModelSpec:
    if not (path / "config.json").is_file():
        raise InputError(
            f"model directory {path} has no config.json: --model takes a preset or a Hugging "
            f"Face model directory (as save_pretrained writes it)"
        )
    if not any((path / f).is_file() for f in WEIGHT_FILES):
        raise InputError(
            f"model directory {path} has a config.json but no weights "
            f"({' or '.join(WEIGHT_FILES[::2])})"
        )
    refuse_remote_code(path, "model directory")
    from transformers import AutoConfig  # the causal-LM mapping below imports torch

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(
            f"model directory {path}: transformers cannot read config.json ({first})"
        ) from e
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise InputError(
            f"model directory {path}: model_type {config.model_type!r} is not a causal LM "
            f"that AutoModelForCausalLM loads"
        )
    check_weight_files(path)
    text = config.get_text_config()
    return ModelSpec(
        name,
        path=path,
        vocab_size=int(text.vocab_size),
        max_positions=getattr(text, "max_position_embeddings", None),
    )


def check_fits(spec: ModelSpec, *, token_id_bound: int, seq_len: int) -> None:
    """InputError unless every token id (below ``token_id_bound``) and ``seq_len`` fit the model.

    Presets grow to the tokenizer (unless they pin ``vocab_size``, see `build_model`); a
    pretrained model's embedding is fixed.
    """
    if not spec.pretrained:
        pinned = (spec.preset or {}).get("vocab_size")
        if pinned is not None and pinned < token_id_bound:
            raise InputError(
                f"model preset {spec.name!r} pins vocab_size {pinned}, but the tokenizer has "
                f"token ids up to {token_id_bound - 1}"
            )
        return
    assert spec.vocab_size is not None
    if token_id_bound > spec.vocab_size:
        raise InputError(
            f"the tokenizer does not fit model {spec.path}: it has token ids up to "
            f"{token_id_bound - 1}, the model's vocab_size is {spec.vocab_size}; use the "
            f"model's own tokenizer (--tokenizer)"
        )
    if spec.max_positions is not None and seq_len > spec.max_positions:
        raise InputError(
            f"--seq-len {seq_len} is longer than model {spec.path} takes "
            f"(max_position_embeddings {spec.max_positions})"
        )


def load_model(
    spec: ModelSpec,
    *,
    vocab_size: int,
    seq_len: int,
    eod_id: int | None = None,
    device: str | torch.device = "cpu",
) -> torch.nn.Module:
    """The run's model, in fp32: the preset with random weights, or the pretrained weights.

    ``vocab_size``: the tokenizer's id bound (ids are below it); ``eod_id`` its
    end-of-document id (presets record it as bos/eos). DeepSpeed casts to bf16/fp16 and
    partitions (ZeRO-3) afterwards, as its config says.
    """
    check_fits(spec, token_id_bound=vocab_size, seq_len=seq_len)
    if spec.path is None:
        assert spec.preset is not None
        return build_model(
            spec.preset, vocab_size=vocab_size, seq_len=seq_len, device=device, eod_id=eod_id
        )
    import torch
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(
            spec.path, dtype=torch.float32, trust_remote_code=False, weights_only=True
        )
    except (OSError, ValueError, RuntimeError, EOFError, SafetensorError) as e:
        raise InputError(
            f"model directory {spec.path}: its weights do not load ({_line(e)})"
        ) from e
    check_finite(model, spec.path)
    return model.to(device)


# ----------------------------------------------------------------------------- directory checks
def _line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def refuse_remote_code(path: Path, what: str) -> None:
    """InputError if the directory names code of its own (``auto_map``): es-llm never runs it
    (every ``from_pretrained`` passes ``trust_remote_code=False``), and transformers would
    otherwise ask on the terminal whether to."""
    for name in REMOTE_CODE_FILES:
        try:
            data = json.loads((Path(path) / name).read_text())
        except (OSError, ValueError):
            continue  # absent or unreadable: the checks that read it say so
        if isinstance(data, dict) and data.get("auto_map"):
            auto_map = data["auto_map"]
            names = sorted(auto_map) if isinstance(auto_map, dict) else auto_map
            raise InputError(
                f"{what} {path} needs code of its own ({name} has an auto_map: {names}); "
                f"es-llm never runs code from a model directory (trust_remote_code=False): use "
                f"a model whose architecture transformers includes"
            )


def safetensors_files(path: Path) -> list[Path]:
    """The safetensors files of a model directory (the index's shards, or the single file)."""
    path = Path(path)
    index = path / SAFETENSORS_INDEX
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    if not index.is_file():
        return []
    weight_map = load_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise InputError(f"{index} has no weight_map: the shards it indexes are unknown")
    return [path / name for name in sorted(set(weight_map.values()))]


def check_weight_files(path: Path) -> None:
    """Every safetensors file of the directory is present and its header parses and fits
    the file's size (a truncated or overwritten header fails here); no tensor is read."""
    from safetensors import SafetensorError, safe_open

    for file in safetensors_files(path):
        if not file.is_file():
            raise InputError(f"model directory {path}: weight file {file.name} is missing")
        try:
            with safe_open(str(file), framework="pt") as fh:
                fh.keys()
        except (SafetensorError, OSError, ValueError) as e:
            raise InputError(
                f"weight file {file} is damaged or truncated: safetensors cannot read it "
                f"({_line(e)})"
            ) from e


def check_finite(model: torch.nn.Module, path: Path) -> None:
    """InputError naming the file and tensor if a loaded weight is NaN or infinite (bytes
    altered inside a weight file still parse, as garbage floats); the file is looked up only
    then, so a good model is read once."""
    import torch

    for name, t in model.state_dict().items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            where = _non_finite_tensor(path) or (f"{path}", name)
            raise InputError(
                f"weight file {where[0]} holds non-finite values (tensor {where[1]}): the file "
                f"is damaged; restore it (e.g. save_pretrained again, or fetch it anew)"
            )


def _non_finite_tensor(path: Path) -> tuple[str, str] | None:
    """(file, tensor) of the first NaN/inf weight in the directory's safetensors files."""
    import torch
    from safetensors import safe_open

    for file in safetensors_files(path):
        with safe_open(str(file), framework="pt") as fh:
            keys = fh.keys()
            for key in keys:
                t = fh.get_tensor(key)
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    return str(file), key
    return None


def auto_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """``AutoTokenizer.from_pretrained`` of a local directory, never running code from it."""
    p = Path(path).expanduser()
    refuse_remote_code(p, "tokenizer directory")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(p, trust_remote_code=False)


def tokenizer_for(model: str, tokenizer: str | None) -> str | None:
    """The run's tokenizer spec: ``--tokenizer``, else a model directory's own, else None
    (the corpus trains a BPE)."""
    if tokenizer is not None:
        return tokenizer
    p = Path(model).expanduser()
    return str(p) if p.is_dir() else None

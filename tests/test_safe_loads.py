"""A damaged model directory is one line, and nothing loads code from a directory.

In process, on the tiny model directories of tests/hf_models.py. A truncated safetensors file
or an overwritten header is found before any weight is read (`resolve_model`, which preflight
runs); bytes altered inside the tensors still parse, as garbage floats, and are refused when
the model is loaded, naming the file and tensor. A directory whose config names code of its
own (`auto_map`) is refused even when stdin answers transformers' [y/N] prompt with "y": the
custom code would write a sentinel file, which must not appear.
"""

from __future__ import annotations

import io
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from hf_models import pretrained_dir, save_tokenizer

from es_llm.data.tokenizer import hf_tokenizer
from es_llm.errors import InputError
from es_llm.model import load_model, resolve_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return pretrained_dir(tmp_path_factory.mktemp("hf") / "gpt2", "gpt2")


def _damaged(model_dir: Path, tmp_path: Path, damage: Callable[[bytearray], None]) -> Path:
    folder = tmp_path / "damaged"
    shutil.copytree(model_dir, folder)
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    damage(data)
    weights.write_bytes(bytes(data))
    return folder


def _truncate(data: bytearray) -> None:
    del data[len(data) // 2 :]


def _overwrite_header(data: bytearray) -> None:
    data[12:40] = b"\xff" * 28  # inside the JSON header that follows its 8-byte length


def _nan_block(data: bytearray) -> None:
    mid = len(data) // 2
    data[mid : mid + 65536] = b"\xff" * 65536  # 0xffffffff is a NaN in fp32


@pytest.mark.parametrize("damage", [_truncate, _overwrite_header], ids=["truncated", "header"])
def test_an_unreadable_safetensors_file_is_one_line_before_any_weight_is_read(
    model_dir, tmp_path, damage
):
    folder = _damaged(model_dir, tmp_path, damage)
    with pytest.raises(InputError) as e:
        resolve_model(str(folder))
    msg = str(e.value)
    assert "\n" not in msg and f"weight file {folder / 'model.safetensors'}" in msg
    assert "damaged or truncated" in msg


def test_non_finite_weights_are_refused_at_load_naming_the_file(model_dir, tmp_path):
    folder = _damaged(model_dir, tmp_path, _nan_block)
    spec = resolve_model(str(folder))  # the header is intact: only the tensors are garbage
    with pytest.raises(InputError) as e:
        load_model(spec, vocab_size=300, seq_len=32)
    msg = str(e.value)
    assert "\n" not in msg and "holds non-finite values (tensor transformer." in msg
    assert f"weight file {folder / 'model.safetensors'}" in msg
    load_model(resolve_model(str(model_dir)), vocab_size=300, seq_len=32)  # the original loads


SENTINEL_CODE = """
from pathlib import Path

Path({sentinel!r}).write_text("custom code from the model directory ran")
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast


class SentinelConfig(GPT2Config):
    model_type = "sentinel_lm"


class SentinelModel(GPT2LMHeadModel):
    config_class = SentinelConfig


class SentinelTokenizer(PreTrainedTokenizerFast):
    pass
"""


def _remote_code_dir(source: Path, folder: Path, sentinel: Path, file: str) -> Path:
    """A copy of `source` whose `file` (config.json or tokenizer_config.json) names custom
    code, with no class of transformers' own to fall back on."""
    shutil.copytree(source, folder)
    module = f"sentinel_{file.split('.')[0]}"  # one per case: an imported module is cached
    (folder / f"{module}.py").write_text(SENTINEL_CODE.format(sentinel=str(sentinel)))
    data = json.loads((folder / file).read_text())
    if file == "config.json":
        data["model_type"] = "sentinel_lm"  # no class of transformers' own: only the custom one
        data["auto_map"] = {
            "AutoConfig": f"{module}.SentinelConfig",
            "AutoModelForCausalLM": f"{module}.SentinelModel",
        }
    else:
        data["tokenizer_class"] = "SentinelTokenizer"
        data["auto_map"] = {"AutoTokenizer": [None, f"{module}.SentinelTokenizer"]}
    (folder / file).write_text(json.dumps(data))
    return folder


@pytest.mark.parametrize("file", ["config.json", "tokenizer_config.json"])
def test_a_directory_that_needs_its_own_code_is_refused_and_runs_none(
    model_dir, tmp_path, monkeypatch, file
):
    sentinel = tmp_path / "custom_code_ran"
    # a model directory, or a tokenizer directory alone (what --tokenizer DIR names)
    source = model_dir if file == "config.json" else save_tokenizer(tmp_path / "tok")
    folder = _remote_code_dir(source, tmp_path / f"remote_{file[:3]}", sentinel, file)
    monkeypatch.setattr("sys.stdin", io.StringIO("y\n" * 8))  # yes to any [y/N] prompt
    msg = None
    try:
        if file == "config.json":
            resolve_model(str(folder))  # what preflight runs for --model DIR
        else:
            hf_tokenizer(str(folder), folder / "tokenizer.json", 0)  # the export's tokenizer
    except InputError as e:
        msg = str(e)
    assert not sentinel.exists(), "code from the directory ran"
    assert msg is not None, "the directory was not refused"
    assert "\n" not in msg and f"{file} has an auto_map" in msg and "trust_remote_code" in msg


def test_a_plain_tokenizer_directory_still_loads(tmp_path):
    folder = save_tokenizer(tmp_path / "tok")
    tok = hf_tokenizer(str(folder), folder / "tokenizer.json", 0)
    assert tok.eos_token is not None

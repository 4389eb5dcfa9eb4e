"""--model as a pretrained Hugging Face directory, its tokenizer, the checks before any engine
starts, and the tokenizer a run exports. In process, on tiny models built here (no download);
the command line's one-line exit 2 for a directory that is not a model is a row of BAD_INPUT in
tests/test_cli_edges.py. The export itself is checked by the end-to-end runs
(tests/test_train_e2e.py, tests/test_launch.py)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from hf_models import TEXT, pretrained_dir, save_model, save_tokenizer

from es_llm.data.tokenizer import EOD_TOKEN, hf_tokenizer, load_tokenizer, token_id_bound
from es_llm.errors import InputError
from es_llm.model import check_fits, load_model, resolve_model, tokenizer_for
from es_llm.preflight import check_train_inputs


def _args(
    model: str, tokenizer: str | None = None, seq_len: int = 32, *more: str
) -> argparse.Namespace:
    from es_llm.cli import build_parser

    argv = ["train", "--model", model, "--seq-len", str(seq_len), "--out", "unused", *more]
    if tokenizer is not None:
        argv += ["--tokenizer", tokenizer]
    return build_parser(["train"]).parse_args(argv)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_a_model_directory_loads_with_its_weights_and_tokenizer(tmp_path, family):
    folder = pretrained_dir(tmp_path / family, family)
    spec = resolve_model(str(folder))
    assert spec.pretrained and spec.vocab_size == 320 and spec.max_positions == 64
    assert tokenizer_for(str(folder), None) == str(folder)
    assert tokenizer_for(str(folder), "other.json") == "other.json"
    tok, _, eod = load_tokenizer(tokenizer_for(str(folder), None))
    assert tok.id_to_token(eod) == EOD_TOKEN
    model = load_model(spec, vocab_size=token_id_bound(tok), seq_len=32)
    assert type(model).__name__ == ("GPT2LMHeadModel" if family == "gpt2" else "LlamaForCausalLM")
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(folder).state_dict()
    got = model.state_dict()
    assert got.keys() == ref.keys()
    for k, v in ref.items():
        assert got[k].dtype == torch.float32
        torch.testing.assert_close(got[k], v, rtol=0, atol=0)
    check_train_inputs(_args(str(folder)))  # its own tokenizer fits


def test_presets_still_resolve_and_record_the_end_of_document_id(tmp_path):
    spec = resolve_model("llama-tiny")
    assert not spec.pretrained and spec.preset["family"] == "llama"
    assert tokenizer_for("llama-tiny", None) is None
    model = load_model(spec, vocab_size=300, seq_len=32, eod_id=0)
    assert model.config.eos_token_id == 0 and model.config.vocab_size == 300
    with pytest.raises(InputError, match="pins vocab_size 50257"):
        check_fits(resolve_model("gpt2-124m"), token_id_bound=60000, seq_len=32)


def test_a_directory_that_is_not_a_causal_lm_is_one_clear_error(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="has no config.json"):
        resolve_model(str(empty))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "no-such-model"}))
    (bad / "model.safetensors").write_bytes(b"")  # the weights are read only when loaded
    with pytest.raises(InputError, match="cannot read config.json"):
        resolve_model(str(bad))
    from transformers import ViTConfig

    vit = tmp_path / "vit"
    ViTConfig().save_pretrained(vit)
    (vit / "model.safetensors").write_bytes(b"")
    with pytest.raises(InputError, match="'vit' is not a causal LM"):
        resolve_model(str(vit))
    no_weights = tmp_path / "noweights"
    save_model(no_weights, "gpt2")
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(InputError, match="no weights"):
        resolve_model(str(no_weights))
    with pytest.raises(InputError, match="has no config.json"):
        check_train_inputs(_args(str(empty)))
    with pytest.raises(InputError, match="neither a preset .*gpt2-tiny.* nor a local Hugging"):
        resolve_model("openai-community/gpt2")


def test_a_tokenizer_that_does_not_fit_the_model_fails_before_the_engine(tmp_path):
    small = save_model(tmp_path / "small", "llama", vocab_size=200)  # the tokenizer has ~300
    tok_dir = save_tokenizer(tmp_path / "tok")
    with pytest.raises(InputError, match=r"token ids up to 29\d, the model's vocab_size is 200"):
        check_train_inputs(_args(str(small), str(tok_dir)))
    with pytest.raises(InputError, match="has no tokenizer.json"):  # and none of its own
        check_train_inputs(_args(str(small)))
    fits = save_model(tmp_path / "fits", "gpt2", positions=16)
    with pytest.raises(InputError, match="--seq-len 32 is longer"):
        check_train_inputs(_args(str(fits), str(tok_dir / "tokenizer.json")))
    check_train_inputs(_args(str(fits), str(tok_dir / "tokenizer.json"), seq_len=16))


def test_overwrite_never_deletes_the_model_it_starts_from(tmp_path):
    run = tmp_path / "run"
    folder = pretrained_dir(run / "model", "gpt2")  # a finished run's export
    check_train_inputs(_args(str(folder), None, 32, "--out", str(run)))  # kept: no --overwrite
    with pytest.raises(InputError, match=r"--model .* is inside --out .* --overwrite deletes"):
        check_train_inputs(_args(str(folder), None, 32, "--out", str(run), "--overwrite"))
    with pytest.raises(InputError, match=r"--tokenizer .* is inside --out"):
        check_train_inputs(_args("gpt2-tiny", str(folder), 32, "--out", str(run), "--overwrite"))
    check_train_inputs(_args(str(folder), None, 32, "--out", str(tmp_path / "new"), "--overwrite"))


def test_the_exported_tokenizer_of_a_trained_bpe_encodes_as_the_corpus_did(tmp_path):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    from es_llm.data.tokenizer import train_bpe

    path = tmp_path / "tokenizer.json"
    train_bpe(TEXT, 300).save(str(path))
    hf_tokenizer(None, path, 0, model_max_length=64).save_pretrained(tmp_path / "out")
    back = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert back.eos_token == back.bos_token == back.pad_token == EOD_TOKEN
    assert back.eos_token_id == 0 and back.model_max_length == 64
    text = TEXT[2]
    assert back(text)["input_ids"] == Tokenizer.from_file(str(path)).encode(text).ids
    assert back.decode(back(text)["input_ids"]) == text
    # a Hugging Face tokenizer directory is exported as itself
    own = save_tokenizer(tmp_path / "own")
    assert hf_tokenizer(str(own), own / "tokenizer.json", 0).eos_token == EOD_TOKEN


def test_the_corpus_tokenized_by_a_model_directory_has_its_own_cache_entry(tmp_path):
    from es_llm.data import load_corpus

    data = tmp_path / "data.txt"
    data.write_text("\n\n".join(t for t in TEXT * 3))
    folder = pretrained_dir(tmp_path / "m", "gpt2")
    common = dict(seq_len=16, cache_dir=tmp_path / "cache", progress=False)
    trained = load_corpus(str(data), vocab_size=280, **common)
    own = load_corpus(str(data), tokenizer=tokenizer_for(str(folder), None), **common)
    assert own.cache_path != trained.cache_path
    assert Path(own.tokenizer_path).read_bytes() == (folder / "tokenizer.json").read_bytes()
    assert own.eod_id == load_tokenizer(str(folder))[2]
    assert max(max(r) for r in own.train["input_ids"]) < 320

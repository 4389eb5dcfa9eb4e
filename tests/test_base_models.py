"""`--model base:...`: the spec, the cache key, the child run's environment."""

import pytest

from es_llm.base_models import (
    DEFAULT_STEPS,
    BaseSpec,
    _child_env,
    base_key,
    is_base_spec,
    parse_base_spec,
)
from es_llm.errors import InputError


def test_spec_grammar():
    assert is_base_spec("base:gpt2-tiny") and not is_base_spec("gpt2-tiny")
    assert parse_base_spec("base:gpt2-tiny") == BaseSpec("gpt2-tiny", DEFAULT_STEPS)
    assert parse_base_spec("base:llama-tiny, steps=7") == BaseSpec("llama-tiny", 7)
    for bad in ("base:", "base:gpt2-tiny,steps=0", "base:gpt2-tiny,lr=1"):
        with pytest.raises(InputError, match="expected --model base:PRESET"):
            parse_base_spec(bad)


def test_key_changes_with_what_the_weights_depend_on():
    kw = {"config": "cpu_tiny", "seq_len": 32, "vocab_size": 512, "seed": 0}
    ref = base_key(BaseSpec("gpt2-tiny", 5), **kw)
    assert base_key(BaseSpec("gpt2-tiny", 5), **kw) == ref
    assert base_key(BaseSpec("gpt2-tiny", 6), **kw) != ref
    assert base_key(BaseSpec("llama-tiny", 5), **kw) != ref
    for field, value in (("seq_len", 64), ("vocab_size", 1024), ("seed", 1),
                         ("config", "cpu_test_hf")):  # fmt: skip
        assert base_key(BaseSpec("gpt2-tiny", 5), **{**kw, field: value}) != ref
    with pytest.raises(InputError):
        base_key(BaseSpec("no-such-preset", 5), **kw)


def test_child_run_is_its_own_job(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("MASTER_PORT", "1234")
    monkeypatch.setenv("ES_LLM_CACHE", "/x")
    env = _child_env()
    assert "RANK" not in env and "MASTER_PORT" not in env and env["ES_LLM_CACHE"] == "/x"


def test_the_base_pretrains_on_the_train_side_of_the_runs_val_share(monkeypatch, tmp_path):
    import subprocess

    import es_llm.base_models as bm

    kw = {"config": "cpu_tiny", "seq_len": 32, "vocab_size": 512, "seed": 0}
    ref = base_key(BaseSpec("gpt2-tiny", 5), **kw)
    assert "val_share" not in ref  # the default: the key of bases built before --val-share
    assert base_key(BaseSpec("gpt2-tiny", 5), **kw, val_share=0.05) == ref
    assert base_key(BaseSpec("gpt2-tiny", 5), **kw, val_share=0.2) == {**ref, "val_share": 0.2}
    seen = []

    def fake_run(cmd, **_):
        seen.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, "", "stopped by the test")

    monkeypatch.setattr(bm.subprocess, "run", fake_run)
    with pytest.raises(bm.BaseModelError, match="stopped by the test"):
        bm.ensure_base_model("base:gpt2-tiny,steps=5", cache_dir=tmp_path, val_share=0.2, **kw)
    cmd = seen[0]
    assert cmd[cmd.index("--val-share") + 1] == "0.2"
    with pytest.raises(InputError, match="--val-share"):
        bm.ensure_base_model("base:gpt2-tiny,steps=5", cache_dir=tmp_path, val_share=0.9, **kw)

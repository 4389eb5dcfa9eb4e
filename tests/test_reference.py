"""The reference model's pieces, in process: which documents it may train on, the cache key of
a trained reference, the budget and the pass that gives l_ref of every training row."""

from __future__ import annotations

import json

import datasets
import numpy as np
import pytest
import torch
from es_llm.kernels import per_sample_loss

from es_llm.data.documents import Document, is_val_group
from es_llm.drivers.reference import (
    ReferenceError,
    ReferenceSpec,
    disjoint_reference_documents,
    reference_cache_key,
    reference_ds_config,
    reference_losses,
    validation_documents,
)
from es_llm.model import build_model, load_model_preset


def _val_and_train_keys(n: int = 200) -> tuple[list[str], list[str]]:
    keys = [f"doc{i}" for i in range(n)]
    return [k for k in keys if is_val_group(k)], [k for k in keys if not is_val_group(k)]


def test_reference_documents_never_include_a_validation_group_or_text():
    val_keys, train_keys = _val_and_train_keys()
    assert val_keys and train_keys
    validation = [Document(k, f"text of {k}") for k in val_keys]
    reference = [
        Document(val_keys[0], "another text, but a validation group"),  # dropped: group
        Document("elsewhere/1", f"text of {val_keys[1]}"),  # dropped: a validation text
        Document("elsewhere/2", "clean text", group=val_keys[2]),  # dropped: group wins
        *(Document(k, f"clean {k}") for k in train_keys[:5]),
    ]
    kept, counts = disjoint_reference_documents(reference, validation)
    assert [d.key for d in kept] == train_keys[:5]
    assert counts == {"documents": 8, "dropped_val_group": 2, "dropped_val_text": 1, "kept": 5}


def _jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return str(path)


def test_validation_documents_follow_the_corpus_split_rule(tmp_path):
    data = _jsonl(tmp_path / "train.jsonl", [f"train text {i}" for i in range(60)])
    val = _jsonl(tmp_path / "val.jsonl", [f"val text {i}" for i in range(60)])
    by_hash = validation_documents(data, None, {"split_rule": "sha1-mod-20-or-tail"})
    assert by_hash and all(is_val_group(d.key) for d in by_hash)
    assert all(d.text.startswith("train") for d in by_hash)
    tail = validation_documents(data, None, {"split_rule": "tail", "val_documents": 3})
    assert [d.text for d in tail] == [f"train text {i}" for i in (57, 58, 59)]
    sep = validation_documents(data, val, {"split_rule": "hash-separate-val-data"})
    assert sep and all(d.text.startswith("val") and is_val_group(d.key) for d in sep)


KEY = dict(
    reference_fingerprint={"kind": "local", "files": [["a.jsonl", 10, 1]]},
    excluded_fingerprint={"source": {"kind": "recipe"}, "split_rule": "sha1-mod-20-or-tail"},
    preset={"family": "gpt2", "n_layer": 4},
    tokenizer_sha256="ab" * 32,
    seq_len=64,
    seed=0,
    budget={"epochs": 1, "steps": None},
    ds_config={"optimizer": {"params": {"lr": 0.002}}},
)


def test_the_cache_key_names_exactly_what_determines_the_reference():
    key = reference_cache_key(**KEY)
    assert key == reference_cache_key(**json.loads(json.dumps(KEY)))  # a second run: a hit
    assert len(key) == 16 and int(key, 16) >= 0
    changed = {
        "reference_fingerprint": {"kind": "local", "files": [["a.jsonl", 11, 1]]},
        "excluded_fingerprint": {"source": {"kind": "hub"}, "split_rule": "tail"},
        "preset": {"family": "gpt2", "n_layer": 2},
        "tokenizer_sha256": "cd" * 32,
        "seq_len": 128,
        "seed": 1,
        "budget": {"epochs": 1, "steps": 50},
        "ds_config": {"optimizer": {"params": {"lr": 0.001}}},
    }
    keys = {key}
    for name, value in changed.items():
        keys.add(reference_cache_key(**{**KEY, name: value}))
    assert len(keys) == 1 + len(changed)  # every input moves the key


def test_the_reference_trains_uniform_on_whole_parameters():
    ds = {"zero_optimization": {"stage": 3}, "evolved_sampling": {"method": "es"}, "x": 1}
    out = reference_ds_config(ds)
    assert out == {"zero_optimization": {"stage": 2}, "x": 1}
    assert ds["zero_optimization"]["stage"] == 3  # the run's own config is untouched
    assert reference_ds_config({"zero_optimization": {"stage": 1}})["zero_optimization"] == {
        "stage": 1
    }


def test_spec_budget_and_input_errors(tmp_path):
    assert ReferenceSpec(data="x").budget() == {"epochs": 1, "steps": None}
    assert ReferenceSpec(data="x", epochs=3).budget() == {"epochs": 3, "steps": None}
    assert ReferenceSpec(data="x", steps=40).budget() == {"epochs": 40, "steps": 40}
    ReferenceSpec(data="recipe:code=1").check()
    with pytest.raises(ReferenceError, match="--reference-data"):
        ReferenceSpec().check()
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    assert ReferenceSpec(model=str(hf)).pretrained
    ReferenceSpec(model=str(hf)).check()
    with pytest.raises(ReferenceError, match="pretrained model directory"):
        ReferenceSpec(data="x", model=str(hf)).check()
    with pytest.raises(ReferenceError, match="--reference-steps"):
        ReferenceSpec(model=str(hf), steps=5).check()


def test_the_pass_gives_each_rows_mean_loss_over_any_shard():
    torch.manual_seed(0)
    vocab, seq = 64, 16
    model = build_model(load_model_preset("gpt2-tiny"), vocab_size=vocab, seq_len=seq)
    rows = torch.randint(0, vocab, (11, seq))
    ds = datasets.Dataset.from_dict({"input_ids": rows.numpy().astype(np.int32)})
    with torch.no_grad():
        logits = model(input_ids=rows).logits[:, :-1]
    s, c = per_sample_loss(logits, rows[:, 1:])
    want = (s / c).float()
    full = reference_losses(model, ds, lo=0, hi=11, micro_batch=4, device=torch.device("cpu"))
    assert full.dtype == torch.float32 and full.shape == (11,)
    torch.testing.assert_close(full, want, rtol=1e-4, atol=1e-4)
    # two ranks' shards ([0, 6) and [6, 11)) together are the one-rank pass
    parts = [
        reference_losses(model, ds, lo=lo, hi=hi, micro_batch=4, device=torch.device("cpu"))
        for lo, hi in ((0, 6), (6, 11))
    ]
    torch.testing.assert_close(torch.cat(parts), full)
    with pytest.raises(ValueError, match="outside"):
        reference_losses(model, ds, lo=5, hi=12, micro_batch=4, device=torch.device("cpu"))


def test_the_pass_counts_only_label_tokens_of_instruction_rows():
    torch.manual_seed(1)
    vocab, seq = 64, 16
    model = build_model(load_model_preset("gpt2-tiny"), vocab_size=vocab, seq_len=seq)
    rows = torch.randint(0, vocab, (5, seq))
    labels = rows.clone()
    labels[:, :9] = -100  # the prompt: not scored
    labels[3] = -100  # a row with no completion token: NaN
    ds = datasets.Dataset.from_dict(
        {"input_ids": rows.numpy().astype(np.int32), "labels": labels.numpy().astype(np.int32)}
    )
    with torch.no_grad():
        logits = model(input_ids=rows).logits[:, :-1]
    s, c = per_sample_loss(logits, labels[:, 1:])
    got = reference_losses(model, ds, lo=0, hi=5, micro_batch=2, device=torch.device("cpu"))
    assert torch.isnan(got[3]) and torch.isfinite(got[[0, 1, 2, 4]]).all()
    keep = [0, 1, 2, 4]
    torch.testing.assert_close(got[keep], (s / c).float()[keep], rtol=1e-4, atol=1e-4)
    whole = reference_losses(
        model,
        ds.remove_columns("labels"),
        lo=0,
        hi=5,
        micro_batch=2,
        device=torch.device("cpu"),
    )
    assert not torch.allclose(whole[keep], got[keep])  # the prompt tokens would change l_ref


def test_compare_charges_the_reference_to_the_method_that_uses_it():
    from es_llm.tools.compare.metrics import method_record

    hist = [
        {"step": 0, "epoch": 0, "val_loss": 6.0, "wall_clock_s": 0.0, "cpu_time_s": 0.0},
        {"step": 8, "epoch": 0, "val_loss": 5.0, "wall_clock_s": 10.0, "cpu_time_s": 9.0},
    ]
    summary = {
        "method": "excess", "wall_clock_s": 10.0, "cpu_time_s": 9.0, "val_history": hist,
        "time_breakdown_s": {"score_fwd_s": 1.0, "select_s": 0.5, "train_fwd_bwd_s": 6.0,
                             "optimizer_s": 1.0},
        "final_val_loss": 5.0, "steps": 8,
        "epochs": 1, "bp_samples": 64, "scored_samples": 128,
    }  # fmt: skip
    plain = method_record(summary, [], 5.0, None)
    ref = {"train_s": 3.0, "pass_s": 1.0, "train_cpu_s": 2.5, "pass_cpu_s": 0.5}
    with_ref = method_record({**summary, "reference": ref}, [], 5.0, None)
    assert plain["reference_s"] is None
    assert with_ref["reference_s"] == 4.0
    assert (with_ref["wall_clock_s"], with_ref["cpu_time_s"]) == (14.0, 12.0)
    # the time to reach a loss includes it too; the breakdown's "other" does not
    assert with_ref["best_wall_clock_s"] == plain["best_wall_clock_s"] + 4.0
    assert with_ref["time_breakdown_s"]["other_s"] == plain["time_breakdown_s"]["other_s"]


def test_the_reference_keeps_clear_of_the_validation_groups_of_the_runs_share(tmp_path):
    from types import SimpleNamespace

    from es_llm.drivers.reference import excluded_fingerprint

    data = _jsonl(tmp_path / "train.jsonl", [f"train text {i}" for i in range(200)])
    stats = {"split_rule": "hash", "val_documents": 9}
    narrow = validation_documents(data, None, stats)
    wide = validation_documents(data, None, stats, 0.3)
    assert {d.key for d in narrow} < {d.key for d in wide}
    assert all(is_val_group(d.key, 0.3) for d in wide) and len(wide) > 2 * len(narrow)
    # a reference document whose group only the larger share holds out is dropped at that share
    only_wide = [d.key for d in wide if not is_val_group(d.key)]
    reference = [Document(f"ref/{k}", f"clean {k}", group=k) for k in only_wide]
    kept, counts = disjoint_reference_documents(reference, wide)
    assert len(kept) == len(reference)  # the default share would train on all of them
    kept, counts = disjoint_reference_documents(reference, wide, 0.3)
    assert kept == [] and counts["dropped_val_group"] == len(reference)
    # the cached reference is keyed by the share, the default as before --val-share existed
    default = SimpleNamespace(data=data, val_data=None, val_share=0.05)
    assert set(excluded_fingerprint(default, stats)) == {"source", "split_rule", "val_documents"}
    shared = excluded_fingerprint(SimpleNamespace(data=data, val_data=None, val_share=0.3), stats)
    assert shared == {**excluded_fingerprint(default, stats), "val_share": 0.3}

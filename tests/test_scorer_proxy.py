"""`scorer: proxy`: the config fields, the proxy's choice and its cost rule, the tokenizer
check, the data path with a learning proxy (its state round trip is exact), and with real
gloo processes: every rank holds the same proxy, whose update over W ranks equals one rank's
over the same trained rows. A real run stopped and resumed: tests/test_train_resume.py."""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import datasets
import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp
from conftest import free_port

from es_llm.cli import build_parser
from es_llm.dist import Communicator
from es_llm.drivers.proxy import (
    MAX_FLOPS_RATIO,
    ProxyScorer,
    build_proxy_scorer,
    check_proxy_tokenizer,
    choose_proxy,
)
from es_llm.errors import InputError
from es_llm.model import load_model_preset, model_config
from es_llm.preflight import check_train_inputs
from es_llm.sampling.config import ESConfigError, es_config_from_ds_config
from es_llm.sampling.datapath import ESDataPath
from es_llm.sampling.plan import RunPlan

N, T, V = 64, 16, 128
DS = {
    "train_batch_size": 8,
    "train_micro_batch_size_per_gpu": 4,
    "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
}


def _learner(name: str = "gpt2-mini", vocab: int = V, seq: int = T):
    return model_config(load_model_preset(name), vocab_size=vocab, seq_len=seq)


def _section(**kw):
    return es_config_from_ds_config({"evolved_sampling": kw})


# ------------------------------------------------------------------ the config fields
@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"scorer": "proxy", "method": "prune"}, "evolved_sampling.scorer: scorer 'proxy' "
         "does not fit method 'prune'"),
        ({"scorer": "proxy", "method": "uniform"}, "evolved_sampling.scorer: scorer 'proxy' "
         "does not fit method 'uniform'"),
        ({"proxy_model": "gpt2-nano"}, "proxy_model is set but scorer is 'learner'"),
        ({"scorer": "proxy", "proxy_lr": 0}, "evolved_sampling.proxy_lr: proxy_lr must be"),
        ({"scorer": "proxy", "proxy_learn": "all"}, "evolved_sampling.proxy_learn: unknown "
         "value 'all'"),
    ],
)  # fmt: skip
def test_bad_proxy_settings_are_one_line_naming_the_field(section, message):
    with pytest.raises(ESConfigError) as e:
        _section(**section)
    lines = str(e.value).splitlines()
    assert len(lines) == 2 and message in lines[1], str(e.value)


def test_proxy_selects_with_a_scoring_forward_and_learner_stays_the_default():
    cfg = _section(scorer="proxy")
    assert cfg.proxy and cfg.runs_scoring_forward and not cfg.stale
    assert (cfg.proxy_model, cfg.proxy_lr, cfg.proxy_learn) == (None, None, "trained")
    assert not _section().proxy


# ------------------------------------------------------------------ choice and cost rule
def test_the_default_proxy_is_the_largest_preset_within_a_fifth_of_the_learner():
    choice = choose_proxy(None, _learner("gpt2-mini", 4096, 128), vocab_size=4096, seq_len=128)
    assert choice.name == "gpt2-tiny" and choice.default
    assert choice.flops_ratio == pytest.approx(1 / 5.4545, rel=1e-3)
    # gpt2-tiny at vocabulary 512, length 32: only gpt2-nano is cheap enough
    choice = choose_proxy(None, _learner("gpt2-tiny", 512, 32), vocab_size=512, seq_len=32)
    assert choice.name == "gpt2-nano" and choice.flops_ratio <= MAX_FLOPS_RATIO
    summary = choice.summary()
    assert summary["default"] and "within 1/5" in summary["rule"]


def test_a_proxy_over_a_fifth_of_the_learner_is_refused_naming_the_field():
    with pytest.raises(InputError) as e:
        choose_proxy("gpt2-tiny", _learner("gpt2-tiny", 4096, 128), vocab_size=4096, seq_len=128)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("evolved_sampling.proxy_model 'gpt2-tiny' costs")
    assert "1.00 of the learner's" in msg
    with pytest.raises(InputError, match="no default preset"):
        choose_proxy(None, _learner("gpt2-nano", 4096, 128), vocab_size=4096, seq_len=128)


def _tokenizer_dir(folder: Path, words: list[str]) -> Path:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    tok = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token=words[0]))
    tok.pre_tokenizer = Whitespace()
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    return folder


def _saved_proxy(folder: Path, words: list[str]) -> Path:
    """A gpt2-nano saved as Hugging Face does, with a word-level tokenizer of `words`."""
    from es_llm.model import build_model

    model = build_model(load_model_preset("gpt2-nano"), vocab_size=len(words), seq_len=T)
    model.save_pretrained(folder)
    return _tokenizer_dir(folder, words)


WORDS = ["<unk>", "<|endoftext|>", *(f"w{i}" for i in range(30))]


def test_a_proxy_whose_tokenizer_is_not_the_learners_is_refused(tmp_path):
    learner_tok = _tokenizer_dir(tmp_path / "learner", WORDS) / "tokenizer.json"
    same = _saved_proxy(tmp_path / "same", WORDS)
    check_proxy_tokenizer("px", same, learner_tok)  # the same vocabulary: accepted
    check_proxy_tokenizer("px", same, {w: i for i, w in enumerate(WORDS)})
    other = _saved_proxy(tmp_path / "other", [WORDS[0], WORDS[2], WORDS[1], *WORDS[3:]])
    with pytest.raises(InputError) as e:
        check_proxy_tokenizer(str(other), other, learner_tok)
    assert "\n" not in str(e.value)
    assert "its tokenizer is not the learner's (32 vs 32 tokens, 4 token/id pairs differ)" in str(
        e.value
    )


def _train_args(tmp_path: Path, *extra: str) -> argparse.Namespace:
    return build_parser().parse_args(
        ["train", "--out", str(tmp_path / "out"), "--seq-len", "32", "--vocab-size", "512",
         "--cache-dir", str(tmp_path / "cache"), *extra]
    )  # fmt: skip


def test_the_preflight_refuses_a_costly_proxy_a_foreign_tokenizer_and_a_plain_method(tmp_path):
    with pytest.raises(InputError, match=r"evolved_sampling.proxy_model 'gpt2-tiny' costs"):
        check_train_inputs(_train_args(tmp_path, "--scorer", "proxy", "--proxy-model", "gpt2-tiny"))
    with pytest.raises(ESConfigError, match="scorer 'proxy' does not fit method 'prune'"):
        check_train_inputs(_train_args(tmp_path, "--method", "prune", "--scorer", "proxy"))
    learner_tok = _tokenizer_dir(tmp_path / "tok", WORDS)
    other = _saved_proxy(tmp_path / "px", [WORDS[1], WORDS[0], *WORDS[2:]])
    with pytest.raises(InputError, match="its tokenizer is not the learner's"):
        check_train_inputs(
            _train_args(tmp_path, "--tokenizer", str(learner_tok), "--scorer", "proxy",
                        "--proxy-model", str(other))
        )  # fmt: skip
    # the same tokenizer passes (and so does the default proxy)
    same = _saved_proxy(tmp_path / "same", WORDS)
    check_train_inputs(
        _train_args(tmp_path, "--tokenizer", str(learner_tok), "--scorer", "proxy",
                    "--proxy-model", str(same))
    )  # fmt: skip
    check_train_inputs(_train_args(tmp_path, "--scorer", "proxy"))


# ------------------------------------------------------------------ the data path
def _dataset() -> datasets.Dataset:
    g = torch.Generator().manual_seed(7)
    return datasets.Dataset.from_dict({"input_ids": torch.randint(0, V, (N, T), generator=g)})


def _es(**kw):
    return _section(method="es", scorer="proxy", proxy_model="gpt2-nano", burn_in_steps=1, **kw)


def _proxy(es, comm: Communicator) -> ProxyScorer:
    return build_proxy_scorer(
        es, _learner(), comm=comm, micro_batch=4, seq_len=T, device="cpu", ds_config=DS, seed=3
    )


def _path(comm: Communicator | None = None, **kw) -> ESDataPath:
    comm = comm or Communicator()
    es = _es(**kw)
    plan = RunPlan.build(DS, es, dp_size=comm.size, num_samples=N, epochs=2, seed=3)
    return ESDataPath(plan, _dataset(), comm=comm, scorer=_proxy(es, comm))


def _train_loss(tokens: torch.Tensor) -> torch.Tensor:
    """A synthetic learner's per-sample training loss (the proxy learns from the tokens)."""
    return (tokens.double().mean(dim=1) * 0.07).sin().abs().float() + 0.5


def _run(dp: ESDataPath, steps: int | None = None) -> list[dict]:
    out = []
    while steps is None or len(out) < steps:
        draw = dp.next_step()
        if draw is None:
            break
        a = dp.assign(draw)
        for i in range(0, a.ids.numel(), 4):
            dp.observe_training_losses(a, a.ids[i : i + 4], _train_loss(a.tokens[i : i + 4]))
        rec = dp.finish_step(a)
        out.append({k: rec[k] for k in ("step", "epoch", "digest", "selected", "scored")})
    return out


def _params(dp: ESDataPath) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in dp.scorer.parameters()])


def test_the_proxy_scores_selection_steps_and_learns_every_step():
    dp = _path()
    before = _params(dp).clone()
    recs = _run(dp)
    assert len(recs) == dp.total_steps and any(r["scored"] for r in recs)
    assert dp.scorer.updates == len(recs)  # it learned from the trained rows of every step
    assert not torch.equal(before, _params(dp))
    t = dp.timers.state_dict()
    assert t["proxy_fwd_s"] > 0 and t["proxy_train_s"] > 0 and t["score_fwd_s"] == 0


def test_proxy_learn_none_keeps_the_proxy_fixed():
    dp = _path(proxy_learn="none")
    before = _params(dp).clone()
    _run(dp, 4)
    assert dp.scorer.updates == 0 and torch.equal(before, _params(dp))


def test_a_scorer_that_cannot_learn_is_refused():
    es = _es()
    plan = RunPlan.build(DS, es, dp_size=1, num_samples=N, epochs=2)
    with pytest.raises(ValueError, match="scorer proxy needs a scorer that learns"):
        ESDataPath(plan, _dataset(), comm=Communicator(), scorer=lambda tokens, ids: None)


@pytest.mark.parametrize("cut", [1, 4])
def test_state_dict_round_trip_continues_exactly_with_the_proxy(cut):
    ref_path = _path()
    ref = _run(ref_path)
    first = _path()
    head = _run(first, cut)
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)  # what the checkpoint's ES state file holds
    buf.seek(0)
    second = _path()
    second.load_state_dict(torch.load(buf, weights_only=True))
    assert head + _run(second) == ref
    assert torch.equal(_params(second), _params(ref_path))  # bit for bit
    assert second.scorer.updates == ref_path.scorer.updates


# ------------------------------------------------------------------ real gloo ranks
def _ranks(rank: int, world: int, port: int, out_dir: str) -> None:
    tdist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        comm = Communicator()
        # (1) one update over W ranks, each with its share of the same 8 rows
        proxy = _proxy(_es(), comm)
        rows = torch.tensor(_dataset()["input_ids"][:8])
        share = rows.shape[0] // world
        mine = rows[rank * share : (rank + 1) * share]
        proxy.learn(mine, None, torch.ones(mine.shape[0], dtype=torch.bool))
        # (2) a whole data path: every rank's proxy after every step
        dp = _path(comm)
        _run(dp)
        out = {
            "update": torch.cat([p.detach().reshape(-1) for p in proxy.parameters()]).tolist(),
            "path": _params(dp).tolist(),
            "updates": dp.scorer.updates,
        }
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(out))
        tdist.barrier()
    finally:
        tdist.destroy_process_group()


@pytest.mark.multiproc
def test_two_ranks_hold_one_proxy_whose_update_is_one_ranks_over_the_same_rows(tmp_path):
    mp.start_processes(
        _ranks, args=(2, free_port(), str(tmp_path)), nprocs=2, start_method="spawn", join=True
    )
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    # every rank takes the same step from the same all-reduced gradient: bit for bit equal
    assert r0["update"] == r1["update"] and r0["path"] == r1["path"]
    assert r0["updates"] == r1["updates"] > 0
    # the mean gradient over 2 ranks x 4 rows is one rank's over the 8 rows (float order aside)
    single = _proxy(_es(), Communicator())
    rows = torch.tensor(_dataset()["input_ids"][:8])
    single.learn(rows, None, torch.ones(8, dtype=torch.bool))
    one = torch.cat([p.detach().reshape(-1) for p in single.parameters()])
    torch.testing.assert_close(torch.tensor(r0["update"]), one, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ es-llm bench proxy
def test_bench_proxy_writes_the_costs_of_both_scorers(tmp_path):
    args = build_parser().parse_args(
        ["bench", "proxy", "--model", "gpt2-tiny", "--seq-len", "32", "--vocab-size", "512",
         "--batch", "8", "--micro-batch", "4", "--max-seconds", "0.5", "--out", str(tmp_path)]
    )  # fmt: skip
    from es_llm.tools.bench_proxy import run

    run(args)
    result = json.loads((tmp_path / "proxy_bench.json").read_text())
    assert result["proxy"]["proxy_model"] == "gpt2-nano" and result["dtype"] == "fp32"
    ms = result["per_sample_ms"]
    assert set(ms) == {"learner_score_ms", "learner_train_ms", "proxy_score_ms", "proxy_learn_ms"}
    assert all(v > 0 for v in ms.values()) and min(result["repeats"].values()) >= 3
    cost = result["scoring_cost_per_training_sample"]
    assert cost["proxy"] == pytest.approx(
        (ms["proxy_score_ms"] + 0.5 * ms["proxy_learn_ms"]) / ms["learner_train_ms"]
    )

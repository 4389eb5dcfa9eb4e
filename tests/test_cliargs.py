"""The shared command-line pieces: value parsers, the method list in --help and choices, and
the one function that builds `TrainOptions` from the flags of `train` and `compare`."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest

from es_llm.cli import build_parser
from es_llm.cliargs import options_from_args, parse_key_value, parse_method_list, positive_int
from es_llm.sampling.config import METHODS


def test_positive_int():
    assert positive_int("3") == 3
    for bad in ("0", "-2", "1.5", "x"):
        with pytest.raises(argparse.ArgumentTypeError):
            positive_int(bad)


def test_key_value_reads_json_values_and_keeps_other_text():
    assert parse_key_value("selection_ratio=0.75") == ("selection_ratio", 0.75)
    assert parse_key_value(" rescale =false") == ("rescale", False)
    assert parse_key_value("s_init=null") == ("s_init", None)
    assert parse_key_value("method=eswp") == ("method", "eswp")  # not JSON: the raw text
    assert parse_key_value("note=a=b") == ("note", "a=b")  # split at the first '='
    for bad in ("tau", "=1", ""):
        with pytest.raises(argparse.ArgumentTypeError, match="KEY=VALUE"):
            parse_key_value(bad)


def test_method_list():
    assert parse_method_list("uniform, es,prune") == ["uniform", "es", "prune"]
    for bad in ("uniform,bogus", "es,es", ",", "ES"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_method_list(bad)


def _help(*argv: str) -> str:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[argv[0]].format_help()


@pytest.mark.parametrize("command", ["train", "compare"])
def test_help_names_every_method(command):
    text = " ".join(_help(command).split())
    for method in METHODS:
        assert method in text


def test_train_method_choices_are_the_method_list():
    parser = build_parser()
    for method in METHODS:
        assert parser.parse_args(["train", "--method", method]).method == method
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--method", "greedy"])


def test_train_flags_become_options():
    args = build_parser().parse_args([
        "train", "--method", "eswp", "--config", "c.json", "--epochs", "3", "--max-steps", "7",
        "--es", "tau=2", "--es", "rescale=false", "--no-progress", "--save-every", "5",
        "--eval-every", "4", "--out", "runs/x", "--seq-len", "64", "--stop-after", "6",
    ])  # fmt: skip
    opts = options_from_args(args)
    assert opts.out == Path("runs/x") and opts.resume is False
    assert (opts.method, opts.config, opts.epochs, opts.max_steps) == ("eswp", "c.json", 3, 7)
    assert opts.es_overrides == {"tau": 2, "rescale": False}
    assert opts.progress is False and opts.save_every == 5 and opts.stop_after == 6
    assert (opts.eval_every, opts.seq_len) == (4, 64)
    resumed = options_from_args(build_parser().parse_args(["train", "--resume", "runs/old"]))
    assert resumed.out == Path("runs/old") and resumed.resume is True
    assert resumed.progress is True and resumed.es_overrides == {}


def test_compare_flags_become_the_same_options_with_defaults_for_train_only_flags():
    from es_llm.drivers.deepspeed.loop import TrainOptions

    args = build_parser().parse_args(
        ["compare", "--epochs", "4", "--es", "beta1=0.3", "--seed", "9", "--out", "runs/c"]
    )
    opts = options_from_args(args, method="es", out=Path("runs/c/es"), max_cpu_time_s=12.5)
    defaults = TrainOptions(out=Path("unused"))
    assert (opts.method, opts.out, opts.max_cpu_time_s) == ("es", Path("runs/c/es"), 12.5)
    assert (opts.epochs, opts.seed, opts.es_overrides) == (4, 9, {"beta1": 0.3})
    assert opts.max_val_samples == 128  # compare's own default
    for name in ("save_every", "stop_after", "resume", "max_wall_clock_s"):
        assert getattr(opts, name) == getattr(defaults, name)
    # the options round-trip through the JSON a compare child reads
    assert TrainOptions(**dataclasses.asdict(opts)) == opts


@pytest.mark.parametrize("command", ["train", "compare"])
def test_val_share_flag_becomes_the_option(command):
    from es_llm.drivers.deepspeed.loop import TrainOptions

    parser = build_parser()
    default = options_from_args(parser.parse_args([command, "--out", "runs/v"]))
    assert default.val_share == 0.05 == TrainOptions(out=Path("x")).val_share
    opts = options_from_args(parser.parse_args([command, "--out", "runs/v", "--val-share", "0.2"]))
    assert opts.val_share == 0.2
    assert TrainOptions(**dataclasses.asdict(opts)) == opts  # what a compare child reads
    assert "--val-share" in _help(command)


@pytest.mark.parametrize(
    ("command", "value"), [("train", "0.7"), ("train", "0"), ("compare", "abc"), ("compare", "-1")]
)
def test_a_bad_val_share_is_one_line_before_anything_is_built(command, value, tmp_path):
    from conftest import run_cli

    cache = tmp_path / "cache"
    args = [command, "--val-share", value, "--out", str(tmp_path / "out"), "--no-progress"]
    r = run_cli([*args, "--cache-dir", str(cache)], cache, timeout=120)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("es-llm: error: --val-share must be"), lines
    assert value in lines[0]
    assert not cache.exists() or not any(cache.rglob("meta.json"))

"""`es-llm compare --seeds N`: the spread over seeds and the no-difference rule on numbers with
known answers, the per-seed layout and compare.json of a comparison whose runs' summaries are
given, the flag's bad input, and one tiny real `--seeds 2` comparison."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
from conftest import TINY_RUN_ARGS, run_cli
from test_compare import _ok, _summary, check_compare_png

from es_llm.tools.compare.metrics import MATCHED, grid_summary
from es_llm.tools.compare.seeds import (
    HIGHER,
    LOWER,
    NO_SPREAD,
    SAME,
    TOO_FEW,
    difference,
    seed_list,
    seeds_block,
    spread,
)


# ----------------------------------------------------------------------------- statistics
def test_spread_is_the_sample_standard_deviation_of_the_seeds_with_a_value():
    s = spread([1.0, 2.0, 6.0])
    assert (s["n"], s["mean"], s["min"], s["max"]) == (3, 3.0, 1.0, 6.0)
    assert s["sd"] == pytest.approx(math.sqrt(((1 - 3) ** 2 + (2 - 3) ** 2 + (6 - 3) ** 2) / 2))
    missing = spread([2.0, None, 4.0, math.nan])  # the target not reached at two seeds
    assert (missing["n"], missing["mean"]) == (2, 3.0)
    assert missing["sd"] == pytest.approx(math.sqrt(2.0))
    assert missing["values"][:3] == [2.0, None, 4.0]
    one = spread([5.0])
    assert (one["n"], one["mean"], one["sd"]) == (1, 5.0, None)
    assert spread([None])["mean"] is None


def test_no_difference_rule_holds_the_gap_against_the_larger_spread():
    def agg(mean: float, sd: float | None, n: int = 3) -> dict:
        return {"mean": mean, "sd": sd, "n": n}

    # |5.30 - 5.00| = 0.30 <= max(0.1, 0.35): no difference, although the means differ
    d = difference(agg(5.30, 0.1), agg(5.00, 0.35), "best_val_loss", 3)
    assert d["verdict"] == SAME and d["diff"] == pytest.approx(0.30) and d["spread"] == 0.35
    assert d["better"] is None
    # 0.30 > max(0.1, 0.2): a loss higher than the baseline's is worse
    d = difference(agg(5.30, 0.1), agg(5.00, 0.2), "best_val_loss", 3)
    assert (d["verdict"], d["better"]) == (HIGHER, False)
    # exactly at the spread: still no difference
    assert difference(agg(1.5, 0.5), agg(1.0, 0.0), "final_val_loss", 2)["verdict"] == SAME
    # a lower share of uniform's time is better; a higher speedup is better
    d = difference(agg(0.5, 0.05), agg(1.0, 0.0), "time_to_target_ratio", 3)
    assert (d["verdict"], d["better"]) == (LOWER, True)
    d = difference(agg(2.0, 0.1), agg(1.0, 0.0), "speedup", 3)
    assert (d["verdict"], d["better"]) == (HIGHER, True)
    # one seed: no spread, never a verdict, however large the gap
    d = difference(agg(9.0, None, 1), agg(1.0, None, 1), "best_val_loss", 1)
    assert (d["verdict"], d["better"], d["diff"]) == (NO_SPREAD, None, 8.0)
    # several seeds but one value on a side (the target reached once): not decided
    d = difference(agg(0.4, None, 1), agg(1.0, 0.0), "time_to_target_ratio", 3)
    assert (d["verdict"], d["better"]) == (TOO_FEW, None)


def _methods(es_best: float, m_best: float, es_ratio: float | None) -> dict:
    rec = {"best_val_loss": 5.0, "final_val_loss": 5.1, "time_to_target_ratio": 1.0}
    return {
        "uniform": rec,
        "es": {**rec, "best_val_loss": es_best, "time_to_target_ratio": es_ratio},
        MATCHED: {**rec, "best_val_loss": m_best},
    }


def test_seeds_block_compares_every_method_with_uniform_and_uniform_matched():
    per_seed = [_methods(5.2, 5.0, 0.5), _methods(5.3, 5.2, 0.6), _methods(5.25, 5.1, None)]
    block = seeds_block([7, 8, 9], per_seed)
    assert block["seeds"] == [7, 8, 9] and block["spread"] == "sample standard deviation"
    assert "max(sd_a, sd_b)" in block["rule"]
    es = block["aggregates"]["es"]
    assert es["best_val_loss"]["mean"] == pytest.approx(5.25)
    assert es["time_to_target_ratio"]["n"] == 2  # not reached at seed 9
    diffs = block["differences"]
    assert set(diffs["es"]) == {"uniform", MATCHED}
    assert set(diffs["uniform"]) == {MATCHED} and set(diffs[MATCHED]) == {"uniform"}
    # es 5.25 +- 0.05 vs uniform 5.0 +- 0: 0.25 > 0.05, worse
    assert diffs["es"]["uniform"]["best_val_loss"]["verdict"] == HIGHER
    # es vs uniform-matched 5.1 +- 0.1: 0.15 > 0.1, worse
    assert diffs["es"][MATCHED]["best_val_loss"]["verdict"] == HIGHER
    # the same final loss at every seed: no difference (0 <= 0)
    assert diffs["es"]["uniform"]["final_val_loss"]["verdict"] == SAME
    # es at 0.5 and 0.6 of uniform's time: 0.45 below 1.0 with spread 0.07
    assert diffs["es"]["uniform"]["time_to_target_ratio"]["better"] is True
    one = seeds_block([0], per_seed[:1])
    assert one["differences"]["es"]["uniform"]["best_val_loss"]["verdict"] == NO_SPREAD


def test_seed_list_and_grid_summary_with_seeds():
    assert seed_list(3, 3) == [3, 4, 5] and seed_list(0, 1) == [0]
    with pytest.raises(ValueError):
        seed_list(0, 0)
    from es_llm.tools.compare.report import grid_markdown

    base = {"final_val_loss": 4.0, "wall_clock_s": 10.0, "cpu_time_s": 20.0,
            "final_val_loss_vs_target_pct": 0.0, "final_val_loss_vs_matched": None,
            "time_to_target_ratio": None}  # fmt: skip
    seeded = {"target_val_loss": 4.0, "methods": {"uniform": base, "es": base},
              "seeds": seeds_block([0, 1], [_methods(5.2, 5.0, 0.5), _methods(5.4, 5.4, 0.6)])}  # fmt: skip
    plain = {"target_val_loss": 4.0, "methods": {"uniform": base, "es": base},
             "seeds": seeds_block([0], [_methods(5.2, 5.0, 0.5)])}  # fmt: skip
    g = grid_summary({1: seeded, 2: plain})
    assert g["epochs"]["1"]["seeds"] == [0, 1] and "seeds" not in g["epochs"]["2"]
    assert g["epochs"]["1"]["seed_differences"]["es"]["uniform"]["best_val_loss"]["verdict"] == (
        HIGHER
    )
    md = grid_markdown(g)
    row = next(line for line in md.splitlines() if line.startswith("| 1 | es |"))
    assert row.endswith("vs uniform: +0.3000: higher (worse); vs uniform-matched: +0.1000: "
                        "no difference |")  # fmt: skip
    assert "best val loss over the seeds" in md.splitlines()[0]


# ----------------------------------------------------------------------------- the flag
def test_seeds_flag_parses_and_refuses_bad_counts_in_one_line(capsys):
    from es_llm.cli import build_parser

    parser = build_parser(["compare"])
    assert parser.parse_args(["compare"]).seeds == 1
    assert parser.parse_args(["compare", "--seeds", "3"]).seeds == 3
    for bad in ("0", "-2", "1.5", "two"):
        with pytest.raises(SystemExit) as e:
            parser.parse_args(["compare", "--seeds", bad])
        assert e.value.code == 2
        err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
        assert err == [
            f"es-llm compare: error: argument --seeds: expected a positive integer, got "
            f"{bad if bad.lstrip('-').isdigit() else repr(bad)}"
        ]
    with pytest.raises(SystemExit):
        parser.parse_args(["compare", "--help"])
    helptext = " ".join(capsys.readouterr().out.split())
    assert "--seeds N" in helptext and "sample standard deviation" in helptext


def test_header_counts_every_seed(tmp_path):
    from es_llm.cli import build_parser
    from es_llm.tools.compare.cli import header

    args = build_parser().parse_args(
        ["compare", "--methods", "uniform,es", "--seeds", "3", "--seed", "5", "--repeats", "2"]
    )
    h = header(args, 256, tmp_path)
    assert h.startswith(
        "es-llm compare: 18 runs (uniform, es, uniform-matched x 2 rounds x 3 seeds 5, 6, 7)"
    )


# ----------------------------------------------------------------------------- layout
def _fake_compare(tmp_path, monkeypatch, tiny_ds_config, flags: list[str]):
    """compare_seeds from the flags to compare.json/md/png, each run's training replaced by a
    summary whose numbers depend on the seed (es: 4 + seed s of training, best loss 3.9 + s/10;
    uniform: 10 s, best 4.0): the real runs are the end-to-end test's."""
    from es_llm.cli import build_parser
    from es_llm.tools.compare import runner
    from es_llm.tools.compare.cli import compare_seeds

    args = build_parser().parse_args(
        ["compare", "--config", str(tiny_ds_config()), "--methods", "uniform,es", "--epochs",
         "1", "--out", str(tmp_path), *flags]
    )  # fmt: skip
    calls: list[tuple[int, str, str, str]] = []

    def fake_run_one(base, spec, where, *, world, quiet, label):
        calls.append((base.seed, spec.name, str(where.relative_to(tmp_path)), label))
        s = base.seed
        if spec.method == "uniform":
            t, best = (spec.max_wall_clock_s or 10.0), 4.0
        else:
            t, best = 4.0 + s, 3.9 + s / 10
        run = _summary(spec.method, best + 0.05, t, [(0, 8.0), (t / 2, best), (t, best + 0.05)])
        run["threads_per_rank"] = 1
        run["conditions"] = {"calibration_s": 0.01, "load_average_mean": 1.0}
        run["spec"] = {"max_wall_clock_s": spec.max_wall_clock_s}
        return run

    monkeypatch.setattr(runner, "run_one", fake_run_one)
    corpus = SimpleNamespace(train=list(range(256)), val=list(range(32)), composition=None)
    return compare_seeds(args, tmp_path, "es-llm compare --seeds", corpus), calls


def test_several_seeds_run_in_their_own_folders_and_report_mean_spread_and_verdicts(
    tmp_path, monkeypatch, tiny_ds_config, capsys
):
    result, calls = _fake_compare(tmp_path, monkeypatch, tiny_ds_config, ["--seeds", "3"])
    assert [c[:3] for c in calls] == [
        (s, name, f"seed_{s}") for s in (0, 1, 2) for name in ("uniform", "es", MATCHED)
    ]
    assert [c[3] for c in calls[:4]] == ["[1/9, seed 0]", "[2/9, seed 0]", "[3/9, seed 0]",
                                          "[4/9, seed 1]"]  # fmt: skip
    out = capsys.readouterr().out
    assert "== seed 1 (2/3)" in out and "## Seeds" in out
    # each seed a complete comparison of its own; uniform-matched got that seed's es time
    for s in (0, 1, 2):
        own = json.loads((tmp_path / f"seed_{s}" / "compare.json").read_text())
        assert own["seed"] == s and own["methods"][MATCHED]["budget_s"] == 4.0 + s
        assert (tmp_path / f"seed_{s}" / "compare.md").exists()
    saved = json.loads((tmp_path / "compare.json").read_text())
    assert saved["seeds"]["seeds"] == [0, 1, 2] and saved["seed"] == 0
    assert [p["seed"] for p in saved["per_seed"]] == [0, 1, 2]
    assert [p["methods"][MATCHED]["budget_s"] for p in saved["per_seed"]] == [4.0, 5.0, 6.0]
    assert saved["per_seed"][1]["run_dir"] == "seed_1"
    # "methods" keeps its shape: the medians over the seeds, run_dir under the seed's folder
    es = saved["methods"]["es"]
    assert es["wall_clock_s"] == 5.0 and es["seeds"] == 3 and es["run_dir"] == "seed_1/es"
    assert es["per_seed"]["wall_clock_s"] == [4.0, 5.0, 6.0]
    agg = saved["seeds"]["aggregates"]["es"]
    assert agg["best_val_loss"]["mean"] == pytest.approx(4.0)  # 3.9, 4.0, 4.1
    assert agg["best_val_loss"]["sd"] == pytest.approx(0.1)
    diffs = saved["seeds"]["differences"]["es"]
    assert diffs["uniform"]["best_val_loss"]["verdict"] == SAME  # 0 <= 0.1
    # es reached uniform's 4.0 at seeds 0 (best 3.9) and 1 (best 4.0), not at 2 (best 4.1)
    assert agg["time_to_target_ratio"]["n"] == 2
    assert set(saved["conditions"]) == {
        f"{n} [seed {s}]" for s in (0, 1, 2) for n in ("uniform", "es", MATCHED)
    }
    md = (tmp_path / "compare.md").read_text()
    assert "medians over 3 seeds" in md and md.index("## Seeds") < md.index("## Results")
    assert "- es vs uniform: best val loss no difference;" in md
    assert "| es | 4.0000 ± 0.1000 | 4.0500 ± 0.1000 |" in md
    assert "(2 of 3 seeds)" in md
    check_compare_png(tmp_path / "compare.png", 3)


def test_seeds_and_repeats_combine_one_seed_keeps_todays_layout(
    tmp_path, monkeypatch, tiny_ds_config
):
    both, calls = _fake_compare(
        tmp_path / "both", monkeypatch, tiny_ds_config, ["--seeds", "2", "--repeats", "2"]
    )
    assert {c[2] for c in calls} == {f"seed_{s}/round_{r}" for s in (0, 1) for r in (1, 2)}
    assert len(calls) == 12 and calls[-1][3] == "[12/12, seed 1]"
    assert [(rd["seed"], rd["methods"]["es"]["run_dir"]) for rd in both["rounds"]] == [
        (0, "seed_0/round_1/es"), (0, "seed_0/round_2/es"),
        (1, "seed_1/round_1/es"), (1, "seed_1/round_2/es"),
    ]  # fmt: skip
    assert both["methods"]["es"]["rounds"] == 2 and both["methods"]["es"]["seeds"] == 2
    one, calls = _fake_compare(tmp_path / "one", monkeypatch, tiny_ds_config, ["--quiet"])
    assert {c[2] for c in calls} == {"."} and [c[3] for c in calls][0] == "[1/3]"
    assert not list((tmp_path / "one").glob("seed_*"))
    assert one["seeds"]["seeds"] == [0] and one["per_seed"][0]["run_dir"] == "."
    assert one["methods"]["es"]["run_dir"] == "es" and "seeds" not in one["methods"]["es"]
    md = (tmp_path / "one" / "compare.md").read_text()
    assert "One seed (0): there is no spread" in md and "## Seeds" not in md


# ----------------------------------------------------------------------------- end to end
@pytest.mark.multiproc
def test_compare_with_two_seeds_end_to_end(tmp_path, es_cache, tiny_ds_config):
    """Two real seeds of uniform alone: different losses, both in their folders."""
    out = tmp_path / "o"
    proc = run_cli(["compare", "--config", str(tiny_ds_config()), "--methods", "uniform",
                    "--no-matched", "--seeds", "2", "--seed", "3", "--max-steps", "1",
                    "--epochs", "1", "--out", str(out), *TINY_RUN_ARGS],
                   es_cache, timeout=600)  # fmt: skip
    _ok(proc)
    result = json.loads((out / "compare.json").read_text())
    assert [p["seed"] for p in result["per_seed"]] == [3, 4]
    finals = [p["methods"]["uniform"]["final_val_loss"] for p in result["per_seed"]]
    assert finals[0] != finals[1]  # the seeds trained differently
    for s in (3, 4):
        spec = json.loads((out / f"seed_{s}" / "uniform" / "run_spec.json").read_text())
        assert spec["options"]["seed"] == s
    agg = result["seeds"]["aggregates"]["uniform"]["final_val_loss"]
    assert agg["n"] == 2 and agg["sd"] > 0
    assert "[1/2, seed 3]" in proc.stdout and "[2/2, seed 4]" in proc.stdout

"""`es-llm compare`: metrics, planning and report on constructed inputs with known answers, and
the harness end to end on a tiny setting (real processes; no assertion on timing values)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math

import numpy as np
import pytest
from conftest import TINY_RUN_ARGS, StartedCli, run_cli, write_ds_config

from es_llm.errors import InputError
from es_llm.sampling.config import METHODS
from es_llm.tools.compare.cli import DEFAULT_METHODS, parse_grid, parse_variant
from es_llm.tools.compare.metrics import (
    MATCHED,
    comparison_methods,
    grid_summary,
    method_record,
    time_to_target,
)
from es_llm.tools.compare.planning import (
    Variant,
    eval_every,
    match_reference,
    matched_spec,
    matched_steps,
    plan_runs,
    planned_steps,
    variants,
)


def _hist(points: list[tuple[float, float]]) -> list[dict]:
    return [{"wall_clock_s": t, "cpu_time_s": 2 * t, "val_loss": v} for t, v in points]


# ----------------------------------------------------------------------------- metrics
def test_time_to_target_interpolates_between_the_evaluations_around_the_crossing():
    h = _hist([(0, 8.0), (10, 6.0), (20, 4.0), (30, 3.0)])
    assert time_to_target(h, 5.0) == pytest.approx(15.0)
    assert time_to_target(h, 5.0, "cpu_time_s") == pytest.approx(30.0)
    assert time_to_target(h, 4.0) == pytest.approx(20.0)  # exactly on an evaluation
    assert time_to_target(h, 3.5) == pytest.approx(25.0)
    # a crossing a quarter of the way down a segment
    assert time_to_target(_hist([(0, 8.0), (40, 4.0)]), 7.0) == pytest.approx(10.0)


def test_time_to_target_is_none_when_never_reached():
    assert time_to_target(_hist([(0, 8.0), (10, 6.0), (20, 5.5)]), 5.0) is None
    assert time_to_target([], 5.0) is None


def test_time_to_target_takes_the_first_crossing_and_skips_missing_losses():
    h = _hist([(0, 8.0), (10, 4.0), (20, 6.0), (30, 4.5)])
    h.insert(1, {"wall_clock_s": 5, "cpu_time_s": 10, "val_loss": None})
    h.insert(2, {"wall_clock_s": 6, "cpu_time_s": 12, "val_loss": math.nan})
    assert time_to_target(h, 5.0) == pytest.approx(7.5)
    # already at the target at the first evaluation
    assert time_to_target(_hist([(0, 4.0), (10, 3.0)]), 5.0) == 0.0


def _summary(method: str, final: float, wall: float, hist: list[tuple[float, float]]) -> dict:
    return {
        "method": method,
        "wall_clock_s": wall,
        "cpu_time_s": wall * 2,
        "steps": 10,
        "epochs": 1,
        "bp_samples": 320,
        "scored_samples": 640 if method == "es" else 0,
        "final_val_loss": final,
        "val_history": _hist(hist),
        "time_breakdown_s": {"score_fwd_s": 2.0 if method == "es" else 0.0, "select_s": 0.05,
                             "train_fwd_bwd_s": 6.0, "optimizer_s": 1.0},
    }  # fmt: skip


def test_method_record_reports_target_ratios_and_the_efficiency_limits():
    u = method_record(_summary("uniform", 4.0, 10.0, [(0, 8), (10, 4.0)]), [], 4.0, None)
    steps = [{"phase": "burn_in", "step_s": 1.0}] + [{"phase": "select", "step_s": 1.0}] * 9
    es = method_record(_summary("es", 3.9, 9.5, [(0, 8), (5, 4.0), (9.5, 3.9)]), steps, 4.0, u)
    assert es["time_to_target_s"] == pytest.approx(5.0)
    assert es["time_to_target_ratio"] == pytest.approx(0.5)
    assert es["time_to_target_cpu_ratio"] == pytest.approx(0.5)
    assert es["meets_issue_target"] is True
    # 2 s for 640 scored samples vs 6 s for 320 back-propagated ones
    assert es["scoring_cost_ratio"] == pytest.approx((2 / 640) / (6 / 320))
    assert es["bookkeeping_share"] == pytest.approx(0.05 / 9)
    assert es["time_breakdown_s"]["other_s"] == pytest.approx(9.5 - 9.05)
    assert es["final_val_loss_vs_target_pct"] == pytest.approx(-2.5)
    # uniform never reached es's final loss 3.9
    assert es["uniform_time_to_own_loss_s"] is None and es["speedup_vs_uniform"] is None
    slow = method_record(_summary("es", 4.2, 9.0, [(0, 8), (9, 4.2)]), steps, 4.0, u)
    assert slow["time_to_target_s"] is None and slow["meets_issue_target"] is False
    # uniform's curve 8 -> 4 over 10 s passes 4.2 at 9.5 s; this run took 9 s
    assert slow["uniform_time_to_own_loss_s"] == pytest.approx(9.5)
    assert slow["speedup_vs_uniform"] == pytest.approx(9.5 / 9.0)


def test_a_run_just_outside_the_issue_target_does_not_meet_it():
    u = method_record(_summary("uniform", 4.0, 10.0, [(0, 8), (10, 4.0)]), [], 4.0, None)
    # reaches the target at 7 s: 0.7 x uniform's time, more than the goal of 0.6
    late = method_record(_summary("es", 3.9, 9.0, [(0, 8), (7, 4.0), (9, 3.9)]), [], 4.0, u)
    assert late["time_to_target_ratio"] == pytest.approx(0.7)
    assert late["meets_issue_target"] is False


def test_comparison_methods_targets_uniforms_final_loss_and_compares_with_matched():
    summaries = {
        "uniform": _summary("uniform", 4.0, 10.0, [(0, 8.0), (10, 4.0)]),
        "es": _summary("es", 3.8, 10.0, [(0, 8.0), (4, 5.0), (6, 3.0), (10, 3.8)]),
        MATCHED: _summary("uniform", 4.1, 10.0, [(0, 8.0), (10, 4.1)]),
    }
    methods = comparison_methods(summaries, {}, matched_to="es")
    assert set(methods) == {"uniform", "es", MATCHED}
    # uniform's own curve reaches 4.0 only at its last evaluation
    assert methods["uniform"]["time_to_target_s"] == pytest.approx(10.0)
    assert methods["es"]["time_to_target_s"] == pytest.approx(5.0)  # halfway from 5.0 to 3.0
    assert methods["es"]["final_val_loss_vs_matched"] == pytest.approx(3.8 - 4.1)
    assert methods[MATCHED]["matched_to"] == "es"
    assert "final_val_loss_vs_matched" not in methods["uniform"]
    assert "final_val_loss_vs_matched" not in methods[MATCHED]
    plain = comparison_methods({k: summaries[k] for k in ("uniform", "es")}, {})
    assert "final_val_loss_vs_matched" not in plain["es"]


def test_grid_summary_from_synthetic_comparisons():
    def res(final_prune: float, uniform_wall: float) -> dict:
        base = {"final_val_loss": 4.0, "wall_clock_s": uniform_wall, "cpu_time_s": 20.0}
        return {
            "target_val_loss": 4.0,
            "methods": {"uniform": base, "prune": {**base, "final_val_loss": final_prune}},
        }

    g = grid_summary({1: res(4.1, 10.0), 3: res(3.9, 30.0)})
    assert list(g["epochs"]) == ["1", "3"]
    assert g["epochs"]["3"]["methods"]["prune"]["final_val_loss"] == 3.9
    assert g["epochs"]["1"]["methods"]["prune"]["final_val_loss"] == 4.1
    assert g["epochs"]["3"]["uniform_wall_clock_s"] == 30.0
    assert set(g["epochs"]["1"]["methods"]) == {"prune"}  # uniform is the reference, no row
    assert g["epochs"]["1"]["methods"]["prune"]["time_to_target_ratio"] is None  # not given


# ----------------------------------------------------------------------------- planning
def test_matched_steps_fit_the_budget_at_uniforms_step_time():
    # uniform: 100 steps in 50 s -> 0.5 s a step
    assert matched_steps(20.0, 50.0, 100) == 40
    assert matched_steps(33.3, 50.0, 100) == 67
    assert matched_steps(80.0, 50.0, 100) == 160  # a longer budget: more steps than uniform
    assert matched_steps(0.1, 50.0, 100) == 1


def test_matched_spec_budgets_uniform_by_the_reference_runs_clock():
    uniform = {"wall_clock_s": 50.0, "cpu_time_s": 100.0, "steps": 100}
    es = {"wall_clock_s": 30.0, "cpu_time_s": 25.0}
    wall = matched_spec(uniform, es, clock="wall", epochs=3, requested_eval_every=None)
    assert (wall.name, wall.method, wall.epochs, wall.es_overrides) == (MATCHED, "uniform", 3, {})
    assert (wall.max_steps, wall.eval_every) == (60, 3)  # 30 s at 0.5 s a step; 60 // 20
    assert (wall.max_wall_clock_s, wall.max_cpu_time_s) == (30.0, None)
    cpu = matched_spec(uniform, es, clock="cpu", epochs=3, requested_eval_every=7)
    assert (cpu.max_steps, cpu.eval_every) == (25, 7)  # 25 CPU s at 1 CPU s a step
    assert (cpu.max_wall_clock_s, cpu.max_cpu_time_s) == (None, 25.0)


def test_matched_spec_gives_a_longer_budget_its_steps_and_the_epochs_to_hold_them():
    # the reference took longer than uniform (104.4 s vs 91.6 s for 240 steps in 3 epochs):
    # uniform-matched must train 104.4 s, not stop at uniform's 240 steps
    uniform = {"wall_clock_s": 91.6, "cpu_time_s": 90.0, "steps": 240}
    es = {"wall_clock_s": 104.4, "cpu_time_s": 100.0}
    spec = matched_spec(uniform, es, clock="wall", epochs=3, requested_eval_every=None)
    assert spec.max_steps == round(104.4 / (91.6 / 240))  # 274, its LR schedule's length
    assert spec.epochs == 4  # 274 steps at 80 a epoch
    assert spec.max_wall_clock_s == 104.4
    short = matched_spec(
        uniform, {"wall_clock_s": 45.8}, clock="wall", epochs=3, requested_eval_every=None
    )
    assert (short.max_steps, short.epochs) == (120, 3)


def test_plan_runs_plans_every_run_before_any_starts(tiny_ds_config):
    cfg = str(tiny_ds_config())
    runs = variants(["es"], [Variant("es-b4", "es", {"burn_in_steps": 4})])
    kw = {"n_train": 256, "world": 1, "epochs": 1, "max_steps": None}
    specs = plan_runs(cfg, runs, {"burn_in_steps": 0}, requested_eval_every=None, **kw)
    assert [(s.name, s.method, s.eval_every) for s in specs] == [
        ("uniform", "uniform", 1),  # 32 steps -> every 1
        ("es", "es", 1),
        ("es-b4", "es", 1),
    ]
    assert specs[2].es_overrides == {"burn_in_steps": 4}
    bad = [*runs, Variant("bad", "es", {"selection_ratio": 3})]
    with pytest.raises(InputError, match="selection_ratio"):
        plan_runs(cfg, bad, {}, requested_eval_every=None, **kw)


def test_eval_every_spaces_about_twenty_evaluations_unless_given():
    assert eval_every(None, 200) == 10
    assert eval_every(None, 7) == 1
    assert eval_every(3, 200) == 3


@pytest.mark.parametrize(
    ("method", "overrides", "epochs", "world", "n_train", "expected"),
    [
        ("uniform", {}, 1, 1, 256, 32),  # 256 / B=8
        # 4 burn-in steps of B=8, then 224 / B_meta=16 = 14 selection steps
        ("es", {"burn_in_steps": 4}, 1, 1, 256, 18),
        # epochs 1..3 pruned (anneal epoch ceil(0.875 * 4) = 4): 32 + 3 * (217 // 8)
        ("prune", {}, 4, 1, 256, 113),
        ("uniform", {}, 4, 1, 256, 128),
        # two ranks: shards of 129 and 128, the smaller one paces the run (128 / 4)
        ("uniform", {}, 1, 2, 257, 32),
        ("es", {"burn_in_steps": 0}, 1, 2, 257, 16),
    ],
)
def test_planned_steps_count_burn_in_and_pruning(
    tiny_ds_config, method, overrides, epochs, world, n_train, expected
):
    steps = planned_steps(
        str(tiny_ds_config()), Variant(method, method), overrides, n_train=n_train, world=world,
        epochs=epochs, max_steps=None,
    )  # fmt: skip
    assert steps == expected


def test_planned_steps_respect_max_steps_and_variant_overrides(tiny_ds_config):
    cfg = str(tiny_ds_config())
    kw = {"n_train": 256, "world": 1, "epochs": 4}
    assert planned_steps(cfg, Variant("u", "uniform"), {}, max_steps=50, **kw) == 50
    # the variant's own override wins over the shared --es value
    v = Variant("es-b4", "es", {"burn_in_steps": 4})
    assert planned_steps(cfg, v, {"burn_in_steps": 0}, max_steps=None, **{**kw, "epochs": 1}) == 18


def test_variants_put_uniform_first_and_reject_duplicate_names():
    runs = variants(["es", "prune"], [Variant("es-r8", "es", {"selection_ratio": 0.8})])
    assert [v.name for v in runs] == ["uniform", "es", "prune", "es-r8"]
    assert [v.name for v in variants(["prune", "uniform"], [])] == ["uniform", "prune"]
    with pytest.raises(InputError, match="duplicate run names"):
        variants(["es"], [Variant("x", "es"), Variant("x", "eswp")])


def test_match_reference_prefers_es_then_the_first_other_run():
    runs = variants(["uniform", "prune", "es"], [])
    assert match_reference(runs, None) == "es"
    assert match_reference(variants(["prune", "eswp"], []), None) == "prune"
    assert match_reference(runs, "prune") == "prune"
    assert match_reference(runs, None, enabled=False) is None
    assert match_reference(variants(["uniform"], []), None) is None
    with pytest.raises(InputError, match="--match 'topk'"):
        match_reference(runs, "topk")


def test_run_options_change_the_shared_options_per_run(tmp_path):
    from es_llm.drivers.deepspeed.loop import TrainOptions
    from es_llm.tools.compare.planning import RunSpec
    from es_llm.tools.compare.runner import run_options

    base = TrainOptions(out=tmp_path, seed=5, es_overrides={"beta1": 0.3, "tau": 2.0})
    spec = RunSpec(MATCHED, "uniform", {"tau": 0.5}, 3, 4, max_steps=40, max_cpu_time_s=9.0)
    opts = run_options(base, spec, tmp_path / "cmp")
    assert opts.out == tmp_path / "cmp" / MATCHED and opts.progress is False
    assert (opts.method, opts.epochs, opts.eval_every, opts.max_steps) == ("uniform", 3, 4, 40)
    assert (opts.max_cpu_time_s, opts.max_wall_clock_s, opts.seed) == (9.0, None, 5)
    assert opts.es_overrides == {"beta1": 0.3, "tau": 0.5}  # the run's own override wins


# ----------------------------------------------------------------------------- command line
def test_parsers_reject_unknown_methods_and_malformed_variants():
    v = parse_variant("es-r80:es:selection_ratio=0.8,tau=2,importance_weighting=false")
    assert (v.name, v.method) == ("es-r80", "es")
    assert v.overrides == {"selection_ratio": 0.8, "tau": 2, "importance_weighting": False}
    assert parse_variant("plain:uniform").overrides == {}
    for bad in ("es-x", "x:nomethod", "es:es:tau=1", "x:es:tau", f"{MATCHED}:uniform"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_variant(bad)
    assert parse_grid("1,3,16") == [1, 3, 16]
    for bad in ("1,0", "a,2", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_grid(bad)


def test_default_methods_are_known_and_start_with_uniform():
    assert DEFAULT_METHODS[0] == "uniform"
    assert set(DEFAULT_METHODS) <= set(METHODS)


def test_compare_command_line_takes_every_configured_method():
    from es_llm.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["compare", "--methods", ",".join(METHODS)])
    assert args.methods == list(METHODS)
    assert parser.parse_args(["compare"]).methods == list(DEFAULT_METHODS)


# ----------------------------------------------------------------------------- report
def _result() -> dict:
    summaries = {
        "uniform": _summary("uniform", 4.0, 10.0, [(0, 8.0), (5, 5.0), (10, 4.0)]),
        "es": _summary("es", 3.8, 10.0, [(0, 8.0), (4, 5.0), (6, 3.0), (10, 3.8)]),
        MATCHED: _summary("uniform", 4.1, 10.0, [(0, 8.0), (5, 5.2), (10, 4.1)]),
    }
    machine = {"cpu": "test cpu", "cpu_count": 2, "threads_per_rank": 2, "torch": "t",
               "deepspeed": "d", "date": "today", "load_average_start": [0.5],
               "load_average_end": [0.7]}  # fmt: skip
    return {
        "methods": comparison_methods(summaries, {}, matched_to="es"),
        "target_val_loss": 4.0,
        "epochs": 1,
        "train_samples": 256,
        "world_size": 1,
        "model": "gpt2-tiny",
        "machine": machine,
        "command": "es-llm compare --epochs 1",
    }


def test_markdown_report_has_one_row_per_run_with_its_numbers():
    from es_llm.tools.compare.report import markdown_report

    md = markdown_report(_result())
    rows = [line for line in md.splitlines() if line.startswith("| es |")]
    assert len(rows) == 2  # the results table and the time breakdown
    assert "| 3.8000 | -5.00% | -0.3000 |" in rows[0]
    assert md.count("| uniform-matched |") == 2
    assert "Target: uniform's final validation loss 4.0000" in md
    assert "2 threads per rank" in md and "`es-llm compare --epochs 1`" in md


def _line_colours(image: np.ndarray) -> set[tuple[int, int, int]]:
    rgb = (image[..., :3] * 255).round().astype(int).reshape(-1, 3)
    return {tuple(c) for c in np.unique(rgb, axis=0)}


def check_compare_png(path, n_runs: int) -> None:
    """The plot: its size, the line colour of every run on both axes, non-blank panels."""
    import matplotlib.image as mpimg
    from matplotlib import colors, rcParams

    image = mpimg.imread(path)
    assert image.shape[:2] == (495, 1320)  # 12 x 4.5 in at 110 dpi
    cycle = [colors.to_rgb(c) for c in rcParams["axes.prop_cycle"].by_key()["color"]]
    wanted = [tuple(round(255 * x) for x in c) for c in cycle[:n_runs]]
    rgb = (image[..., :3] * 255).round().astype(int)
    half = rgb.shape[1] // 2
    for panel in (rgb[:, :half], rgb[:, half:]):
        present = {tuple(c) for c in np.unique(panel.reshape(-1, 3), axis=0)}
        for colour in wanted:
            assert colour in present, f"no line in colour {colour}"
        # a non-blank panel: many pixels differ from the white background
        assert (panel.reshape(-1, 3) != 255).any(axis=1).mean() > 0.02
    assert len(_line_colours(image)) > 20


def test_plot_draws_one_coloured_curve_per_run_on_both_clocks(tmp_path):
    from es_llm.tools.compare.report import plot_comparison

    result = _result()
    plot_comparison(result, tmp_path / "compare.png")
    check_compare_png(tmp_path / "compare.png", len(result["methods"]))


def test_plot_check_notices_a_missing_curve(tmp_path):
    from es_llm.tools.compare.report import plot_comparison

    result = _result()
    result["methods"] = {k: result["methods"][k] for k in ("uniform", "es")}
    plot_comparison(result, tmp_path / "two.png")
    with pytest.raises(AssertionError, match="no line in colour"):
        check_compare_png(tmp_path / "two.png", 3)


# ----------------------------------------------------------------------------- end to end
METHOD_KEYS = {"wall_clock_s", "cpu_time_s", "bp_samples", "scored_samples", "final_val_loss",
               "time_to_target_s", "time_to_target_cpu_s", "time_breakdown_s", "time_share",
               "scoring_cost_ratio", "bookkeeping_share", "val_history"}  # fmt: skip


def _ok(proc) -> None:
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\nSTDOUT\n{proc.stdout[-3000:]}\nSTDERR\n{proc.stderr[-5000:]}"
    )


@pytest.fixture(scope="module")
def compare_runs(tmp_path_factory, es_cache):
    """The two end-to-end `es-llm compare` commands of the tests below, started side by side.

    Each is independent of the other and trains its runs one at a time, in one single-threaded
    process, so on 2 cores they run together in about the time of the longer one. Each test
    waits for its own command and checks its outputs, as when it ran the command itself."""
    root = tmp_path_factory.mktemp("compare_e2e")
    e2e_out, grid_out = root / "cmp", root / "grid"
    e2e_cfg = write_ds_config(root, evolved_sampling={"burn_in_steps": 1})
    grid_cfg = write_ds_config(root, evolved_sampling={"method": "prune"})
    started = {
        "e2e": StartedCli(["compare", "--config", str(e2e_cfg), "--methods", "uniform,es",
                           "--epochs", "1", "--max-steps", "10", "--es", "beta1=0.3", "--out",
                           str(e2e_out), *TINY_RUN_ARGS],
                          es_cache, root / "e2e_logs", timeout=1800),
        "grid": StartedCli(["compare", "--config", str(grid_cfg), "--methods", "uniform,prune",
                            "--epochs-grid", "1,2", "--max-steps", "4", "--no-matched", "--out",
                            str(grid_out), *TINY_RUN_ARGS],
                           es_cache, root / "grid_logs", timeout=1800),
    }  # fmt: skip
    try:
        yield {"e2e": (started["e2e"], e2e_out), "grid": (started["grid"], grid_out)}
    finally:
        for s in started.values():
            s.kill()


@pytest.mark.multiproc
def test_compare_end_to_end_writes_json_table_and_plot(compare_runs):
    from es_llm.drivers.deepspeed.loop import TrainOptions

    started, out = compare_runs["e2e"]
    proc = started.result()
    _ok(proc)
    result = json.loads((out / "compare.json").read_text())
    assert list(result["methods"]) == ["uniform", "es", MATCHED]
    for rec in result["methods"].values():
        assert rec.keys() >= METHOD_KEYS
        assert set(rec["time_breakdown_s"]) == {"score_fwd_s", "select_s", "train_fwd_bwd_s",
                                                "optimizer_s", "other_s"}  # fmt: skip
    uni, es, matched = (result["methods"][k] for k in ("uniform", "es", MATCHED))
    assert result["target_val_loss"] == uni["final_val_loss"]
    assert es["scored_samples"] > 0 and uni["scored_samples"] == 0
    assert es["bp_samples"] == 10 * 8 and uni["bp_samples"] == 10 * 8
    assert (uni["steps"], es["steps"]) == (10, 10)
    # every run took the shared --es override, and es its burn-in from the config
    for name in ("uniform", "es", MATCHED):
        spec = json.loads((out / name / "run_spec.json").read_text())
        assert set(spec["options"]) == {f.name for f in dataclasses.fields(TrainOptions)}
        assert spec["options"]["es_overrides"] == {"beta1": 0.3}
        assert spec["options"]["progress"] is False
    assert es["evolved_sampling"]["beta1"] == 0.3 and es["evolved_sampling"]["burn_in_steps"] == 1
    assert matched["matched_to"] == "es" and matched["method"] == "uniform"
    assert matched["eval_every"] >= 1 and uni["eval_every"] == 1  # 10 steps / 20 evaluations
    assert result["machine"]["threads_per_rank"] >= 1
    assert result["command"].startswith("es-llm compare")
    check_compare_png(out / "compare.png", 3)
    md = (out / "compare.md").read_text()
    assert md.count("| es |") == 2 and md.count("| uniform-matched |") == 2
    assert "| uniform-matched |" in proc.stdout
    for name in ("uniform", "es", MATCHED):  # each a normal train output
        assert (out / name / "summary.json").exists() and (out / name / "metrics.jsonl").exists()


@pytest.mark.multiproc
def test_epochs_grid_writes_one_comparison_per_budget_and_grid_json(compare_runs):
    started, out = compare_runs["grid"]
    _ok(started.result())
    grid = json.loads((out / "grid.json").read_text())
    assert set(grid["epochs"]) == {"1", "2"}
    for e in ("1", "2"):
        res = json.loads((out / f"epochs_{e}" / "compare.json").read_text())
        assert res["epochs"] == int(e) and set(res["methods"]) == {"uniform", "prune"}
        assert set(grid["epochs"][e]["methods"]) == {"prune"}
        prune = grid["epochs"][e]["methods"]["prune"]
        assert prune["final_val_loss"] == res["methods"]["prune"]["final_val_loss"]
    assert (out / "grid.md").read_text().count("| prune |") == 2


def test_a_bad_match_is_one_line_of_error(tmp_path, es_cache, tiny_ds_config):
    proc = run_cli(["compare", "--config", str(tiny_ds_config()), "--methods", "uniform,es",
                    "--match", "nope", "--out", str(tmp_path / "o"), *TINY_RUN_ARGS],
                   es_cache, timeout=300)  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "es-llm: error: --match 'nope' must name one of the runs: uniform, es"
    ]


@pytest.mark.multiproc
def test_a_run_that_refuses_its_input_is_an_input_error_in_the_parent(tmp_path):
    from es_llm.drivers.deepspeed.loop import TrainOptions
    from es_llm.tools.compare.planning import RunSpec
    from es_llm.tools.compare.runner import run_one

    base = TrainOptions(out=tmp_path, config=str(tmp_path / "missing.json"))
    with pytest.raises(InputError, match=r"^run 'uniform': .*missing\.json' does not exist"):
        run_one(base, RunSpec("uniform", "uniform", {}, 1, 1), tmp_path, world=1, quiet=True)

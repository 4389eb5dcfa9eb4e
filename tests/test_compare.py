"""`es-llm compare`: metrics, planning and report on constructed inputs with known answers, and
the harness end to end on a tiny setting (real processes; no assertion on timing values)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_RUN_ARGS, StartedCli, run_cli, write_ds_config, write_instruct_jsonl

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
from es_llm.tools.compare.runner import wait_for_child


def _hist(points: list[tuple[float, float]]) -> list[dict]:
    return [
        {"step": int(t), "wall_clock_s": t, "cpu_time_s": 2 * t, "val_loss": v} for t, v in points
    ]


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
    assert es["meets_goal"] is True
    # 2 s for 640 scored samples vs 6 s for 320 back-propagated ones
    assert es["scoring_cost_ratio"] == pytest.approx((2 / 640) / (6 / 320))
    assert es["bookkeeping_share"] == pytest.approx(0.05 / 9)
    assert es["time_breakdown_s"]["other_s"] == pytest.approx(9.5 - 9.05)
    assert es["final_val_loss_vs_target_pct"] == pytest.approx(-2.5)
    # uniform never reached es's final loss 3.9
    assert es["uniform_time_to_own_loss_s"] is None and es["speedup_vs_uniform"] is None
    slow = method_record(_summary("es", 4.2, 9.0, [(0, 8), (9, 4.2)]), steps, 4.0, u)
    assert slow["time_to_target_s"] is None and slow["meets_goal"] is False
    # uniform's curve 8 -> 4 over 10 s passes 4.2 at 9.5 s; this run took 9 s
    assert slow["uniform_time_to_own_loss_s"] == pytest.approx(9.5)
    assert slow["speedup_vs_uniform"] == pytest.approx(9.5 / 9.0)


def test_a_proxy_scorer_is_charged_its_timers_and_shown_with_its_shared_pretraining():
    u = method_record(_summary("uniform", 4.0, 10.0, [(0, 8), (10, 4.0)]), [], 4.0, None)
    s = _summary("es", 3.9, 9.5, [(0, 8), (5, 4.0), (9.5, 3.9)])
    s["time_breakdown_s"].update(score_fwd_s=0.0, proxy_fwd_s=0.5, proxy_train_s=0.7)
    s["proxy"] = {"proxy_model": "base:gpt2-tiny,steps=9", "pretrain": {"wall_clock_s": 3.0}}
    px = method_record(s, [], 4.0, u)
    # the proxy's forward and learning are what its scores cost
    assert px["scoring_cost_ratio"] == pytest.approx((1.2 / 640) / (6 / 320))
    assert px["time_to_target_ratio"] == pytest.approx(0.5)  # shared pre-training aside
    assert px["proxy_pretrain_s"] == 3.0
    assert px["time_to_target_ratio_with_proxy_pretrain"] == pytest.approx(0.8)
    # an old summary without the proxy timers reads them as 0
    assert u["time_breakdown_s"]["proxy_fwd_s"] == 0.0 and u["proxy_pretrain_s"] is None


def test_a_run_just_outside_the_goal_does_not_meet_it():
    u = method_record(_summary("uniform", 4.0, 10.0, [(0, 8), (10, 4.0)]), [], 4.0, None)
    # reaches the target at 7 s: 0.7 x uniform's time, more than the goal of 0.6
    late = method_record(_summary("es", 3.9, 9.0, [(0, 8), (7, 4.0), (9, 3.9)]), [], 4.0, u)
    assert late["time_to_target_ratio"] == pytest.approx(0.7)
    assert late["meets_goal"] is False


def test_comparison_methods_targets_uniforms_final_loss_and_compares_with_matched():
    summaries = {
        "uniform": _summary("uniform", 4.0, 10.0, [(0, 8.0), (10, 4.0)]),
        "es": _summary("es", 3.8, 10.0, [(0, 8.0), (4, 5.0), (6, 3.0), (10, 3.8)]),
        MATCHED: _summary("uniform", 4.1, 10.0, [(0, 8.0), (10, 4.1)]),
    }
    methods = comparison_methods(summaries, {}, matched_to="es", target="final")
    assert set(methods) == {"uniform", "es", MATCHED}
    # uniform's own curve reaches 4.0 only at its last evaluation
    assert methods["uniform"]["time_to_target_s"] == pytest.approx(10.0)
    assert methods["es"]["time_to_target_s"] == pytest.approx(5.0)  # halfway from 5.0 to 3.0
    assert methods["es"]["final_val_loss_vs_matched"] == pytest.approx(3.8 - 4.1)
    assert methods[MATCHED]["matched_to"] == "es"
    assert "final_val_loss_vs_matched" not in methods["uniform"]
    assert "final_val_loss_vs_matched" not in methods[MATCHED]
    plain = comparison_methods({k: summaries[k] for k in ("uniform", "es")}, {}, target="final")
    assert "final_val_loss_vs_matched" not in plain["es"]


def test_best_point_and_the_target_of_an_over_fitting_uniform():
    from es_llm.tools.compare.metrics import best_point, target_loss

    # uniform over-fits: best 4.0 at 6 s, final 4.5
    u_hist = [(0, 8.0), (4, 5.0), (6, 4.0), (8, 4.2), (10, 4.5)]
    e_hist = [(0, 8.0), (2, 5.0), (3, 4.0), (10, 4.4)]
    summaries = {
        "uniform": _summary("uniform", 4.5, 10.0, u_hist),
        "es": _summary("es", 4.4, 10.0, e_hist),
    }
    assert best_point(summaries["uniform"]["val_history"])["step"] == 6
    assert best_point([{"val_loss": math.nan}, {"val_loss": None}]) is None
    assert target_loss(summaries["uniform"], "best") == 4.0
    assert target_loss(summaries["uniform"], "final") == 4.5
    best = comparison_methods(summaries, {}, target="best")
    u, es = best["uniform"], best["es"]
    assert (u["best_val_loss"], u["best_step"], u["best_wall_clock_s"]) == (4.0, 6, 6)
    assert (es["best_val_loss"], es["best_step"], es["final_val_loss"]) == (4.0, 3, 4.4)
    # to 4.0: es at 3 s, uniform at 6 s (its best), not at its 10 s of training
    assert u["time_to_target_s"] == 6 and es["time_to_target_s"] == 3
    assert es["time_to_target_ratio"] == pytest.approx(0.5) and es["speedup"] == 2
    assert es["meets_goal"] is True
    final = comparison_methods(summaries, {}, target="final")
    # to 4.5: uniform halfway from 5.0 (4 s) to 4.0 (6 s), es halfway from 2 s to 3 s
    assert final["uniform"]["time_to_target_s"] == pytest.approx(5.0)
    assert final["es"]["time_to_target_s"] == pytest.approx(2.5)
    assert final["es"]["final_val_loss_vs_target_pct"] == pytest.approx(100 * -0.1 / 4.5)


def test_median_methods_takes_each_number_across_rounds():
    from es_llm.tools.compare.metrics import median_methods

    def rnd(wall: float, speedup: float | None, steps: int) -> dict:
        es = {"wall_clock_s": wall, "speedup": speedup, "steps": steps, "method": "es",
              "meets_goal": speedup is not None and speedup > 2,
              "time_breakdown_s": {"a": wall / 2}, "val_history": [wall]}  # fmt: skip
        return {"es": es}

    med = median_methods([rnd(10.0, 2.5, 9), rnd(30.0, None, 11), rnd(20.0, 1.5, 10)])["es"]
    assert med["wall_clock_s"] == 20.0 and med["steps"] == 10
    assert med["speedup"] == 2.0  # the median of the rounds that reached the target
    assert med["time_breakdown_s"] == {"a": 10.0}
    assert med["val_history"] == [20.0]  # the round with the median wall-clock
    assert med["meets_goal"] is False  # met in 1 round of 3
    assert med["rounds"] == 3 and med["per_round"]["wall_clock_s"] == [10.0, 30.0, 20.0]
    even = median_methods([rnd(10.0, 2.5, 9), rnd(30.0, 3.0, 11)])["es"]
    assert even["wall_clock_s"] == 20.0 and even["val_history"] == [10.0]
    assert even["meets_goal"] is True


def test_differing_conditions_rule():
    from es_llm.tools.compare.conditions import differing_conditions

    def c(cal: float | None, load: float | None) -> dict:
        return {"calibration_s": cal, "load_average_mean": load}

    assert differing_conditions({"a": c(0.010, 1.0), "b": c(0.0124, 1.9)}, 2) == []
    slow = differing_conditions({"a": c(0.010, 1.0), "b": c(0.0126, 1.0)}, 2)
    assert len(slow) == 1 and slow[0].startswith("calibration 12.6 ms in b vs 10.0 ms in a (+26%")
    loaded = differing_conditions({"a": c(0.010, 1.0), "b": c(0.010, 2.1), "m": c(None, None)}, 2)
    assert len(loaded) == 1 and "mean load average 2.10 in b vs 1.00 in a" in loaded[0]
    assert differing_conditions({"a": c(0.01, 1.0)}, 2) == []


def test_metrics_follower_returns_complete_new_records_only(tmp_path):
    from es_llm.tools.compare.live import MetricsFollower

    path = tmp_path / "metrics.jsonl"
    follow = MetricsFollower(path)
    assert follow.poll() == []  # not written yet
    path.write_text('{"type": "eval", "step": 0}\n{"type": "st')
    assert follow.poll() == [{"type": "eval", "step": 0}]
    with path.open("a") as fh:
        fh.write('ep", "step": 1}\n')
    assert follow.poll() == [{"type": "step", "step": 1}]
    assert follow.poll() == []
    path.write_text('{"step": 5}\n')  # rewritten (a new run in the same folder)
    assert follow.poll() == [{"step": 5}]


def test_sigterm_to_compare_alone_stops_and_waits_for_its_child():
    # `kill <compare pid>`: the child run must not train on, orphaned
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    before = signal.getsignal(signal.SIGTERM)
    polls: list[int] = []
    timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM))
    timer.start()
    try:
        with pytest.raises(SystemExit) as stopped:
            wait_for_child(child, lambda: polls.append(1), 0.05)
    finally:
        timer.cancel()
        if child.poll() is None:
            child.kill()
            child.wait()
    assert stopped.value.code == 143
    assert child.returncode == -signal.SIGTERM  # asked to stop, and waited for
    assert polls and signal.getsignal(signal.SIGTERM) is before
    # a child that ends by itself: no signal, the handler is put back
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    wait_for_child(done, lambda: None, 0.05)
    assert done.returncode == 0 and signal.getsignal(signal.SIGTERM) is before


def test_eval_and_done_lines():
    from es_llm.tools.compare.live import done_line, eval_line

    rec = {"step": 12, "epoch": 0, "val_loss": 5.25, "wall_clock_s": 3.04, "cpu_time_s": 6.0}
    line = eval_line("es", rec, 5.125)
    assert "es" in line and "step    12" in line and "epoch  1" in line
    assert "val 5.2500  best 5.1250  train 3.0s wall / 6.0s CPU" in line
    done = done_line("es", {"final_val_loss": 5.5, "wall_clock_s": 9.0, "cpu_time_s": 18.0},
                     {"val_loss": 5.125, "step": 12}, 20.4)  # fmt: skip
    assert "best val 5.1250 at step 12, final 5.5000; train 9.0s wall / 18.0s CPU (20s" in done


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


def test_matched_spec_gives_uniform_the_reference_models_cost_too():
    # method excess spent its training time plus the reference's training and pass
    uniform = {"wall_clock_s": 50.0, "cpu_time_s": 100.0, "steps": 100}
    reference = {"train_s": 12.0, "pass_s": 3.0, "train_cpu_s": 20.0, "pass_cpu_s": 5.0}
    xs = {"wall_clock_s": 30.0, "cpu_time_s": 25.0, "reference": reference}
    wall = matched_spec(uniform, xs, clock="wall", epochs=3, requested_eval_every=None)
    assert (wall.max_wall_clock_s, wall.max_steps) == (45.0, 90)  # 30 + 12 + 3 s
    cpu = matched_spec(uniform, xs, clock="cpu", epochs=3, requested_eval_every=None)
    assert (cpu.max_cpu_time_s, cpu.max_steps) == (50.0, 50)  # 25 + 20 + 5 CPU s


def test_matched_spec_gives_a_longer_budget_its_steps_and_the_epochs_to_hold_them():
    # the reference took longer than uniform (104.4 s vs 91.6 s for 240 steps in 3 epochs):
    # uniform-matched must train 104.4 s, not stop at uniform's 240 steps
    uniform = {"wall_clock_s": 91.6, "cpu_time_s": 90.0, "steps": 240}
    es = {"wall_clock_s": 104.4, "cpu_time_s": 100.0}
    spec = matched_spec(uniform, es, clock="wall", epochs=3, requested_eval_every=None)
    assert spec.max_steps == round(104.4 / (91.6 / 240))  # 274, its LR schedule's length
    assert spec.epochs == 4  # 274 steps at 80 a epoch
    assert spec.max_wall_clock_s == 104.4
    short = matched_spec(uniform, {"wall_clock_s": 45.8}, clock="wall", epochs=3,
                         requested_eval_every=None)  # fmt: skip
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
    # epochs_x: ES at r = 0.5 given twice the epochs trains as many steps as uniform
    runs = [Variant("uniform", "uniform"), parse_variant("es2x:es:burn_in_steps=0,epochs_x=2")]
    specs = plan_runs(cfg, runs, {}, requested_eval_every=None, max_steps=None, **kw)
    assert [s.epochs for s in specs] == [4, 8]
    u = planned_steps(cfg, runs[0], {}, max_steps=None, **kw)
    assert planned_steps(cfg, runs[1], {}, max_steps=None, **{**kw, "epochs": 8}) == u


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


def test_run_rounds_interleaves_rotated_rounds_and_budgets_matched_per_round(tmp_path):
    from es_llm.cli import build_parser
    from es_llm.tools.compare.cli import rotated, run_rounds
    from es_llm.tools.compare.planning import RunSpec

    assert rotated([1, 2, 3], 0) == [1, 2, 3] and rotated([1, 2, 3], 4) == [2, 3, 1]
    args = build_parser().parse_args(
        ["compare", "--methods", "uniform,es,prune", "--repeats", "3", "--target", "final"]
    )
    specs = [RunSpec(n, n, {}, args.epochs, 1) for n in ("uniform", "es", "prune")]
    calls: list[tuple[str, str, str]] = []
    es_wall = {1: 12.0, 2: 14.0, 3: 16.0}

    def fake_run(spec: RunSpec, where, label: str) -> dict:  # a run's summary, as trained
        r = int(where.name.split("_")[1])
        calls.append((where.name, spec.name, label))
        wall = es_wall[r] if spec.name == "es" else 10.0
        s = _summary(spec.method, 4.0, wall, [(0, 8.0), (wall, 4.0)])
        s["steps"] = 20
        s["conditions"] = {"calibration_s": 0.01 * r, "load_average_mean": 1.0}
        return s

    rounds, conditions = run_rounds(args, specs, "es", tmp_path, fake_run)
    assert [c[1] for c in calls] == ["uniform", "es", "prune", MATCHED,
                                     "es", "prune", "uniform", MATCHED,
                                     "prune", "uniform", "es", MATCHED]  # fmt: skip
    assert [c[2] for c in calls] == [f"[{i}/12]" for i in range(1, 13)]
    assert {c[0] for c in calls} == {"round_1", "round_2", "round_3"}
    assert [rd["order"] for rd in rounds][1] == ["es", "prune", "uniform", MATCHED]
    for r, rd in enumerate(rounds, start=1):
        assert list(rd["methods"]) == ["uniform", "es", "prune", MATCHED]
        m = rd["methods"][MATCHED]
        # this round's es time; its steps at uniform's 0.5 s a step
        assert m["budget_s"] == es_wall[r] and m["budget_used"] == pytest.approx(10.0 / es_wall[r])
        assert m["run_dir"] == f"round_{r}/{MATCHED}"
        assert rd["target_val_loss"] == 4.0
    assert conditions["es (round 2)"]["calibration_s"] == pytest.approx(0.02)
    assert len(conditions) == 12


def test_repeated_comparison_reports_medians_and_flags_differing_conditions(
    tmp_path, monkeypatch, tiny_ds_config
):
    """compare_once with --repeats 3 from start to compare.json/md/png, each run's training
    replaced by a summary with known numbers (the real runs are the end-to-end test's)."""
    from types import SimpleNamespace

    from es_llm.cli import build_parser
    from es_llm.tools.compare import runner
    from es_llm.tools.compare.cli import compare_once

    args = build_parser().parse_args(
        ["compare", "--config", str(tiny_ds_config()), "--methods", "uniform,es", "--repeats",
         "3", "--epochs", "1", "--quiet", "--out", str(tmp_path)]
    )  # fmt: skip
    es_time = {"round_1": 6.0, "round_2": 4.0, "round_3": 5.0}

    def fake_run_one(base, spec, where, *, world, quiet, label):
        t = 10.0 if spec.method == "uniform" else es_time[where.name]
        s = _summary(spec.method, 4.0, t, [(0, 8.0), (t / 2, 5.0), (t, 4.0)])
        s["threads_per_rank"] = 1
        slow = spec.name == "es" and where.name == "round_2"
        s["conditions"] = {"calibration_s": 0.02 if slow else 0.01, "load_average_mean": 1.0}
        return s

    monkeypatch.setattr(runner, "run_one", fake_run_one)
    corpus = SimpleNamespace(train=list(range(256)), val=list(range(32)), composition=None)
    result = compare_once(args, tmp_path, "es-llm compare --repeats 3", corpus)
    es = result["methods"]["es"]
    assert es["wall_clock_s"] == 5.0 and es["rounds"] == 3
    assert es["per_round"]["wall_clock_s"] == [6.0, 4.0, 5.0]
    assert es["speedup"] == pytest.approx(2.0)  # 10 s / 5 s, the median round
    assert [r["order"] for r in result["rounds"]] == [
        ["uniform", "es", MATCHED], ["es", "uniform", MATCHED], ["uniform", "es", MATCHED]
    ]  # fmt: skip
    assert result["methods"][MATCHED]["budget_s"] == 5.0  # the median of 6, 4, 5
    assert len(result["conditions_differ"]) == 1
    assert "es (round 2)" in result["conditions_differ"][0]
    md = (tmp_path / "compare.md").read_text()
    assert md.index("not to be trusted") < md.index("## Summary")
    assert "medians of 3 interleaved rounds" in md
    assert json.loads((tmp_path / "compare.json").read_text())["repeats"] == 3
    check_compare_png(tmp_path / "compare.png", 3)


def test_header_counts_every_run_once(tmp_path):
    from es_llm.cli import build_parser
    from es_llm.tools.compare.cli import header

    parse = build_parser().parse_args
    h = header(parse(["compare", "--methods", "uniform,es", "--epochs", "1"]), 256, tmp_path)
    assert h.startswith("es-llm compare: 3 runs (uniform, es, uniform-matched), 1 epoch(s), 256")
    assert "target uniform's best validation loss" in h
    h = header(parse(["compare", "--methods", "es,prune", "--repeats", "2", "--no-matched",
                      "--epochs-grid", "1,3", "--target", "final"]), 8, tmp_path)  # fmt: skip
    assert h.startswith("es-llm compare: 12 runs (uniform, es, prune x 2 rounds at each of 2 "
                        "epoch budgets), epochs 1, 3, 8 training")  # fmt: skip


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
    # a value with a comma (a base: spec) stays whole: "steps" is not a field
    v = parse_variant("px:es:scorer=proxy,proxy_model=base:gpt2-tiny,steps=200,tau=1")
    assert v.overrides == {"scorer": "proxy", "proxy_model": "base:gpt2-tiny,steps=200", "tau": 1}
    assert parse_variant("x:es:tau=1,epochs_x=3") == Variant("x", "es", {"tau": 1}, 3)
    bad_variants = ("x:es:epochs_x=0", "x:es:epochs_x=1.5", "x:es:epochs_x=true")
    for bad in ("es-x", "x:nomethod", "es:es:tau=1", "x:es:tau", f"{MATCHED}:uniform",
                *bad_variants):  # fmt: skip
        with pytest.raises(argparse.ArgumentTypeError):
            parse_variant(bad)
    assert parse_grid("1,3,16") == [1, 3, 16]
    for bad in ("1,0", "a,2", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_grid(bad)


def test_every_evaluation_of_a_comparison_covers_its_whole_validation_split():
    # curve points and final loss on the same rows, also above train's 256-sequence subset
    from es_llm.cli import build_parser
    from es_llm.drivers.deepspeed import validation
    from es_llm.tools.compare.cli import base_options

    parse = build_parser().parse_args
    for given, n_val in ((["--max-val-samples", "1000"], 1000), ([], 128)):
        opts = base_options(parse(["compare", *given, "--out", "x"]))
        assert opts.max_val_samples == n_val
        assert validation.subset_size(n_val, opts.eval_subset) == n_val


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
        "methods": comparison_methods(summaries, {}, matched_to="es", target="final"),
        "target_val_loss": 4.0,
        "target": {"kind": "final"},
        "conditions": {
            "uniform": {"calibration_s": 0.004, "load_average_mean": 1.0},
            "es": {"calibration_s": 0.0041, "load_average_mean": 1.2},
        },
        "conditions_differ": [],
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
    assert len(rows) == 3  # the results table, the time breakdown and the conditions
    # best 3.0 at step 6 (6 s), final 3.8 (-5% vs uniform's 4.0), at the target 4.0 after 5 s
    # (halfway from 5.0 at 4 s to 3.0 at 6 s) of uniform's 10 s: 50%, speedup 2; best minus
    # uniform-matched's best 4.1
    assert rows[0] == (
        "| es | 3.0000 | 6 | 6.0 | 3.8000 | -5.00% | 10.0 | 20.0 | 5.0 | 50% | 2.00x | -1.1000 "
        "| 320 | 640 |"
    )
    assert md.count("| uniform-matched |") == 2
    assert "2 threads per rank" in md and "`es-llm compare --epochs 1`" in md
    head = md.split("## Results")[0]
    assert "Target: uniform's final validation loss, 4.0000" in head
    assert "speedup > 1 means the method pays" in head
    assert "- es reached it in 50% of uniform's time (speedup 2.00x)." in head
    assert (
        "- uniform-matched (uniform given es's training time) did not reach the target; its "
        "best loss was 4.1000 (+2.5%)." in head
    )
    assert "Warning" not in md


def test_markdown_report_warns_first_when_conditions_differ():
    from es_llm.tools.compare.report import markdown_report

    result = _result()
    result["conditions_differ"] = ["calibration 6.0 ms in es vs 4.0 ms in uniform (+50%, ...)"]
    md = markdown_report(result)
    first = md.split("## Summary")[0]
    assert "not to be trusted" in first and "calibration 6.0 ms in es" in first
    assert "--repeats 3" in first


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
        # the post-training regime: instruction data on a base pre-trained (2 steps) and cached
        "grid": StartedCli(["compare", "--config", str(grid_cfg), "--methods", "uniform,prune",
                            "--epochs-grid", "1,2", "--max-steps", "4", "--no-matched", "--out",
                            str(grid_out), *TINY_RUN_ARGS, "--model", "base:gpt2-tiny,steps=2",
                            "--data", str(write_instruct_jsonl(root / "instruct.jsonl"))],
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
                                                "optimizer_s", "proxy_fwd_s", "proxy_train_s",
                                                "other_s"}  # fmt: skip
    uni, es, matched = (result["methods"][k] for k in ("uniform", "es", MATCHED))
    assert result["target"]["kind"] == "best"  # the default
    assert (
        result["target_val_loss"]
        == uni["best_val_loss"]
        == min(h["val_loss"] for h in uni["val_history"])
    )
    assert uni["time_to_target_s"] == uni["best_wall_clock_s"] and uni["speedup"] == 1.0
    # uniform-matched got es's training time as its budget, and the steps that fit it
    assert matched["budget_s"] == es["wall_clock_s"] and matched["match_clock"] == "wall"
    m_spec = json.loads((out / MATCHED / "run_spec.json").read_text())["spec"]
    assert m_spec["max_wall_clock_s"] == es["wall_clock_s"] and m_spec["max_steps"] >= 1
    assert matched["steps"] <= m_spec["max_steps"]
    # each run's machine conditions, measured in the parent
    assert set(result["conditions"]) == {"uniform", "es", MATCHED}
    for name, cond in result["conditions"].items():
        assert cond["calibration_s"] > 0 and cond["load_samples"] >= 1, name
        assert result["methods"][name]["conditions"] == cond
    assert isinstance(result["conditions_differ"], list)
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
    assert md.count("| es |") == 3 and md.count("| uniform-matched |") == 3
    assert md.startswith("# es-llm compare\n")
    assert md.index("## Summary") < md.index("## Results")
    assert ("not to be trusted" in md) == bool(result["conditions_differ"])
    assert "| uniform-matched |" in proc.stdout
    # reported while it ran: the header once, counting every run; each run's evaluations
    # printed before the next run starts
    out_lines = proc.stdout.splitlines()
    heads = [line for line in out_lines if line.startswith("es-llm compare:")]
    assert len(heads) == 1 and "3 runs (uniform, es, uniform-matched)" in heads[0], heads
    starts = [i for i, line in enumerate(out_lines) if line.startswith(("[1/3]", "[2/3]", "[3/3]"))]
    assert len(starts) == 3
    ends = [*starts[1:], len(out_lines)]
    for name, lo, hi in zip(("uniform", "es", MATCHED), starts, ends, strict=True):
        evals = [line for line in out_lines[lo:hi] if line.split()[:2] == [name, "step"]]
        hist = [(h["step"], h["val_loss"]) for h in result["methods"][name]["val_history"]]
        # one line per evaluation; one that repeats the previous (an interval evaluation at
        # the epoch's end or at the stop): once
        shown = [h for i, h in enumerate(hist) if i == 0 or hist[i - 1] != h]
        assert len(evals) == len(shown) and len(shown) >= 2, (name, out_lines[lo:hi])
        assert any(line.split()[:2] == [name, "done:"] for line in out_lines[lo:hi])
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
    # every run fine-tuned the one cached base, with its tokenizer, on completion tokens
    res = json.loads((out / "epochs_1" / "compare.json").read_text())
    base = Path(res["model"])
    assert base.parent.name == "base-models" and (base / "pretrain_summary.json").is_file()
    assert json.loads((base / "pretrain_summary.json").read_text())["steps"] == 2
    assert res["data_composition"]["instruct"]["records"] == 300
    summary = json.loads((out / "epochs_1" / "prune" / "summary.json").read_text())
    assert summary["model"] == str(base)


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


def test_markdown_report_says_what_share_was_held_out():
    from es_llm.tools.compare.report import markdown_report

    assert "Validation:" not in markdown_report(_result())  # results written before the flag
    md = markdown_report({**_result(), "val_samples": 512, "val_share": 0.15, "val_data": None})
    assert "Validation: 512 held-out sequences (0.15 of the data held out, --val-share)." in md
    sep = {**_result(), "val_samples": 40, "val_share": 0.05, "val_data": "clean.jsonl"}
    assert "(0.05 of --val-data clean.jsonl held out, --val-share)" in markdown_report(sep)


def test_proxy_bases_are_built_once_at_the_comparisons_seed(monkeypatch, tmp_path):
    import es_llm.base_models as bm
    from es_llm.cli import build_parser
    from es_llm.tools.compare.cli import resolve_proxy_bases

    built: list[tuple[str, int, float]] = []

    def fake_build(text, *, seed, val_share, **kw):  # what building records; no training here
        built.append((text, seed, val_share))
        return tmp_path / text.replace(":", "-").replace(",", "-")

    monkeypatch.setattr(bm, "ensure_base_model", fake_build)
    args = build_parser().parse_args(
        ["compare", "--seed", "3", "--val-share", "0.2", "--out", str(tmp_path / "o"),
         "--es", "proxy_model=base:gpt2-nano,steps=3", "--es", "tau=1",
         "--variant", "px:es:scorer=proxy,proxy_model=base:gpt2-tiny,steps=4",
         "--variant", "pd:es:scorer=proxy,proxy_model=gpt2-nano"]
    )  # fmt: skip
    resolve_proxy_bases(args)
    assert built == [("base:gpt2-nano,steps=3", 3, 0.2), ("base:gpt2-tiny,steps=4", 3, 0.2)]
    assert dict(args.es) == {"proxy_model": str(tmp_path / "base-gpt2-nano-steps=3"), "tau": 1}
    assert args.variant[0].overrides["proxy_model"] == str(tmp_path / "base-gpt2-tiny-steps=4")
    assert args.variant[1].overrides["proxy_model"] == "gpt2-nano"  # a preset stays

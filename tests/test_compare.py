"""`es-llm compare`: the pure pieces (time to target, records, parsing) and the harness end to
end on a tiny setting (real processes; no assertion on timing values)."""

from __future__ import annotations

import argparse
import json
import math

import pytest
from conftest import TINY_RUN_ARGS, run_cli

from es_llm.compare import (
    MATCHED,
    grid_summary,
    method_record,
    parse_grid,
    parse_methods,
    parse_variant,
    time_to_target,
)


def _hist(points: list[tuple[float, float]]) -> list[dict]:
    return [{"wall_clock_s": t, "cpu_time_s": 2 * t, "val_loss": v} for t, v in points]


# ----------------------------------------------------------------------------- pure functions
def test_time_to_target_interpolates_between_the_evaluations_around_the_crossing():
    h = _hist([(0, 8.0), (10, 6.0), (20, 4.0), (30, 3.0)])
    assert time_to_target(h, 5.0) == pytest.approx(15.0)
    assert time_to_target(h, 5.0, "cpu_time_s") == pytest.approx(30.0)
    assert time_to_target(h, 4.0) == pytest.approx(20.0)  # exactly on an evaluation


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
    assert slow["speedup_vs_uniform"] is not None  # uniform got to 4.2 in 9.5 s


def test_parsers_reject_unknown_methods_and_malformed_variants():
    assert parse_methods("uniform, es,prune") == ["uniform", "es", "prune"]
    with pytest.raises(argparse.ArgumentTypeError):
        parse_methods("uniform,bogus")
    v = parse_variant("es-r80:es:selection_ratio=0.8,tau=2,importance_weighting=false")
    assert (v.name, v.method) == ("es-r80", "es")
    assert v.overrides == {"selection_ratio": 0.8, "tau": 2, "importance_weighting": False}
    for bad in ("es-x", "x:nomethod", "es:es:tau=1", "x:es:tau"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_variant(bad)
    assert parse_grid("1,3,16") == [1, 3, 16]
    with pytest.raises(argparse.ArgumentTypeError):
        parse_grid("1,0")


# ----------------------------------------------------------------------------- end to end
METHOD_KEYS = {"wall_clock_s", "cpu_time_s", "bp_samples", "scored_samples", "final_val_loss",
               "time_to_target_s", "time_to_target_cpu_s", "time_breakdown_s", "time_share",
               "scoring_cost_ratio", "bookkeeping_share", "val_history"}  # fmt: skip


def _ok(proc) -> None:
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\nSTDOUT\n{proc.stdout[-3000:]}\nSTDERR\n{proc.stderr[-5000:]}"
    )


@pytest.mark.multiproc
def test_compare_end_to_end_writes_json_table_and_plot(tmp_path, es_cache, tiny_ds_config):
    out = tmp_path / "cmp"
    cfg = tiny_ds_config(evolved_sampling={"burn_in_steps": 1})
    proc = run_cli(["compare", "--config", str(cfg), "--methods", "uniform,es", "--epochs", "1",
                    "--max-steps", "10", "--out", str(out), *TINY_RUN_ARGS], es_cache)  # fmt: skip
    _ok(proc)
    result = json.loads((out / "compare.json").read_text())
    assert set(result["methods"]) == {"uniform", "es", MATCHED}
    for rec in result["methods"].values():
        assert rec.keys() >= METHOD_KEYS
        assert set(rec["time_breakdown_s"]) == {"score_fwd_s", "select_s", "train_fwd_bwd_s",
                                                "optimizer_s", "other_s"}  # fmt: skip
    uni, es, matched = (result["methods"][k] for k in ("uniform", "es", MATCHED))
    assert result["target_val_loss"] == uni["final_val_loss"]
    assert uni["time_to_target_s"] is not None  # uniform reaches its own final loss
    assert es["scored_samples"] > 0 and uni["scored_samples"] == 0
    assert es["bp_samples"] == 10 * 8
    assert matched["matched_to"] == "es" and matched["steps"] <= uni["steps"]
    assert {"machine", "command", "target_val_loss"} <= result.keys()
    assert result["command"].startswith("es-llm compare")
    assert (out / "compare.png").stat().st_size > 1000
    assert "| es |" in (out / "compare.md").read_text()
    assert "| uniform-matched |" in proc.stdout
    for name in ("uniform", "es", MATCHED):  # each a normal train output
        assert (out / name / "summary.json").exists() and (out / name / "metrics.jsonl").exists()


@pytest.mark.multiproc
def test_epochs_grid_writes_one_comparison_per_budget_and_grid_json(
    tmp_path, es_cache, tiny_ds_config
):
    out = tmp_path / "grid"
    cfg = tiny_ds_config(evolved_sampling={"method": "prune"})
    proc = run_cli(["compare", "--config", str(cfg), "--methods", "uniform,prune",
                    "--epochs-grid", "1,2", "--max-steps", "4", "--no-matched", "--out", str(out),
                    *TINY_RUN_ARGS], es_cache)  # fmt: skip
    _ok(proc)
    grid = json.loads((out / "grid.json").read_text())
    assert set(grid["epochs"]) == {"1", "2"}
    for e in ("1", "2"):
        assert (out / f"epochs_{e}" / "compare.json").exists()
        assert set(grid["epochs"][e]["methods"]) == {"prune"}
    assert (out / "grid.md").read_text().count("| prune |") == 2


def test_grid_summary_from_synthetic_comparisons():
    def res(final_prune: float) -> dict:
        base = {"final_val_loss": 4.0, "wall_clock_s": 10.0, "cpu_time_s": 20.0}
        return {
            "target_val_loss": 4.0,
            "methods": {"uniform": base, "prune": {**base, "final_val_loss": final_prune}},
        }

    g = grid_summary({1: res(4.1), 3: res(3.9)})
    assert set(g["epochs"]) == {"1", "3"}
    assert g["epochs"]["3"]["methods"]["prune"]["final_val_loss"] == 3.9
    assert g["epochs"]["1"]["uniform_wall_clock_s"] == 10.0

"""What compare.json says about each run, from the runs' summaries: pure functions.

- `time_to_target`: when a validation-loss curve first reaches a loss, interpolated between
  evaluations;
- `method_record`: one run's entry (final loss, time to uniform's final loss, the time
  breakdown and the two efficiency-limit ratios);
- `comparison_methods`: every run's entry, uniform being the reference;
- `grid_summary`: the saving at each epoch budget of `--epochs-grid`.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = [
    "MATCHED",
    "TARGET_LOSS_SLACK",
    "TARGET_SPEEDUP",
    "TIMER_LABELS",
    "comparison_methods",
    "grid_summary",
    "method_record",
    "time_to_target",
]

MATCHED = "uniform-matched"
TIMER_LABELS = {
    "score_fwd_s": "score fwd",
    "select_s": "gather+select",
    "train_fwd_bwd_s": "train fwd+bwd",
    "optimizer_s": "optimizer",
}
TARGET_SPEEDUP = 0.6  # issue #5: reach the target in <= 0.6x uniform's time ...
TARGET_LOSS_SLACK = 0.005  # ... with a final loss no more than 0.5% above uniform's
GRID_FIELDS = (
    "final_val_loss",
    "final_val_loss_vs_target_pct",
    "final_val_loss_vs_matched",
    "time_to_target_s",
    "time_to_target_ratio",
    "time_to_target_cpu_ratio",
    "speedup_vs_uniform",
    "speedup_vs_uniform_cpu",
    "wall_clock_s",
    "cpu_time_s",
    "meets_issue_target",
)


def time_to_target(
    history: list[dict[str, Any]], target: float, clock: str = "wall_clock_s"
) -> float | None:
    """First training time at which the validation loss reaches `target`, or None.

    Linear interpolation between the last evaluation above the target and the first one at or
    below it: with evaluations every ~5% of a run this times the crossing well inside 5%.
    Evaluations without a finite loss or without the clock are skipped.
    """
    prev: tuple[float, float] | None = None
    for rec in history:
        v, t = rec.get("val_loss"), rec.get(clock)
        if v is None or t is None or not math.isfinite(v):
            continue
        if v <= target:
            if prev is None or prev[1] == v:
                return float(t)
            t0, v0 = prev
            return float(t0 + (v0 - target) / (v0 - v) * (t - t0))
        prev = (float(t), float(v))
    return None


def _div(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0 or not math.isfinite(a) or not math.isfinite(b):
        return None
    return a / b


def method_record(
    summary: dict[str, Any],
    steps: list[dict[str, Any]],
    target: float,
    uniform: dict[str, Any] | None,
) -> dict[str, Any]:
    """compare.json's entry for one run, from its summary.json and its step records.

    `uniform` is uniform's own record (None while building it): the ratios and speedups are
    taken against it.
    """
    wall, cpu = summary["wall_clock_s"], summary["cpu_time_s"]
    hist = summary["val_history"]
    tb = dict(summary["time_breakdown_s"])
    tb["other_s"] = max(0.0, wall - sum(tb.values()))
    final = summary["final_val_loss"]
    ttt = time_to_target(hist, target, "wall_clock_s")
    ttt_cpu = time_to_target(hist, target, "cpu_time_s")
    select_step_s = sum(r["step_s"] for r in steps if r.get("phase") == "select")
    rec: dict[str, Any] = {
        "method": summary["method"],
        "wall_clock_s": wall,
        "cpu_time_s": cpu,
        "eval_wall_clock_s": summary.get("eval_wall_clock_s"),
        "steps": summary["steps"],
        "epochs": summary["epochs"],
        "bp_samples": summary["bp_samples"],
        "scored_samples": summary["scored_samples"],
        "pruned_sample_epochs": summary.get("pruned_sample_epochs", 0),
        "final_val_loss": final,
        "final_val_loss_vs_target_pct": None
        if final is None
        else 100.0 * (final - target) / target,
        "time_to_target_s": ttt,
        "time_to_target_cpu_s": ttt_cpu,
        "time_breakdown_s": tb,
        "time_share": {k: _div(v, wall) for k, v in tb.items()},
        # scoring cost per sample relative to a training fwd+bwd per sample
        "scoring_cost_ratio": _div(
            _div(tb["score_fwd_s"], summary["scored_samples"] or None),
            _div(tb["train_fwd_bwd_s"], summary["bp_samples"] or None),
        ),
        # bookkeeping (all-gather + selection + score update) share of a selection step
        "bookkeeping_share": _div(tb["select_s"], select_step_s or None),
        "evolved_sampling": summary.get("evolved_sampling"),
        "val_history": hist,
    }
    if uniform is not None:
        u_wall, u_cpu = uniform["wall_clock_s"], uniform["cpu_time_s"]
        rec["time_to_target_ratio"] = _div(ttt, u_wall)
        rec["time_to_target_cpu_ratio"] = _div(ttt_cpu, u_cpu)
        # how long uniform needed for this run's final loss: a saving even when the target
        # itself is missed (>1 means this run got there faster than uniform)
        u_hist = uniform["val_history"]
        u_own = time_to_target(u_hist, final, "wall_clock_s") if final is not None else None
        u_own_cpu = time_to_target(u_hist, final, "cpu_time_s") if final is not None else None
        rec["uniform_time_to_own_loss_s"] = u_own
        rec["speedup_vs_uniform"] = _div(u_own, wall)
        rec["speedup_vs_uniform_cpu"] = _div(u_own_cpu, cpu)
        rec["meets_issue_target"] = bool(
            ttt is not None
            and rec["time_to_target_ratio"] is not None
            and rec["time_to_target_ratio"] <= TARGET_SPEEDUP
            and final is not None
            and final <= target * (1 + TARGET_LOSS_SLACK)
        )
    return rec


def comparison_methods(
    summaries: dict[str, dict[str, Any]],
    steps: dict[str, list[dict[str, Any]]],
    *,
    matched_to: str | None = None,
) -> dict[str, dict[str, Any]]:
    """compare.json's "methods": every run's record against uniform's final loss (the target).

    `summaries` must hold "uniform"; with `matched_to`, `MATCHED` is uniform given that run's
    training time, and every other run also gets its final loss minus uniform-matched's.
    """
    target = summaries["uniform"]["final_val_loss"]
    uniform = method_record(summaries["uniform"], steps.get("uniform", []), target, None)
    methods = {
        name: method_record(s, steps.get(name, []), target, uniform)
        for name, s in summaries.items()
    }
    if matched_to is None or MATCHED not in methods:
        return methods
    methods[MATCHED]["matched_to"] = matched_to
    matched_final = methods[MATCHED]["final_val_loss"]
    for name, rec in methods.items():
        if name in ("uniform", MATCHED) or rec["final_val_loss"] is None or matched_final is None:
            continue
        rec["final_val_loss_vs_matched"] = rec["final_val_loss"] - matched_final
    return methods


def grid_summary(results: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """grid.json: per epoch budget and method, the saving vs uniform and vs uniform-matched."""
    budgets: dict[str, Any] = {}
    for epochs, res in results.items():
        uniform = res["methods"]["uniform"]
        budgets[str(epochs)] = {
            "target_val_loss": res["target_val_loss"],
            "uniform_wall_clock_s": uniform["wall_clock_s"],
            "uniform_cpu_time_s": uniform["cpu_time_s"],
            "methods": {
                name: {k: r.get(k) for k in GRID_FIELDS}
                for name, r in res["methods"].items()
                if name != "uniform"
            },
        }
    return {"epochs": budgets}

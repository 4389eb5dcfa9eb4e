"""What compare.json says about each run, from the runs' summaries: pure functions.

- `time_to_target`: when a validation-loss curve first reaches a loss, interpolated between
  evaluations;
- `best_point`: the evaluation with the lowest validation loss (multi-epoch runs over-fit, so
  the final loss alone misleads);
- `method_record`: one run's entry (best and final loss, time to the target, the time
  breakdown and the two efficiency-limit ratios);
- `comparison_methods`: every run's entry, uniform's best or final loss being the target;
- `median_methods`: the per-method medians of `--repeats` rounds;
- `grid_summary`: the saving at each epoch budget of `--epochs-grid`.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

__all__ = [
    "GOAL_LOSS_SLACK",
    "GOAL_TIME_SHARE",
    "MATCHED",
    "TARGETS",
    "TIMER_LABELS",
    "best_point",
    "comparison_methods",
    "grid_summary",
    "median_methods",
    "median_or_none",
    "method_record",
    "proxy_pretrain_s",
    "round_view",
    "target_loss",
    "time_to_target",
]

MATCHED = "uniform-matched"
TARGETS = ("best", "final")  # --target: uniform's best or its final validation loss
TIMER_LABELS = {
    "score_fwd_s": "score fwd",
    "select_s": "gather+select",
    "train_fwd_bwd_s": "train fwd+bwd",
    "optimizer_s": "optimizer",
    "proxy_fwd_s": "proxy fwd",
    "proxy_train_s": "proxy train",
}
# what supplying the scores costs: the learner's scoring forward, or the proxy's forward and
# its online training (a summary written before the proxy timers reads 0 for them)
SCORING_TIMERS = ("score_fwd_s", "proxy_fwd_s", "proxy_train_s")
GOAL_TIME_SHARE = 0.6  # the project's goal: reach the target in <= 0.6x uniform's time ...
GOAL_LOSS_SLACK = 0.005  # ... with a loss (best or final, as the target) <= 0.5% above it
GRID_FIELDS = (
    "best_val_loss",
    "best_step",
    "best_wall_clock_s",
    "final_val_loss",
    "final_val_loss_vs_target_pct",
    "final_val_loss_vs_matched",
    "time_to_target_s",
    "time_to_target_ratio",
    "time_to_target_cpu_ratio",
    "speedup",
    "speedup_cpu",
    "speedup_vs_uniform",
    "speedup_vs_uniform_cpu",
    "wall_clock_s",
    "cpu_time_s",
    "meets_goal",
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


def best_point(history: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The evaluation with the lowest finite validation loss (the first of equals), or None."""
    best: dict[str, Any] | None = None
    for rec in history:
        v = rec.get("val_loss")
        if v is None or not math.isfinite(v):
            continue
        if best is None or v < best["val_loss"]:
            best = rec
    return best


def target_loss(summary: dict[str, Any], which: str) -> float | None:
    """Uniform's loss that every run is timed to: its best evaluation or its final one."""
    if which not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {which!r}")
    if which == "final":
        return summary["final_val_loss"]
    best = best_point(summary["val_history"])
    return None if best is None else float(best["val_loss"])


def reference_cost(summary: dict[str, Any]) -> tuple[float, float]:
    """(wall, CPU) seconds of the run's reference model, training plus pass: (0, 0) without
    one. Part of the run's cost: every time compare reports for the run includes it."""
    ref = summary.get("reference") or {}
    return (
        ref.get("train_s", 0.0) + ref.get("pass_s", 0.0),
        ref.get("train_cpu_s", 0.0) + ref.get("pass_cpu_s", 0.0),
    )


def method_record(
    summary: dict[str, Any],
    steps: list[dict[str, Any]],
    target: float,
    uniform: dict[str, Any] | None,
    *,
    target_kind: str = "final",
) -> dict[str, Any]:
    """compare.json's entry for one run, from its summary.json and its step records.

    `target` is uniform's `target_kind` ("best" or "final") validation loss; `uniform` is
    uniform's own record (None while building it): the ratios and speedups are taken
    against it. The time-to-target share is this run's time to the target over uniform's own
    time to it, and `speedup` its inverse: > 1 means the run reached uniform's loss sooner.
    """
    wall, cpu = summary["wall_clock_s"], summary["cpu_time_s"]
    hist = summary["val_history"]
    ref = summary.get("reference") or {}  # a method's reference model is part of its cost
    ref_wall, ref_cpu = reference_cost(summary)
    if ref:
        wall, cpu = wall + ref_wall, cpu + ref_cpu
        hist = [{**h, "wall_clock_s": h["wall_clock_s"] + ref_wall,
                 "cpu_time_s": h["cpu_time_s"] + ref_cpu} for h in hist]  # fmt: skip
    tb = {k: 0.0 for k in TIMER_LABELS} | dict(summary["time_breakdown_s"])
    tb["other_s"] = max(0.0, wall - ref_wall - sum(tb.values()))  # the reference: reference_s
    final = summary["final_val_loss"]
    best = best_point(hist)
    best_loss = None if best is None else float(best["val_loss"])
    ttt = time_to_target(hist, target, "wall_clock_s")
    ttt_cpu = time_to_target(hist, target, "cpu_time_s")
    select_step_s = sum(r["step_s"] for r in steps if r.get("phase") == "select")
    rec: dict[str, Any] = {
        "method": summary["method"],
        "wall_clock_s": wall,
        "cpu_time_s": cpu,
        "eval_wall_clock_s": summary.get("eval_wall_clock_s"),
        "reference_s": ref_wall if ref else None,
        "steps": summary["steps"],
        "epochs": summary["epochs"],
        "bp_samples": summary["bp_samples"],
        "scored_samples": summary["scored_samples"],
        "pruned_sample_epochs": summary.get("pruned_sample_epochs", 0),
        "best_val_loss": best_loss,
        "best_step": None if best is None else best.get("step"),
        "best_wall_clock_s": None if best is None else best.get("wall_clock_s"),
        "best_cpu_time_s": None if best is None else best.get("cpu_time_s"),
        "final_val_loss": final,
        "final_val_loss_vs_target_pct": None
        if final is None
        else 100.0 * (final - target) / target,
        "best_val_loss_vs_target_pct": None
        if best_loss is None
        else 100.0 * (best_loss - target) / target,
        "time_to_target_s": ttt,
        "time_to_target_cpu_s": ttt_cpu,
        "time_breakdown_s": tb,
        "time_share": {k: _div(v, wall) for k, v in tb.items()},
        # scoring cost per sample relative to a training fwd+bwd per sample; with a proxy
        # scorer its forward and its online training are the scoring cost
        "scoring_cost_ratio": _div(
            _div(sum(tb[k] for k in SCORING_TIMERS), summary["scored_samples"] or None),
            _div(tb["train_fwd_bwd_s"], summary["bp_samples"] or None),
        ),
        # bookkeeping (all-gather + selection + score update) share of a selection step
        "bookkeeping_share": _div(tb["select_s"], select_step_s or None),
        "evolved_sampling": summary.get("evolved_sampling"),
        "proxy": summary.get("proxy"),  # scorer proxy: its model, FLOPs ratio, learning
        "proxy_pretrain_s": proxy_pretrain_s(summary),
        "val_history": hist,
    }
    if uniform is not None:
        rec["time_to_target_ratio"] = _div(ttt, uniform["time_to_target_s"])
        rec["time_to_target_cpu_ratio"] = _div(ttt_cpu, uniform["time_to_target_cpu_s"])
        rec["speedup"] = _div(uniform["time_to_target_s"], ttt)
        rec["speedup_cpu"] = _div(uniform["time_to_target_cpu_s"], ttt_cpu)
        # a base: proxy's pre-training, shared by every run naming it: the share with it
        pre = proxy_pretrain_s(summary)
        if pre is not None:
            rec["time_to_target_ratio_with_proxy_pretrain"] = _div(
                None if ttt is None else ttt + pre, uniform["time_to_target_s"]
            )
        # how long uniform needed for this run's final loss: a saving even when the target
        # itself is missed (>1 means this run got there faster than uniform)
        u_hist = uniform["val_history"]
        u_own = time_to_target(u_hist, final, "wall_clock_s") if final is not None else None
        u_own_cpu = time_to_target(u_hist, final, "cpu_time_s") if final is not None else None
        rec["uniform_time_to_own_loss_s"] = u_own
        rec["speedup_vs_uniform"] = _div(u_own, wall)
        rec["speedup_vs_uniform_cpu"] = _div(u_own_cpu, cpu)
        own = best_loss if target_kind == "best" else final
        rec["meets_goal"] = bool(
            rec["time_to_target_ratio"] is not None
            and rec["time_to_target_ratio"] <= GOAL_TIME_SHARE
            and own is not None
            and own <= target * (1 + GOAL_LOSS_SLACK)
        )
    return rec


def proxy_pretrain_s(summary: dict[str, Any]) -> float | None:
    """Wall seconds a base: proxy took to pre-train (None: no such proxy). Not in the run's
    own time: every run naming the same base shares it, so compare shows both ratios."""
    pre = (summary.get("proxy") or {}).get("pretrain") or {}
    wall = pre.get("wall_clock_s")
    return None if wall is None else float(wall)


def comparison_methods(
    summaries: dict[str, dict[str, Any]],
    steps: dict[str, list[dict[str, Any]]],
    *,
    matched_to: str | None = None,
    target: str = "final",
) -> dict[str, dict[str, Any]]:
    """compare.json's "methods": every run's record against uniform's `target` ("best" or
    "final") validation loss.

    `summaries` must hold "uniform"; with `matched_to`, `MATCHED` is uniform given that run's
    training time, and every other run also gets its best and final loss minus
    uniform-matched's.
    """
    loss = target_loss(summaries["uniform"], target)
    if loss is None:
        loss = math.nan  # uniform never evaluated to a finite loss: no run reaches the target
    kw = {"target_kind": target}
    uniform = method_record(summaries["uniform"], steps.get("uniform", []), loss, None, **kw)
    methods = {
        name: method_record(s, steps.get(name, []), loss, uniform, **kw)
        for name, s in summaries.items()
    }
    if matched_to is None or MATCHED not in methods:
        return methods
    m = methods[MATCHED]
    m["matched_to"] = matched_to
    for name, rec in methods.items():
        if name in ("uniform", MATCHED):
            continue
        for key in ("final_val_loss", "best_val_loss"):
            if rec[key] is not None and m[key] is not None:
                rec[f"{key}_vs_matched"] = rec[key] - m[key]
    return methods


def median_or_none(values: list[Any]) -> float | None:
    """The median of the finite numbers among `values`; None when there are none."""
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return statistics.median(xs) if xs else None


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


SPREAD_KEYS = ("wall_clock_s", "cpu_time_s", "time_to_target_ratio", "speedup", "best_val_loss")


def median_methods(rounds: list[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per method, the median over the rounds of `--repeats` of every number in its record.

    Numbers nested one level (the time breakdown) are taken key by key. The rest (the
    validation history, the ES settings) comes from the round whose training wall-clock is
    the median one (the lower of the two middle ones for an even count), so the curves drawn
    are a real run's. `per_round` keeps each round's value of the headline numbers; a value
    missing in some rounds (the target not reached) is the median of the rounds that have it.
    """
    out: dict[str, dict[str, Any]] = {}
    for name in rounds[0]:
        recs = [r[name] for r in rounds if name in r]
        walls = sorted(range(len(recs)), key=lambda i: recs[i]["wall_clock_s"])
        rep = recs[walls[(len(recs) - 1) // 2]]
        med: dict[str, Any] = {}
        for key, value in rep.items():
            if _is_number(value) or (value is None and any(_is_number(r.get(key)) for r in recs)):
                m = median_or_none([r.get(key) for r in recs])
                med[key] = int(round(m)) if isinstance(value, int) and m is not None else m
            elif isinstance(value, dict) and value and all(_is_number(v) for v in value.values()):
                med[key] = {k: median_or_none([r[key].get(k) for r in recs]) for k in value}
            else:
                med[key] = value
        # a yes/no per round: the goal is met by the median when most rounds met it
        if "meets_goal" in rep:
            med["meets_goal"] = sum(bool(r.get("meets_goal")) for r in recs) * 2 > len(recs)
        med["rounds"] = len(recs)
        med["per_round"] = {k: [r.get(k) for r in recs] for k in SPREAD_KEYS}
        out[name] = med
    return out


ROUND_KEYS = ("wall_clock_s", "cpu_time_s", "steps", "best_val_loss", "best_step",
              "final_val_loss", "time_to_target_s", "time_to_target_ratio", "speedup",
              "conditions", "run_dir", "budget_s", "budget_used")  # fmt: skip


def round_view(rec: dict[str, Any]) -> dict[str, Any]:
    """A run's record in compare.json "rounds" and "per_seed": the headline numbers (the
    full record is in the run's own directory as its summary.json)."""
    return {k: rec[k] for k in ROUND_KEYS if k in rec}


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
        seeds = res.get("seeds")
        if seeds and len(seeds["seeds"]) > 1:  # --seeds: each run's verdicts at this budget
            budgets[str(epochs)]["seeds"] = seeds["seeds"]
            budgets[str(epochs)]["seed_differences"] = seeds["differences"]
    return {"epochs": budgets}

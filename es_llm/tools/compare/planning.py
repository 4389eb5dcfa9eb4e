"""Which runs a comparison makes, how long each is, and uniform-matched's budget.

Run lengths come from the run's `RunPlan` (`es_llm.sampling.plan`, the one the training loop
builds: burn-in steps at B, pruned epochs at their expected kept share), so compare spaces
evaluations on the schedule the training loop will actually follow.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from es_llm.errors import InputError
from es_llm.tools.compare.metrics import MATCHED, reference_cost

__all__ = [
    "EVALS_PER_RUN",
    "RunSpec",
    "Variant",
    "eval_every",
    "match_reference",
    "matched_spec",
    "matched_steps",
    "plan_runs",
    "planned_steps",
    "variants",
]

EVALS_PER_RUN = 20  # evaluations per run: time-to-target resolution of 5% of the run


@dataclass
class Variant:
    """One run of the comparison: a display name, a method and its own ES overrides;
    `epochs_x` multiplies the comparison's epochs for this run (e.g. a cheap scorer at r = 0.5
    given 2x the epochs takes as many optimizer steps as uniform)."""

    name: str
    method: str
    overrides: dict[str, Any] = field(default_factory=dict)
    epochs_x: int = 1


@dataclass
class RunSpec:
    """What one run trains, on top of the comparison's shared flags: every field but `name`
    is a `TrainOptions` field of the same name and replaces it (ES overrides add up)."""

    name: str
    method: str
    es_overrides: dict[str, Any]
    epochs: int
    eval_every: int
    max_steps: int | None = None
    max_wall_clock_s: float | None = None
    max_cpu_time_s: float | None = None


def planned_steps(
    config: str,
    variant: Variant,
    es_overrides: dict[str, Any],
    *,
    n_train: int,
    world: int,
    epochs: int,
    max_steps: int | None,
) -> int:
    """Optimizer steps the run of `variant` will take (the training loop's own plan)."""
    from es_llm.drivers.deepspeed.dsconfig import es_config_for_run, load_ds_config
    from es_llm.sampling.plan import RunPlan

    ds = load_ds_config(config)
    es = es_config_for_run(ds, variant.method, {**es_overrides, **variant.overrides})
    plan = RunPlan.build(
        ds, es, dp_size=world, num_samples=n_train, epochs=epochs, max_steps=max_steps
    )
    return plan.total_steps


def plan_runs(
    config: str,
    runs: list[Variant],
    es_overrides: dict[str, Any],
    *,
    n_train: int,
    world: int,
    epochs: int,
    max_steps: int | None,
    requested_eval_every: int | None,
) -> list[RunSpec]:
    """Every run's spec, planned before any of them starts: a bad override or batch size of
    any run is reported (as an `InputError`) before the first run spends its time."""
    specs = []
    for v in runs:
        run_epochs = epochs * v.epochs_x
        steps = planned_steps(
            config, v, es_overrides, n_train=n_train, world=world, epochs=run_epochs,
            max_steps=max_steps,
        )  # fmt: skip
        every = eval_every(requested_eval_every, steps)
        specs.append(RunSpec(v.name, v.method, v.overrides, run_epochs, every, max_steps=max_steps))
    return specs


def eval_every(requested: int | None, steps: int) -> int:
    """`--eval-every`, else about `EVALS_PER_RUN` evaluations over `steps`."""
    return requested or max(1, steps // EVALS_PER_RUN)


def matched_steps(budget_s: float, uniform_s: float, uniform_steps: int) -> int:
    """Steps uniform-matched plans for: those of uniform's step time that fit `budget_s`.

    More than uniform's own run when the budget is longer (`matched_spec` then gives it the
    epochs to hold them), never fewer than 1. Its LR schedule is planned for this length, so
    it is a properly annealed run; the clock budget stops it in any case.
    """
    if uniform_steps < 1 or uniform_s <= 0:
        return max(1, uniform_steps)
    per_step = uniform_s / uniform_steps
    return max(1, round(budget_s / per_step))


def matched_spec(
    uniform: dict[str, Any],
    reference: dict[str, Any],
    *,
    clock: str,
    epochs: int,
    requested_eval_every: int | None,
) -> RunSpec:
    """uniform-matched: uniform given the reference run's training time on `clock` ("wall" or
    "cpu"), from the two runs' summaries; planned for the steps that fit (`matched_steps`),
    with as many more epochs as those steps need when the budget outlasts uniform's run.

    The reference run's time includes its reference model (training and pass, e.g. method
    excess): uniform gets all the compute the method spent."""
    key = "cpu_time_s" if clock == "cpu" else "wall_clock_s"
    model_wall, model_cpu = reference_cost(reference)
    budget = float(reference[key]) + (model_cpu if clock == "cpu" else model_wall)
    steps = matched_steps(budget, uniform[key], uniform["steps"])
    need = math.ceil(steps * epochs / uniform["steps"]) if uniform["steps"] >= 1 else epochs
    return RunSpec(
        MATCHED, "uniform", {}, max(epochs, need), eval_every(requested_eval_every, steps),
        max_steps=steps,
        max_wall_clock_s=budget if key == "wall_clock_s" else None,
        max_cpu_time_s=budget if key == "cpu_time_s" else None,
    )  # fmt: skip


def variants(methods: list[str], extra: list[Variant]) -> list[Variant]:
    """The runs: one per method, then the `--variant`s; uniform always, and first."""
    out = [Variant(m, m) for m in methods] + list(extra)
    names = [v.name for v in out]
    if len(set(names)) != len(names):
        raise InputError(f"duplicate run names {names}: give each --variant its own NAME")
    if "uniform" not in names:
        out.insert(0, Variant("uniform", "uniform"))  # the target comes from uniform
    return sorted(out, key=lambda v: v.name != "uniform")


def match_reference(runs: list[Variant], match: str | None, *, enabled: bool = True) -> str | None:
    """The run whose training time uniform-matched gets: `--match`, else es, else the first
    run that is not uniform; None without uniform-matched."""
    if not enabled:
        return None
    names = [v.name for v in runs]
    if match is not None:
        if match not in names:
            raise InputError(f"--match {match!r} must name one of the runs: {', '.join(names)}")
        return match
    for cand in ("es", *names):
        if cand in names and cand != "uniform":
            return cand
    return None

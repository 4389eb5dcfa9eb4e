"""`--seeds N`: the comparison at N seeds, each method's mean and spread, and the rule that
says whether a difference between two methods is larger than the seeds' spread. Pure
functions on compare.json records.

- `seed_list`: the seeds of a comparison, `--seed` and the N - 1 after it;
- `spread`: mean, sample standard deviation, min and max of one number over the seeds;
- `seed_aggregates`: those, per method and per number of `SEED_KEYS`;
- `difference`: one method against a baseline on one number, with its verdict;
- `seed_differences`: every method against uniform and uniform-matched;
- `seeds_block`: compare.json's "seeds" entry;
- `median_over_seeds`: the per-method medians over the seeds ("methods" of a multi-seed
  compare.json, what the existing tables and the plot show).
"""

from __future__ import annotations

import math
import statistics
from typing import Any

from es_llm.tools.compare.metrics import MATCHED, median_methods

__all__ = [
    "HIGHER",
    "LOWER",
    "NO_SPREAD",
    "RULE",
    "SAME",
    "SEED_KEYS",
    "SPREAD",
    "TOO_FEW",
    "difference",
    "median_over_seeds",
    "seed_aggregates",
    "seed_differences",
    "seed_list",
    "seeds_block",
    "spread",
]

SPREAD = "sample standard deviation"
RULE = (
    "no difference when |mean_a - mean_b| <= max(sd_a, sd_b), sd the sample standard "
    "deviation over the seeds; decided only with at least 2 seeds with a value on each side"
)
SAME, LOWER, HIGHER = "no difference", "lower", "higher"
NO_SPREAD = "no spread (1 seed)"
TOO_FEW = "too few values"
# the numbers aggregated over the seeds and compared between methods
SEED_KEYS = (
    "best_val_loss",
    "final_val_loss",
    "time_to_target_s",
    "time_to_target_ratio",
    "time_to_target_cpu_ratio",
    "speedup",
    "speedup_cpu",
    "speedup_vs_uniform",
    "speedup_vs_uniform_cpu",
    "wall_clock_s",
    "cpu_time_s",
)
HIGHER_IS_BETTER = {"speedup", "speedup_cpu", "speedup_vs_uniform", "speedup_vs_uniform_cpu"}


def seed_list(first: int, count: int) -> list[int]:
    """The seeds `first, first + 1, ..., first + count - 1`."""
    if count < 1:
        raise ValueError(f"--seeds must be >= 1, got {count}")
    return list(range(first, first + count))


def _finite(values: list[Any]) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def spread(values: list[Any]) -> dict[str, Any]:
    """Mean, sample standard deviation (None below 2 values), min and max of the finite
    numbers among `values` (one per seed; None where the seed has none, e.g. the target not
    reached); `n` counts them and `values` keeps every seed's."""
    xs = _finite(values)
    return {
        "n": len(xs),
        "mean": statistics.fmean(xs) if xs else None,
        "sd": statistics.stdev(xs) if len(xs) >= 2 else None,
        "min": min(xs) if xs else None,
        "max": max(xs) if xs else None,
        "values": list(values),
    }


def seed_aggregates(per_seed: list[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per method (in the first seed's order) and number of `SEED_KEYS`, its `spread` over
    the seeds' records (compare.json "methods" of each seed)."""
    return {
        name: {key: spread([seed.get(name, {}).get(key) for seed in per_seed]) for key in SEED_KEYS}
        for name in per_seed[0]
    }


def difference(a: dict[str, Any], b: dict[str, Any], key: str, seeds: int) -> dict[str, Any]:
    """Method `a` against baseline `b` on `key` (two `spread`s): the difference of the means,
    the spread it is held against, and the verdict of `RULE` (`SAME`, `LOWER`, `HIGHER`;
    `NO_SPREAD` with one seed, `TOO_FEW` when a side has fewer than 2 values); `better` says
    whether a decided difference is in the method's favour."""
    diff = None if a["mean"] is None or b["mean"] is None else a["mean"] - b["mean"]
    out: dict[str, Any] = {"diff": diff, "spread": None, "verdict": NO_SPREAD, "better": None}
    if seeds < 2:
        return out
    if a["sd"] is None or b["sd"] is None or diff is None:
        return {**out, "verdict": TOO_FEW}
    limit = max(a["sd"], b["sd"])
    out["spread"] = limit
    if abs(diff) <= limit:
        return {**out, "verdict": SAME}
    lower = diff < 0
    return {
        **out,
        "verdict": LOWER if lower else HIGHER,
        "better": lower != (key in HIGHER_IS_BETTER),
    }


def seed_differences(
    aggregates: dict[str, dict[str, Any]], seeds: int
) -> dict[str, dict[str, dict[str, Any]]]:
    """Per method, against uniform and uniform-matched (those present, never itself), the
    `difference` on every number of `SEED_KEYS`: {name: {baseline: {key: difference}}}."""
    baselines = [b for b in ("uniform", MATCHED) if b in aggregates]
    return {
        name: {
            base: {k: difference(agg[k], aggregates[base][k], k, seeds) for k in SEED_KEYS}
            for base in baselines
            if base != name
        }
        for name, agg in aggregates.items()
    }


def seeds_block(seeds: list[int], per_seed: list[dict[str, dict[str, Any]]]) -> dict[str, Any]:
    """compare.json's "seeds": the seeds, what the spread is, the rule, and per method the
    aggregates and the differences against the baselines."""
    aggregates = seed_aggregates(per_seed)
    return {
        "seeds": list(seeds),
        "spread": SPREAD,
        "rule": RULE,
        "aggregates": aggregates,
        "differences": seed_differences(aggregates, len(seeds)),
    }


def median_over_seeds(
    results: dict[int, dict[str, Any]], *, repeats: int = 1
) -> dict[str, dict[str, Any]]:
    """Per method, the median over the seeds' records (`median_methods`: every number, the
    curves of the seed with the median training time), `run_dir` relative to the comparison
    (seed_<S>/...); `seeds` counts them and `per_seed` keeps each seed's headline numbers
    (a seed's own `per_round` is in its compare.json)."""
    recs = []
    for s, res in results.items():
        recs.append(
            {
                name: {
                    **{k: v for k, v in rec.items() if k not in ("rounds", "per_round")},
                    "run_dir": f"seed_{s}/{rec['run_dir']}",
                }
                for name, rec in res["methods"].items()
            }
        )
    methods = median_methods(recs)
    for rec in methods.values():
        rec["seeds"] = rec.pop("rounds")
        rec["per_seed"] = rec.pop("per_round")
        if repeats > 1:
            rec["rounds"] = repeats
    return methods

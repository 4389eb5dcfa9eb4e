"""`es-llm bench scores`: cost of the score shard at pre-training scale.

Why: ESWP plans every epoch over the whole shard and ES touches the table every step, so both
must stay cheap at 1e8 samples per rank: the plan in seconds, the per-step update independent
of N, and the state at most 8 bytes per sample.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from typing import Any

import numpy as np
import torch

from es_llm.errors import InputError
from es_llm.sampling.policies import es_weights
from es_llm.sampling.pruning import plan_epoch
from es_llm.sampling.scores import ScoreTable

__all__ = ["run_scores_bench"]

_FILL_CHUNK = 1 << 22


def _fill(table: ScoreTable, seed: int, never_scored_share: float = 0.1) -> None:
    """Random scores in (0, 1) with a share left never-scored (local generator, no global RNG)."""
    rng = np.random.default_rng(seed)
    arr = table.raw_scores.numpy()
    for lo in range(0, arr.size, _FILL_CHUNK):
        c = arr[lo : lo + _FILL_CHUNK]
        c[:] = rng.random(c.size, dtype=np.float32)
        c[rng.random(c.size) < never_scored_share] = np.nan


def _step_cost(table: ScoreTable, meta_batch: int, steps: int, seed: int) -> float:
    """Median seconds of one per-step update (gather + es_weights + update) over `steps`."""
    rng = np.random.default_rng(seed)
    times = []
    for _ in range(steps):
        ids = torch.from_numpy(
            rng.integers(table.offset, table.offset + table.num_samples, meta_batch, dtype=np.int64)
        )
        losses = torch.from_numpy(rng.random(meta_batch, dtype=np.float32) * 4)
        valid = torch.ones(meta_batch, dtype=torch.bool)
        t0 = time.perf_counter()
        prev = table.gather(ids)
        _, s_new = es_weights(prev, losses, 0.2, 0.8)
        table.update(ids, s_new, valid)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run_scores_bench(
    num_samples: int = 10**8,
    meta_batch: int = 1024,
    repeats: int = 3,
    out_dir: str | None = None,
) -> dict[str, Any]:
    """Time plan_epoch and the per-step update on a ScoreTable of num_samples; write JSON."""
    repeats = max(1, int(repeats))
    offset = 2**40  # ids beyond int32, implied by the offset
    t0 = time.perf_counter()
    table = ScoreTable(num_samples, offset=offset, s_init=1.0 / max(num_samples, 1))
    _fill(table, seed=0)
    build_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    total, count = table.sum_and_count()
    mean_s = time.perf_counter() - t0
    global_mean = total / count if count else float("nan")

    plan_times, plan = [], None
    for r in range(repeats):
        t0 = time.perf_counter()
        plan = plan_epoch(
            table,
            global_mean,
            epoch=r,
            epochs=repeats + 10,
            seed=1,
            prune_ratio=0.3,
            delta=1.0,
            rescale=True,
        )
        plan_times.append(time.perf_counter() - t0)
    if plan is None:
        raise InputError(f"--repeats must be >= 1, got {repeats}")
    kept = plan.num_kept()

    steps = 50
    step_big = min(_step_cost(table, meta_batch, steps, seed=r) for r in range(repeats))
    small = ScoreTable(max(meta_batch, 10_000), offset=offset, s_init=1.0)
    _fill(small, seed=1)
    step_small = min(_step_cost(small, meta_batch, steps, seed=r) for r in range(repeats))

    state_bytes = table.nbytes + plan.nbytes
    result: dict[str, Any] = {
        "num_samples": num_samples,
        "meta_batch": meta_batch,
        "repeats": repeats,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "build_and_fill_s": build_s,
        "sum_and_count_s": mean_s,
        "plan_epoch_s": {
            "min": min(plan_times),
            "median": statistics.median(plan_times),
            "all": plan_times,
        },
        "kept_fraction": kept / max(num_samples, 1),
        "step_update_s": {"n_samples": step_big, f"n_{small.num_samples}": step_small},
        "step_update_ratio_big_over_small": step_big / step_small if step_small else float("nan"),
        "bytes_per_sample": {
            "scores": table.nbytes / max(num_samples, 1),
            "plan_bits": plan.nbytes / max(num_samples, 1),
            "total": state_bytes / max(num_samples, 1),
        },
        "targets": {"plan_epoch_s_max": 2.0, "bytes_per_sample_max": 8.0},
    }

    rows = [
        ("samples", f"{num_samples:,}"),
        (
            "plan_epoch (min/median)",
            f"{min(plan_times):.3f} s / {statistics.median(plan_times):.3f} s",
        ),
        ("kept fraction", f"{result['kept_fraction']:.4f}"),
        ("sum_and_count", f"{mean_s:.3f} s"),
        (f"step update, B_meta={meta_batch}, N={num_samples:,}", f"{step_big * 1e6:.1f} us"),
        (
            f"step update, B_meta={meta_batch}, N={small.num_samples:,}",
            f"{step_small * 1e6:.1f} us",
        ),
        ("bytes/sample (scores + plan bits)", f"{result['bytes_per_sample']['total']:.3f}"),
    ]
    width = max(len(k) for k, _ in rows)
    print("scores bench")
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")

    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
        path = os.path.join(out_dir, "scores_bench.json")
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(result, f, indent=2)
        os.replace(tmp, path)
        result["path"] = path
        print(f"  wrote {path}")
    return result

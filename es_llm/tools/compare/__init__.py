"""`es-llm compare`: every sampling method on the same data, model, seed and epoch budget.

Why it exists: ES is only worth adopting if it reaches uniform's validation loss in less
training time. The runs go one after another, each in its own process, and are reported
while they train; the report gives per run the best and final validation loss, the training
time, the time to reach uniform's best (or final) loss and the time breakdown of a step.
`uniform-matched` is the fair equal-compute baseline: uniform given the reference run's
training time. Each run's machine conditions are measured, and `--repeats` interleaves
rounds of runs for time ratios that hold on a shared machine; `--seeds` runs it at several
seeds and says which differences are larger than the seeds' spread.

The package, one idea per module:

- `metrics`    — pure functions: time to target, best point, each run's record, medians, grid;
- `seeds`      — pure functions: the spread over `--seeds`, the no-difference rule;
- `planning`   — the runs, their lengths (the core's step estimator) and uniform-matched's budget;
- `runner`     — one run in child process(es) (`python -m es_llm.tools.compare --worker`);
- `live`       — following a run's metrics.jsonl and the lines printed while it trains;
- `conditions` — calibration, load average, and the rule for conditions too different to trust;
- `report`     — compare.md / grid.md (summary first, then tables) and the compare.png curves;
- `cli`        — the `es-llm compare` flags and one comparison from plan to report.
"""

from __future__ import annotations

from es_llm.tools.compare.cli import add_parser, run_from_args

__all__ = ["add_parser", "run_from_args"]

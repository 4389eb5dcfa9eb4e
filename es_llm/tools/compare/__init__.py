"""`es-llm compare`: every sampling method on the same data, model, seed and epoch budget.

Why it exists: ES is only worth adopting if it reaches uniform's validation loss in less
training time. The runs go one after another, each in its own process, and the report gives
per run the final validation loss, the training time (wall-clock and process CPU time), the
time to reach uniform's final loss, and the time breakdown of a step. `uniform-matched` is
the fair equal-compute baseline: uniform given the reference run's training time.

The package, one idea per module:

- `metrics`  — pure functions: time to target, each run's record, the grid summary;
- `planning` — the runs, their lengths (the core's step estimator) and uniform-matched's budget;
- `runner`   — one run in child process(es) (`python -m es_llm.tools.compare --worker`), machine info;
- `report`   — compare.md / grid.md tables and the compare.png curves;
- `cli`      — the `es-llm compare` flags and one comparison from plan to report.
"""

from __future__ import annotations

from es_llm.tools.compare.cli import add_parser, run_from_args

__all__ = ["add_parser", "run_from_args"]

"""compare.md, grid.md and compare.png: the comparison for people to read.

A plain summary first (which run reached the target, in what share of uniform's time), then
markdown tables (results, time breakdown, machine conditions, machine and command) and the validation-loss
curves against training wall-clock and CPU time. matplotlib and rich are imported only here.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

from es_llm.tools.compare.metrics import MATCHED, TIMER_LABELS

__all__ = [
    "conditions_lines",
    "grid_markdown",
    "markdown_report",
    "plot_comparison",
    "print_table",
    "seeds_lines",
    "summary_lines",
]


def _f(x: float | None, fmt: str = ".1f", none: str = "—") -> str:
    return none if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, fmt)


def _x(x: float | None) -> str:
    return _f(x, ".2f") + ("x" if x is not None else "")


def _pct(x: float | None) -> str:
    return _f(None if x is None else 100 * x, ".0f") + ("%" if x is not None else "")


def _loss(x: float | None) -> str:
    return _f(x, ".4f")


def summary_lines(result: dict[str, Any]) -> list[str]:
    """compare.md's opening: the target, then per run in one sentence whether it reached it
    and in what share of uniform's time; the conditions warning first when there is one."""
    kind = result["target"]["kind"]
    target = result["target_val_loss"]
    methods = result["methods"]
    uniform = methods["uniform"]
    lines: list[str] = []
    if result.get("conditions_differ"):
        lines += [
            "**Warning: the runs saw clearly different machine conditions, so the time "
            "ratios below are not to be trusted** ("
            + "; ".join(result["conditions_differ"])
            + "). Rerun with `--repeats 3` (the runs interleaved, the median per method) on a "
            "quieter machine.",
            "",
        ]
    repeats = result.get("repeats", 1)
    n_seeds = len(_seeds(result))
    med = f" (medians of {repeats} interleaved rounds)" if repeats > 1 else ""
    if n_seeds > 1:
        med = f" (medians over {n_seeds} seeds{', each the median of its rounds' if med else ''})"
    lines += [
        "## Summary",
        "",
        f"Target: uniform's {kind} validation loss, {_loss(target)}, which uniform reached "
        f"after {_f(uniform['time_to_target_s'])} s of training{med}. "
        "Speedup = uniform's time to the target ÷ the method's time to it: "
        "**speedup > 1 means the method pays**.",
        "",
    ]
    for name, r in methods.items():
        if name == "uniform":
            continue
        who = name
        if name == MATCHED:
            who = f"{name} (uniform given {r.get('matched_to')}'s training time)"
        if r["time_to_target_s"] is None:
            lines.append(
                f"- {who} did not reach the target; its best loss was {_loss(r['best_val_loss'])} "
                f"({_f(r['best_val_loss_vs_target_pct'], '+.1f')}%)."
            )
        else:
            with_pre = r.get("time_to_target_ratio_with_proxy_pretrain")
            pre = (
                f"; {_pct(with_pre)} counting its proxy's pre-training "
                f"({_f(r.get('proxy_pretrain_s'))} s, shared by the runs that name it)"
                if with_pre is not None
                else ""
            )
            lines.append(
                f"- {who} reached it in {_pct(r['time_to_target_ratio'])} of uniform's time "
                f"(speedup {_x(r['speedup'])}){pre}."
            )
    lines.append("")
    return lines + seeds_summary(result)


def _seeds(result: dict[str, Any]) -> list[int]:
    return (result.get("seeds") or {}).get("seeds") or []


# compare.md's seed tables: (JSON key, column, cell format)
SEED_COLUMNS = (
    ("best_val_loss", "best val loss", ".4f"),
    ("final_val_loss", "final val loss", ".4f"),
    ("time_to_target_ratio", "share of uniform's time to target", ".2f"),
    ("time_to_target_cpu_ratio", "share of uniform's CPU time to target", ".2f"),
    ("speedup_vs_uniform", "speedup vs uniform at its own final loss", ".2f"),
    ("wall_clock_s", "training time (s)", ".1f"),
)
VERDICT_KEYS = ("best_val_loss", "final_val_loss", "time_to_target_ratio")


def seeds_summary(result: dict[str, Any]) -> list[str]:
    """The summary's word on the seeds: with one, that no difference is known to exceed
    seed-to-seed noise; with several, each method's verdicts against uniform and
    uniform-matched on its best and final loss and its share of uniform's time."""
    block = result.get("seeds")
    if not block:
        return []
    seeds = block["seeds"]
    if len(seeds) == 1:
        return [
            f"One seed ({seeds[0]}): there is no spread to hold the differences against, so "
            "none of them is known to be larger than what another seed would change; "
            "`--seeds 3` (or more) tells.",
            "",
        ]
    bullets = []
    for name, against in block["differences"].items():
        for base, diffs in against.items():
            if name == "uniform" or (name == MATCHED and base == "uniform"):
                continue
            agg = block["aggregates"][name]
            said = "; ".join(
                f"{_label(k)} {_verdict(diffs[k])}{_defined_at(agg[k], len(seeds))}"
                for k in VERDICT_KEYS
            )
            bullets.append(f"- {name} vs {base}: {said}.")
    if not bullets:
        return []
    return [
        f"Over {len(seeds)} seeds ({', '.join(map(str, seeds))}), a difference no larger than "
        "the larger of the two methods' sample standard deviations is no difference:",
        "",
        *bullets,
        "",
    ]


def _defined_at(agg: dict[str, Any], seeds: int) -> str:
    return f" (defined at {agg['n']} of {seeds} seeds)" if agg["n"] < seeds else ""


def _label(key: str) -> str:
    return next(col for k, col, _ in SEED_COLUMNS if k == key)


def _verdict(d: dict[str, Any]) -> str:
    """`no difference`, `lower (better, by 0.0600 > spread 0.0100)`, `too few values`..."""
    if d["better"] is None:
        return d["verdict"]
    side = "better" if d["better"] else "worse"
    return f"{d['verdict']} ({side}: {_f(d['diff'], '+.4g')}, spread {_f(d['spread'], '.4g')})"


def _mean_sd(agg: dict[str, Any], fmt: str, seeds: int) -> str:
    if agg["mean"] is None:
        return "—"
    cell = f"{_f(agg['mean'], fmt)} ± {_f(agg['sd'], fmt)}"
    return cell + (f" ({agg['n']} of {seeds} seeds)" if agg["n"] < seeds else "")


def seeds_lines(result: dict[str, Any]) -> list[str]:
    """compare.md's seed section (several seeds only): per method the mean ± sample standard
    deviation of the headline numbers, then every difference against uniform and
    uniform-matched with its verdict."""
    block = result.get("seeds")
    if not block or len(block["seeds"]) < 2:
        return []
    n = len(block["seeds"])
    heads = [col for _, col, _ in SEED_COLUMNS]
    lines = [
        "## Seeds",
        "",
        f"Mean ± {block['spread']} over {n} seeds ({', '.join(map(str, block['seeds']))}); "
        "a share or speedup counts the seeds where it is defined (the target reached). "
        f"Rule: {block['rule']}.",
        "",
        "| method | " + " | ".join(heads) + " |",
        "|---|" + "---|" * len(heads),
    ]
    for name, agg in block["aggregates"].items():
        cells = [_mean_sd(agg[k], fmt, n) for k, _, fmt in SEED_COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    rows = [
        f"| {name} | {base} | "
        + " | ".join(_diff_cell(diffs[k], fmt) for k, _, fmt in SEED_COLUMNS)
        + " |"
        for name, against in block["differences"].items()
        for base, diffs in against.items()
    ]
    if rows:
        lines += [
            "",
            "Differences (method's mean minus the baseline's) and their verdicts:",
            "",
            "| method | vs | " + " | ".join(heads) + " |",
            "|---|---|" + "---|" * len(heads),
            *rows,
        ]
    return [*lines, ""]


def _diff_cell(d: dict[str, Any], fmt: str) -> str:
    """`+0.0600: higher (worse)`, `-0.0010: no difference`, `no spread (1 seed)`..."""
    side = "" if d["better"] is None else f" ({'better' if d['better'] else 'worse'})"
    head = "" if d["diff"] is None else f"{_f(d['diff'], '+' + fmt)}: "
    return head + d["verdict"] + side


def _validation_note(result: dict[str, Any]) -> str:
    """What the losses are measured on: the held-out sequences and the share held out
    (--val-share; results written before it existed hold none)."""
    n, share = result.get("val_samples"), result.get("val_share")
    if n is None or share is None:
        return ""
    source = f"of --val-data {result['val_data']}" if result.get("val_data") else "of the data"
    return f" Validation: {n} held-out sequences ({share:g} {source} held out, --val-share)."


def markdown_report(result: dict[str, Any]) -> str:
    """compare.md: the summary, the results table, the time breakdown, the conditions and
    how the numbers were taken."""
    kind = result["target"]["kind"]
    target = result["target_val_loss"]
    lines = ["# es-llm compare", "", *summary_lines(result), *seeds_lines(result)]
    lines += [
        "## Results",
        "",
        f"Time to target = training time until the validation loss first reached uniform's "
        f"{kind} loss {_loss(target)} ({result['epochs']} epochs, {result['train_samples']} "
        f"sequences, {result['world_size']} rank(s), model {result['model']}). Times are "
        "training time, evaluation excluded." + _validation_note(result),
        "",
        "| method | best val loss | best at step | best at time (s) | final val loss "
        f"| {kind} loss vs uniform's | training time (s) | CPU time (s) | time to target (s) "
        "| share of uniform's time | speedup | best loss minus uniform-matched's "
        "| samples trained | samples scored |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in result["methods"].items():
        own_pct = r[f"{kind}_val_loss_vs_target_pct"]
        lines.append(
            f"| {name} | {_loss(r['best_val_loss'])} | {_f(r['best_step'], 'd')} | "
            f"{_f(r['best_wall_clock_s'])} | {_loss(r['final_val_loss'])} | "
            f"{_f(own_pct, '+.2f')}{'%' if own_pct is not None else ''} | "
            f"{_f(r['wall_clock_s'])} | {_f(r['cpu_time_s'])} | {_f(r['time_to_target_s'])} | "
            f"{_pct(r.get('time_to_target_ratio'))} | {_x(r.get('speedup'))} | "
            f"{_f(r.get('best_val_loss_vs_matched'), '+.4f')} | "
            f"{r['bp_samples']} | {r['scored_samples']} |"
        )
    lines += [
        "",
        "Time breakdown (seconds, share of the training time):",
        "",
        "| method | " + " | ".join(TIMER_LABELS.values()) + " | other | scoring cost per sample "
        "÷ training cost per sample | bookkeeping share of a selection step |",
        "|---|" + "---|" * (len(TIMER_LABELS) + 3),
    ]
    for name, r in result["methods"].items():
        tb, sh = r["time_breakdown_s"], r["time_share"]
        cells = [f"{_f(tb[k])} ({_pct(sh[k])})" for k in (*TIMER_LABELS, "other_s")]
        lines.append(
            f"| {name} | " + " | ".join(cells) + f" | {_pct(r['scoring_cost_ratio'])} | "
            f"{_f(None if r['bookkeeping_share'] is None else 100 * r['bookkeeping_share'], '.2f')}"
            f"{'%' if r['bookkeeping_share'] is not None else ''} |"
        )
    lines += conditions_lines(result)
    m = result["machine"]
    lines += [
        "",
        f"Machine: {m['cpu']} ({m['cpu_count']} cores, {m.get('threads_per_rank')} threads per "
        f"rank), load average {m['load_average_start']} -> "
        f"{m['load_average_end']}; torch {m['torch']}, deepspeed {m['deepspeed']}; {m['date']}.",
        f"Command: `{result['command']}`",
        "",
    ]
    return "\n".join(lines)


def conditions_lines(result: dict[str, Any]) -> list[str]:
    """The machine conditions of every run: calibration time and load average; the budget
    uniform-matched got and used."""
    conds = result.get("conditions") or {}
    lines = [
        "",
        "Machine conditions per run (calibration: a fixed matmul timed just before the run; "
        "they differ clearly when calibrations differ by more than 25% or mean loads by more "
        "than half the cores):",
        "",
        "| run | calibration (ms) | mean load average | load first -> last |",
        "|---|---|---|---|",
    ]
    for name, c in conds.items():
        cal = c.get("calibration_s")
        lines.append(
            f"| {name} | {_f(None if cal is None else 1000 * cal, '.2f')} | "
            f"{_f(c.get('load_average_mean'), '.2f')} | {_f(c.get('load_average_first'), '.2f')}"
            f" -> {_f(c.get('load_average_last'), '.2f')} |"
        )
    matched = result["methods"].get(MATCHED)
    if matched is not None and matched.get("budget_s"):
        used = matched.get("budget_used")
        lines += [
            "",
            f"uniform-matched's budget: {_f(matched['budget_s'])} s of {matched.get('match_clock')}"
            f" training time ({matched.get('matched_to')}'s); it used {_pct(used)} of it"
            + (
                " (more than 2% off: its step time differed from uniform's)."
                if used is not None and abs(used - 1) > 0.02
                else "."
            ),
        ]
    return lines


def print_table(md: str) -> None:
    """Print a markdown table: rendered by rich on a terminal, as text otherwise."""
    try:
        if not sys.stdout.isatty():
            raise ImportError
        from rich.console import Console
        from rich.markdown import Markdown

        Console().print(Markdown(md))
    except ImportError:
        print(md, flush=True)


def plot_comparison(result: dict[str, Any], out_png: Path) -> None:
    """Validation loss against training wall-clock (and CPU time), one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, clock, label in (
        (axes[0], "wall_clock_s", "training wall-clock (s)"),
        (axes[1], "cpu_time_s", "training process CPU time (s)"),
    ):
        for name, r in result["methods"].items():
            pts = [(h[clock], h["val_loss"]) for h in r["val_history"] if h["val_loss"] is not None]
            if pts:
                xs, ys = zip(*pts, strict=True)
                style = "--" if name == MATCHED else "-"
                ax.plot(xs, ys, style, marker="o", ms=2.5, lw=1.2, label=name)
        ax.axhline(result["target_val_loss"], color="grey", ls=":", lw=1, label="target")
        ax.set_xlabel(label)
        ax.set_ylabel("validation loss (nats/token)")
        ax.grid(alpha=0.3)
        finals = [r["final_val_loss"] for r in result["methods"].values() if r["final_val_loss"]]
        if finals:  # zoom on the part of the curves where methods differ
            lo = min(finals)
            ax.set_ylim(lo - 0.05 * abs(lo), lo + max(0.5, 0.25 * abs(lo)))
    axes[0].legend(fontsize=8)
    fig.suptitle(
        f"es-llm compare: {result['epochs']} epochs, {result['train_samples']} sequences, "
        f"{result['world_size']} rank(s)"
    )
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def grid_markdown(grid: dict[str, Any]) -> str:
    """grid.md: one row per epoch budget and run (uniform is the reference of each budget);
    with --seeds, the numbers are medians over the seeds and a last column gives the verdict
    on the best loss against uniform and uniform-matched."""
    seeded = any("seed_differences" in b for b in grid["epochs"].values())
    lines = [
        "| epochs | method | best val loss | final val loss | final vs uniform's "
        "| final minus uniform-matched's | share of uniform's time to target | speedup "
        "| speedup (CPU time) |" + (" best val loss over the seeds |" if seeded else ""),
        "|---|---|---|---|---|---|---|---|---|" + ("---|" if seeded else ""),
    ]
    for epochs, b in grid["epochs"].items():
        for name, r in b["methods"].items():
            pct = r["final_val_loss_vs_target_pct"]
            lines.append(
                f"| {epochs} | {name} | {_loss(r.get('best_val_loss'))} | "
                f"{_loss(r['final_val_loss'])} | {_f(pct, '+.2f')}{'%' if pct is not None else ''}"
                f" | {_f(r['final_val_loss_vs_matched'], '+.4f')} | "
                f"{_pct(r['time_to_target_ratio'])} | {_x(r.get('speedup'))} | "
                f"{_x(r.get('speedup_cpu'))} |"
                + (f" {_grid_verdicts(b, name)} |" if seeded else "")
            )
    return "\n".join(lines) + "\n"


def _grid_verdicts(budget: dict[str, Any], name: str) -> str:
    """`vs uniform: no difference; vs uniform-matched: lower (better)` for one grid row."""
    against = (budget.get("seed_differences") or {}).get(name) or {}
    said = [f"vs {base}: {_diff_cell(d['best_val_loss'], '.4f')}" for base, d in against.items()]
    return "; ".join(said) or "—"

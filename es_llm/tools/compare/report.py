"""compare.md, grid.md and compare.png: the comparison for people to read.

Markdown tables (results, time breakdown, machine and command) and the validation-loss
curves against training wall-clock and CPU time. matplotlib and rich are imported only here.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

from es_llm.tools.compare.metrics import MATCHED, TIMER_LABELS

__all__ = ["grid_markdown", "markdown_report", "plot_comparison", "print_table"]


def _f(x: float | None, fmt: str = ".1f", none: str = "—") -> str:
    return none if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, fmt)


def _x(x: float | None) -> str:
    return _f(x, ".2f") + ("x" if x is not None else "")


def _pct(x: float | None) -> str:
    return _f(None if x is None else 100 * x, ".0f") + ("%" if x is not None else "")


def markdown_report(result: dict[str, Any]) -> str:
    """compare.md: the results table, the time breakdown, and how the numbers were taken."""
    target = result["target_val_loss"]
    lines = [
        f"Target: uniform's final validation loss {target:.4f} "
        f"({result['epochs']} epochs, {result['train_samples']} sequences, "
        f"{result['world_size']} rank(s), model {result['model']}).",
        "",
        "| method | final val loss | Δ vs uniform | Δ vs matched | train wall s | train CPU s "
        "| to target wall s | ÷ uniform | to target CPU ÷ uniform | speedup wall / CPU "
        "| BP samples | scored samples |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in result["methods"].items():
        lines.append(
            f"| {name} | {_f(r['final_val_loss'], '.4f')} | "
            f"{_f(r['final_val_loss_vs_target_pct'], '+.2f')}% | "
            f"{_f(r.get('final_val_loss_vs_matched'), '+.4f')} | "
            f"{_f(r['wall_clock_s'])} | {_f(r['cpu_time_s'])} | {_f(r['time_to_target_s'])} | "
            f"{_f(r.get('time_to_target_ratio'), '.2f')} | "
            f"{_f(r.get('time_to_target_cpu_ratio'), '.2f')} | "
            f"{_x(r.get('speedup_vs_uniform'))} / {_x(r.get('speedup_vs_uniform_cpu'))} | "
            f"{r['bp_samples']} | {r['scored_samples']} |"
        )
    lines += [
        "",
        "Time breakdown (seconds, share of the training time):",
        "",
        "| method | " + " | ".join(TIMER_LABELS.values()) + " | other | score cost / sample "
        "÷ train fwd+bwd / sample | bookkeeping ÷ selection step |",
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
    """grid.md: one row per epoch budget and run."""
    lines = [
        "| epochs | method | final val loss | Δ vs uniform | Δ vs uniform-matched (nats) "
        "| to target ÷ uniform (wall) | (CPU) | speedup (CPU) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for epochs, b in grid["epochs"].items():
        for name, r in b["methods"].items():
            lines.append(
                f"| {epochs} | {name} | {_f(r['final_val_loss'], '.4f')} | "
                f"{_f(r['final_val_loss_vs_target_pct'], '+.2f')}% | "
                f"{_f(r['final_val_loss_vs_matched'], '+.4f')} | "
                f"{_f(r['time_to_target_ratio'], '.2f')} | "
                f"{_f(r['time_to_target_cpu_ratio'], '.2f')} | "
                f"{_x(r['speedup_vs_uniform_cpu'])} |"
            )
    return "\n".join(lines) + "\n"

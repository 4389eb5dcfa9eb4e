"""The GPU check's table: per-run statistics, the three targets, JSON and markdown.

Everything here reads run directories (`summary.json`, `metrics.jsonl`) and plain dicts, so it
is tested on CPU with synthetic runs. `es_llm.tools.gpu_check` runs the pieces and calls it.
"""

from __future__ import annotations

import datetime as _dt
import json
import statistics
from pathlib import Path
from typing import Any

# the targets, on one H100/H200
BOOKKEEPING_MAX = 0.01  # gather + select + score update <= 1% of an ES step
UNIFORM_VS_PLAIN_MIN = 0.9  # es-llm uniform >= 0.9x the plain loop's tokens/s
ES_STEP_SLACK = 0.02  # ES step <= (uniform step + scoring forward of B_meta) x 1.02
MEGATRON_WARMUP = 2  # the megatron piece's first steps, left out of its tokens/s


# ------------------------------------------------------------------ reading runs
def read_run(run_dir: Path) -> dict[str, Any] | None:
    """summary.json and the step records of one run directory; None when it has no summary."""
    path = run_dir / "summary.json"
    if not path.is_file():
        return None
    steps = []
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                if rec.get("type", "step") == "step":
                    steps.append(rec)
    return {"summary": json.loads(path.read_text()), "steps": steps}


def _div(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def run_stats(run: dict[str, Any], warmup: int) -> dict[str, Any]:
    """tokens/s, step time and the per-step breakdown of one run.

    tokens/s and step times use the step records after `warmup` steps (back-propagated
    tokens over the sum of `step_s`); the breakdown is the run's own timers
    (`time_breakdown_s`): training fwd+bwd and optimizer per step, scoring forward and
    gather+select+update per selection step (burn-in steps do not score).
    """
    s, steps = run["summary"], run["steps"]
    seq = s["seq_len"]
    steady = steps[warmup:] if len(steps) > warmup else steps
    select_all = [r for r in steps if r.get("phase") == "select"]
    select_steady = [r for r in steady if r.get("phase") == "select"]
    n_steps = max(1, s["steps"])
    n_select = len(select_all)
    tb = s.get("time_breakdown_s")
    if tb is None:  # older summaries: per-step averages only
        tb = {k: v * n_steps for k, v in s["time_breakdown_per_step_s"].items()}
    step_s = [r["step_s"] for r in steady]
    sel_s = [r["step_s"] for r in select_steady]
    return {
        "method": s["method"],
        "steps": s["steps"],
        "select_steps": n_select,
        "tokens_per_s": _div(sum(r["selected"] for r in steady) * seq, sum(step_s)),
        "step_ms": 1e3 * statistics.fmean(step_s) if step_s else None,
        "select_step_ms": 1e3 * statistics.fmean(sel_s) if sel_s else None,
        "score_ms": 1e3 * tb["score_fwd_s"] / n_select if n_select else None,
        "select_ms": 1e3 * tb["select_s"] / n_select if n_select else None,
        "fwd_bwd_ms": 1e3 * tb["train_fwd_bwd_s"] / n_steps,
        "optimizer_ms": 1e3 * tb["optimizer_s"] / n_steps,
        "scoring_cost_ratio": _div(
            _div(tb["score_fwd_s"], s.get("scored_samples") or None),
            _div(tb["train_fwd_bwd_s"], s.get("bp_samples") or None),
        ),
        "bookkeeping_share": _div(tb["select_s"], sum(r["step_s"] for r in select_all) or None),
        "batch": s.get("batch"),
    }


def _target(name: str, value: float | None, limit: str, ok: bool | None) -> dict[str, Any]:
    return {"target": name, "value": value, "limit": limit,
            "result": "not measured" if ok is None else ("pass" if ok else "FAIL")}  # fmt: skip


def build_report(
    runs: dict[str, dict[str, Any] | None],
    syncs: dict[str, float | None],
    *,
    warmup: int,
    kernels: dict[str, Any] | None = None,
    compare: dict[str, Any] | None = None,
    info: dict[str, Any] | None = None,
    pieces: dict[str, dict[str, Any]] | None = None,
    megatron: dict[str, Any] | None = None,
    proxy: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The check's table from the runs' summaries (`runs[name]` as `read_run` returns it).

    `pieces` (piece name -> its record, in the order they run) gives each piece's status:
    a run that has no summary shows its piece's status ("not run", "running", "FAIL (exit 1)",
    "not run (budget)", ...). `megatron` is the Megatron-core driver's run (`read_run`),
    `proxy` the proxy scorer's cost (`es-llm bench proxy`'s proxy_bench.json).
    """
    pieces = pieces or {}
    stats = {name: run_stats(r, warmup) for name, r in runs.items() if r is not None}
    rows = []
    for name in ("uniform", "es", "plain"):
        st = stats.get(name)
        row: dict[str, Any] = {"run": name, "syncs_per_step": syncs.get(name)}
        if st is None:
            status = pieces.get(name, {}).get("status")
            row["status"] = status if status not in (None, "ok") else "not run or failed"
        else:
            row.update({k: st[k] for k in ("tokens_per_s", "step_ms", "select_step_ms",
                                           "score_ms", "select_ms", "fwd_bwd_ms",
                                           "optimizer_ms")})  # fmt: skip
            row["status"] = "ok"
        rows.append(row)
    es, uni, plain = stats.get("es"), stats.get("uniform"), stats.get("plain")
    ratio = es["scoring_cost_ratio"] if es else None
    share = es["bookkeeping_share"] if es else None
    targets = [
        _target("bookkeeping (gather + select + score update) / ES step", share,
                f"<= {BOOKKEEPING_MAX:.0%}", None if share is None else share <= BOOKKEEPING_MAX),
    ]  # fmt: skip
    rel = _div(uni and uni["tokens_per_s"], plain and plain["tokens_per_s"])
    targets.append(
        _target("es-llm uniform tokens/s / plain loop tokens/s", rel,
                f">= {UNIFORM_VS_PLAIN_MIN}", None if rel is None else rel >= UNIFORM_VS_PLAIN_MIN)
    )  # fmt: skip
    es_ms = es and es["select_step_ms"]
    bound = None
    if es_ms is not None and uni and uni["step_ms"] is not None:
        bound = (uni["step_ms"] + es["score_ms"]) * (1 + ES_STEP_SLACK)
    targets.append(
        _target("ES step ms / ((uniform step + scoring fwd of B_meta) x 1.02)",
                _div(es_ms, bound), "<= 1", None if bound is None else es_ms <= bound)
    )  # fmt: skip
    report: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **{k: v for k, v in (info or {}).items() if k != "pieces"},
        "warmup_steps_excluded": warmup,
        "rows": rows,
        "scoring_cost_ratio": ratio,
        "bookkeeping_share": share,
        "es_step_bound_ms": bound,
        "targets": targets,
        "kernel_tests": kernels,
        "compare": _compare_summary(compare),
        "runs": stats,
        "megatron": _megatron_summary(megatron),
        "proxy": proxy,
        "pieces": pieces,
    }
    return report


def _megatron_summary(run: dict[str, Any] | None) -> dict[str, Any] | None:
    """What the megatron piece shows: it trains, its speed (few steps: indicative only)."""
    if run is None:
        return None
    s, steps = run["summary"], run["steps"]
    steady = steps[MEGATRON_WARMUP:] if len(steps) > MEGATRON_WARMUP else steps
    step_s = sum(r["step_s"] for r in steady)
    return {
        "steps": s["steps"],
        "tensor_parallel_size": s.get("tensor_parallel_size"),
        "select_steps": sum(r.get("phase") == "select" for r in steps),
        "first_train_loss": steps[0]["train_loss"] if steps else None,
        "last_train_loss": steps[-1]["train_loss"] if steps else None,
        "final_val_loss": s.get("final_val_loss"),
        "tokens_per_s": _div(sum(r["selected"] for r in steady) * s["seq_len"], step_s),
        "export": (s.get("export") or {}).get("model_dir"),
    }


def _compare_summary(compare: dict[str, Any] | None) -> dict[str, Any] | None:
    if compare is None:
        return None
    return {
        name: {k: rec.get(k) for k in ("final_val_loss", "final_val_loss_vs_target_pct",
                                       "wall_clock_s", "steps", "speedup_vs_uniform")}
        for name, rec in compare.get("methods", {}).items()
    }  # fmt: skip


def _f(x: Any, spec: str, none: str = "n/a") -> str:
    return none if x is None else format(x, spec)


def render_markdown(report: dict[str, Any]) -> str:
    lines = [
        f"# es-llm GPU check — {report.get('device', '?')}, {report['date']}",
        "",
        f"Config `{report.get('config')}`, model `{report.get('model')}`, seq len "
        f"{report.get('seq_len')}, {report.get('steps')} steps per run (first "
        f"{report['warmup_steps_excluded']} left out of tokens/s and step times).",
        "",
        *_pieces_markdown(report),
        "| run | tokens/s | step ms | ES step ms | score ms | select ms | fwd+bwd ms "
        "| optimizer ms | host syncs / step |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        if r["status"] != "ok":
            lines.append(f"| {r['run']} | {r['status']} |  |  |  |  |  |  | "
                         f"{_f(r['syncs_per_step'], '.2f')} |")  # fmt: skip
            continue
        lines.append(
            f"| {r['run']} | {_f(r['tokens_per_s'], ',.0f')} | {_f(r['step_ms'], '.1f')} | "
            f"{_f(r['select_step_ms'], '.1f', '—')} | {_f(r['score_ms'], '.1f', '—')} | "
            f"{_f(r['select_ms'], '.2f', '—')} | {_f(r['fwd_bwd_ms'], '.1f')} | "
            f"{_f(r['optimizer_ms'], '.1f')} | {_f(r['syncs_per_step'], '.2f')} |"
        )
    lines += [
        "",
        f"Scoring cost ratio (scoring fwd per sample / training fwd+bwd per sample): "
        f"{_f(report['scoring_cost_ratio'], '.3f')}. Bookkeeping share (gather + select + "
        f"score update / ES step): {_f(report['bookkeeping_share'], '.2%')}.",
        "",
        "| target | value | limit | result |",
        "|---|---|---|---|",
    ]
    for t in report["targets"]:
        lines.append(f"| {t['target']} | {_f(t['value'], '.4f')} | {t['limit']} | {t['result']} |")
    k = report.get("kernel_tests")
    if k is not None:
        lines += ["", f"Kernel parity tests: {k.get('result')} ({k.get('summary')})."]
    m = report.get("megatron")
    if m:
        lines += ["", f"Megatron-core (`--engine megatron`, TP={m['tensor_parallel_size']}): "
                  f"{m['steps']} steps ({m['select_steps']} selecting), train loss "
                  f"{_f(m['first_train_loss'], '.3f')} -> {_f(m['last_train_loss'], '.3f')}, "
                  f"final val loss {_f(m['final_val_loss'], '.4f')}, "
                  f"{_f(m['tokens_per_s'], ',.0f')} tokens/s after its first "
                  f"{MEGATRON_WARMUP} steps (a few steps: indicative only)."]  # fmt: skip
    px = report.get("proxy")
    if px:
        ms, cost = px["per_sample_ms"], px["scoring_cost_per_training_sample"]
        lines += ["", f"Proxy scorer `{px['proxy']['proxy_model']}` "
                  f"({_f(px['proxy']['flops_ratio'], '.3f')} of `{px['learner']}`'s FLOPs per "
                  f"token, {px['dtype']}): its forward costs "
                  f"{_f(px['proxy_vs_learner_score'], '.3f')} of the learner's scoring forward "
                  f"({_f(ms['proxy_score_ms'], '.4f')} vs {_f(ms['learner_score_ms'], '.4f')} ms "
                  f"per sample); scoring cost per scored sample / training cost per sample: "
                  f"learner {_f(cost['learner'], '.3f')}, proxy {_f(cost['proxy'], '.3f')} "
                  f"(its learning at r = {px['selection_ratio']} included)."]  # fmt: skip
    c = report.get("compare")
    if c:
        lines += ["", "| compare run | final val loss | vs uniform | train wall s | steps |",
                  "|---|---|---|---|---|"]  # fmt: skip
        for name, rec in c.items():
            lines.append(
                f"| {name} | {_f(rec['final_val_loss'], '.4f')} | "
                f"{_f(rec['final_val_loss_vs_target_pct'], '+.2f')}% | "
                f"{_f(rec['wall_clock_s'], '.1f')} | {_f(rec['steps'], 'd')} |"
            )
    return "\n".join(lines) + "\n"


def _pieces_markdown(report: dict[str, Any]) -> list[str]:
    """The pieces in the order they run: status, seconds taken, seconds budgeted, log."""
    pieces = report.get("pieces") or {}
    if not pieces:
        return []
    budget = report.get("budget_s")
    lines = [
        f"Pieces, in order (whole check budget: {_f(budget, '.0f', 'none')} s; this table is "
        "rewritten as each piece starts and ends):",
        "",
        "| # | piece | status | seconds | budget s | log |",
        "|---|---|---|---|---|---|",
    ]
    for i, (name, rec) in enumerate(pieces.items(), 1):
        lines.append(
            f"| {i} | {name} | {rec.get('status')} | {_f(rec.get('seconds'), '.0f', '')} | "
            f"{_f(rec.get('estimate_s'), '.0f', '')} | {rec.get('log') or ''} |"
        )
    return [*lines, ""]

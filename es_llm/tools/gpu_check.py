"""The GPU check: `bash launch/gpu_check.sh [OUT_DIR]` (or `python -m es_llm.tools.gpu_check OUT_DIR`).

On one GPU it runs, each as a process of its own with its log in OUT/logs/:

1. `kernels`: the kernel parity tests (`pytest tests/test_kernels_*.py`), on the GPU;
2. `uniform`, `es`: a few hundred steps of `es-llm train` with a shipped GPU config;
3. `plain`: the same model and batch in a plain PyTorch loop (`es_llm.tools.bench_plain`);
4. `syncs`: uniform, ES and plain again, short, twice each, under `es_llm.tools.sync_count`, for the
   host synchronisations per optimizer step;
5. `compare`: a short `es-llm compare` of uniform against es;

then prints one table and writes it to OUT/gpu_check.json and OUT/gpu_check.md. Nothing is
downloaded: the data is the embedded corpus. `--cpu-smoke` runs the same pieces with a tiny
model on the CPU, to test the check itself; its numbers mean nothing about a GPU.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from es_llm.sampling.methods import get_method

PIECES = ("kernels", "uniform", "es", "plain", "syncs", "compare")

# the issue's targets, on one H100
BOOKKEEPING_MAX = 0.01  # gather + select + score update <= 1% of an ES step
UNIFORM_VS_PLAIN_MIN = 0.9  # es-llm uniform >= 0.9x the plain loop's tokens/s
ES_STEP_SLACK = 0.02  # ES step <= (uniform step + scoring forward of B_meta) x 1.02


@dataclass
class Setup:
    """What the check runs. GPU defaults; `cpu_smoke()` gives the tiny CPU variant."""

    out: Path
    repo: Path
    config: str = "zero1_bf16"
    model: str = "gpt2-124m"
    seq_len: int = 256
    vocab_size: int = 8192
    steps: int = 300
    warmup_steps: int = 20  # left out of tokens/s and step times (first-step allocations)
    max_val_samples: int = 256
    max_train_samples: int | None = None
    sync_steps: tuple[int, int] = (10, 30)
    compare_train_samples: int = 4096
    compare_epochs: int = 1
    data: str | None = None
    cache_dir: str | None = None
    skip: set[str] = field(default_factory=set)
    cpu_smoke: bool = False

    @classmethod
    def cpu_smoke_setup(cls, out: Path, repo: Path, skip: set[str]) -> Setup:
        return cls(
            out=out, repo=repo, config="cpu_tiny", model="gpt2-tiny", seq_len=32,
            vocab_size=512, steps=4, warmup_steps=1, max_val_samples=32,
            max_train_samples=256, sync_steps=(2, 3), compare_train_samples=256, skip=skip,
            cpu_smoke=True,
        )  # fmt: skip

    def data_args(self) -> list[str]:
        args = ["--config", self.config, "--model", self.model, "--seq-len", str(self.seq_len),
                "--vocab-size", str(self.vocab_size)]  # fmt: skip
        if self.max_train_samples is not None:
            args += ["--max-train-samples", str(self.max_train_samples)]
        if self.data is not None:
            args += ["--data", self.data]
        if self.cache_dir is not None:
            args += ["--cache-dir", self.cache_dir]
        return args

    def train_args(self, method: str, steps: int, out: Path) -> list[str]:
        args = ["train", *self.data_args(), "--method", method, "--max-steps", str(steps),
                "--epochs", "100", "--max-val-samples", str(self.max_val_samples),
                "--no-progress", "--out", str(out)]  # fmt: skip
        if get_method(method).scoring_forward:
            args += ["--es", "burn_in_steps=1"]  # the same burn-in at every run length
        return args

    def plain_args(self, steps: int, out: Path) -> list[str]:
        return [*self.data_args(), "--steps", str(steps), "--out", str(out)]


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
) -> dict[str, Any]:
    """The check's table from the runs' summaries (`runs[name]` as `read_run` returns it)."""
    stats = {name: run_stats(r, warmup) for name, r in runs.items() if r is not None}
    rows = []
    for name in ("uniform", "es", "plain"):
        st = stats.get(name)
        row: dict[str, Any] = {"run": name, "syncs_per_step": syncs.get(name)}
        if st is None:
            row["status"] = "not run or failed"
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
        **(info or {}),
        "warmup_steps_excluded": warmup,
        "rows": rows,
        "scoring_cost_ratio": ratio,
        "bookkeeping_share": share,
        "es_step_bound_ms": bound,
        "targets": targets,
        "kernel_tests": kernels,
        "compare": _compare_summary(compare),
        "runs": stats,
    }
    return report


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
    failed = [f"{p}: exit {v['returncode']} (log {v['log']})"
              for p, v in report.get("pieces", {}).items() if v.get("returncode")]  # fmt: skip
    if failed:
        lines += ["", "Failed pieces: " + "; ".join(failed) + "."]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ running the pieces
def _run(cmd: list[str], log: Path, cwd: Path, env: dict[str, str]) -> int:
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"gpu_check: {' '.join(cmd[1:])}  (log {log})", flush=True)
    t0 = time.perf_counter()
    with log.open("w") as fh:
        rc = subprocess.run(cmd, cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT).returncode
    print(f"gpu_check:   exit {rc} after {time.perf_counter() - t0:.0f}s", flush=True)
    return rc


def _kernel_tests(setup: Setup, env: dict[str, str], pieces: dict) -> dict[str, Any]:
    tests = sorted(str(p) for p in (setup.repo / "tests").glob("test_kernels_*.py"))
    log = setup.out / "logs" / "kernels.log"
    if not tests:
        pieces["kernels"] = {"returncode": 1, "log": str(log)}
        return {"result": "FAIL", "summary": f"no tests/test_kernels_*.py under {setup.repo}"}
    rc = _run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests], log,
              setup.out, env)  # fmt: skip
    pieces["kernels"] = {"returncode": rc, "log": str(log)}
    tail = [ln for ln in log.read_text().splitlines() if ln.strip()][-1:] or ["no output"]
    return {"result": "pass" if rc == 0 else "FAIL", "summary": tail[0].strip("= ")}


def _sync_counts(setup: Setup, env: dict[str, str], pieces: dict) -> dict[str, float | None]:
    from es_llm.tools.sync_count import per_step

    out: dict[str, float | None] = {}
    for name in ("uniform", "es", "plain"):
        recs = []
        for n in setup.sync_steps:
            run_dir = setup.out / "syncs" / f"{name}-{n}"
            rec_path = setup.out / "syncs" / f"{name}-{n}.json"
            job = (["plain", *setup.plain_args(n, run_dir)] if name == "plain"
                   else setup.train_args(name, n, run_dir))  # fmt: skip
            rc = _run([sys.executable, "-m", "es_llm.tools.sync_count", str(rec_path), *job],
                      setup.out / "logs" / f"syncs-{name}-{n}.log", setup.out, env)  # fmt: skip
            pieces[f"syncs-{name}-{n}"] = {"returncode": rc, "log": f"logs/syncs-{name}-{n}.log"}
            recs.append(json.loads(rec_path.read_text()) if rc == 0 else {"syncs": None})
        out[name] = per_step(recs[0], recs[1])
    return out


def _device_info() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda}
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name(0)
    else:
        info["device"] = "cpu (no GPU: numbers say nothing about a GPU)"
    try:
        import deepspeed

        info["deepspeed"] = deepspeed.__version__
    except Exception as e:  # reported, not fatal: the train pieces will fail and say why
        info["deepspeed"] = f"not importable: {type(e).__name__}"
    info["TORCH_CUDA_ARCH_LIST"] = os.environ.get("TORCH_CUDA_ARCH_LIST")
    return info


def run_check(setup: Setup) -> dict[str, Any]:
    """Run the pieces not in `setup.skip`; write OUT/gpu_check.{json,md}; return the report."""
    import torch

    from es_llm.cuda_env import fix_torch_cuda_arch_list

    if not setup.cpu_smoke and not torch.cuda.is_available():
        from es_llm.errors import InputError

        raise InputError("torch sees no GPU here; on a CPU-only machine use --cpu-smoke")
    fix_torch_cuda_arch_list()  # the children inherit the normalised list
    setup.out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    if setup.cpu_smoke:
        env.update(CUDA_VISIBLE_DEVICES="", DS_ACCELERATOR="cpu")
    pieces: dict[str, dict[str, Any]] = {}
    kernels = None
    if "kernels" not in setup.skip:
        kernels = _kernel_tests(setup, env, pieces)
    runs: dict[str, dict[str, Any] | None] = {}
    for name in ("uniform", "es", "plain"):
        if name in setup.skip:
            continue
        run_dir = setup.out / name
        if name == "plain":
            cmd = [sys.executable, "-m", "es_llm.tools.bench_plain",
                   *setup.plain_args(setup.steps, run_dir)]  # fmt: skip
        else:
            cmd = [sys.executable, "-m", "es_llm.cli",
                   *setup.train_args(name, setup.steps, run_dir)]  # fmt: skip
        rc = _run(cmd, setup.out / "logs" / f"{name}.log", setup.out, env)
        pieces[name] = {"returncode": rc, "log": f"logs/{name}.log"}
        runs[name] = read_run(run_dir) if rc == 0 else None
    syncs: dict[str, float | None] = {}
    if "syncs" not in setup.skip and not setup.cpu_smoke:
        syncs = _sync_counts(setup, env, pieces)
    compare = None
    if "compare" not in setup.skip:
        cdir = setup.out / "compare"
        cmd = [sys.executable, "-m", "es_llm.cli", "compare", *setup.data_args(),
               "--methods", "uniform,es", "--epochs", str(setup.compare_epochs),
               "--max-val-samples", str(setup.max_val_samples), "--no-progress",
               "--out", str(cdir)]  # fmt: skip
        if setup.max_train_samples is None:
            cmd += ["--max-train-samples", str(setup.compare_train_samples)]
        rc = _run(cmd, setup.out / "logs" / "compare.log", setup.out, env)
        pieces["compare"] = {"returncode": rc, "log": "logs/compare.log"}
        if rc == 0 and (cdir / "compare.json").is_file():
            compare = json.loads((cdir / "compare.json").read_text())
    info = {**_device_info(), "config": setup.config, "model": setup.model,
            "seq_len": setup.seq_len, "steps": setup.steps, "cpu_smoke": setup.cpu_smoke,
            "sync_steps": list(setup.sync_steps), "pieces": pieces}  # fmt: skip
    report = build_report(runs, syncs, warmup=setup.warmup_steps, kernels=kernels,
                          compare=compare, info=info)  # fmt: skip
    md = render_markdown(report)
    (setup.out / "gpu_check.json").write_text(json.dumps(report, indent=2))
    (setup.out / "gpu_check.md").write_text(md)
    print(md)
    print(f"gpu_check: wrote {setup.out / 'gpu_check.json'} and {setup.out / 'gpu_check.md'}")
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m es_llm.tools.gpu_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("out", nargs="?", default="runs/gpu_check", help="output directory "
                   "(default: %(default)s)")  # fmt: skip
    p.add_argument("--repo", default=None, help="the es-llm checkout whose tests/ hold the "
                   "kernel tests (default: the current directory)")  # fmt: skip
    p.add_argument("--cpu-smoke", action="store_true",
                   help="tiny model on the CPU: tests the check itself, measures nothing")  # fmt: skip
    p.add_argument("--skip", default="", help=f"comma-separated pieces to leave out, of {PIECES}")
    p.add_argument("--steps", type=int, default=None, help="steps per run (default 300; "
                   "cpu-smoke 4)")  # fmt: skip
    p.add_argument("--data", default=None, help="training data, as for es-llm train "
                   "(default: the embedded corpus)")  # fmt: skip
    p.add_argument("--cache-dir", default=None, help="corpus cache, as for es-llm train")
    a = p.parse_args(argv)
    skip = {s.strip() for s in a.skip.split(",") if s.strip()}
    unknown = skip - set(PIECES)
    if unknown:
        p.error(f"--skip: unknown pieces {sorted(unknown)}; choose from {PIECES}")
    out = Path(a.out).resolve()
    repo = Path(a.repo).resolve() if a.repo else Path.cwd()
    setup = Setup.cpu_smoke_setup(out, repo, skip) if a.cpu_smoke else Setup(out, repo, skip=skip)
    if a.steps is not None:
        if a.steps <= setup.warmup_steps:
            p.error(f"--steps must exceed the {setup.warmup_steps} warm-up steps")
        setup.steps = a.steps
    setup.data, setup.cache_dir = a.data, a.cache_dir
    from es_llm.errors import InputError

    try:
        report = run_check(setup)
    except InputError as e:
        print(f"gpu_check: error: {e}", file=sys.stderr)
        return 2
    return 1 if any(v.get("returncode") for v in report.get("pieces", {}).values()) else 0


if __name__ == "__main__":
    sys.exit(main())

"""Microbenchmarks of the scoring kernels: ``es-llm bench kernels --out DIR``.

Each kernel is timed against PyTorch eager (``F.cross_entropy(reduction='none')`` + a segment
sum), ``torch.compile`` of the reference, our PyTorch reference, and Liger-Kernel's cross
entropy when it is installed. Results (ms, achieved GB/s, % of the card's peak memory
bandwidth, peak extra memory, error against the reference) go to a table and to
``DIR/kernels_bench.json``. On a CPU-only machine only the PyTorch paths run, at reduced
shapes; Triton numbers need a GPU and are reported as not measured, never estimated.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from . import reference, triton_available

GPU_N = [8 * 2048, 16 * 4096]
GPU_V = [32000, 50257, 128256]
GPU_H = 4096
CPU_N = [256]
CPU_V = [32000, 50257, 128256]
CPU_H = 256

# Peak HBM bandwidth in GB/s (vendor datasheets), matched against torch's device name.
PEAK_BW_GBPS: list[tuple[tuple[str, ...], float]] = [
    (("H200",), 4800.0),
    (("H100", "NVL"), 3900.0),
    (("H100", "PCIE"), 2000.0),
    (("H100",), 3350.0),  # SXM5 ("NVIDIA H100 80GB HBM3")
    (("A100", "PCIE", "80GB"), 1935.0),
    (("A100", "80GB"), 2039.0),  # SXM4 80GB
    (("A100",), 1555.0),  # 40GB (SXM4 and PCIe)
]


def peak_bandwidth_gbps(device_name: str) -> float | None:
    """Datasheet peak memory bandwidth of a known card; None when unknown (no guessing)."""
    name = device_name.upper()
    for keys, bw in PEAK_BW_GBPS:
        if all(k in name for k in keys):
            return bw
    return None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``es-llm bench kernels``."""
    parser.add_argument("--out", type=Path, required=True, help="directory for kernels_bench.json")
    parser.add_argument(
        "--n", type=int, nargs="+", help="rows (tokens); default GPU 16384 65536, CPU 256"
    )
    parser.add_argument(
        "--vocab", type=int, nargs="+", help="vocab sizes; default 32000 50257 128256"
    )
    parser.add_argument(
        "--hidden", type=int, help="H for the linear path; default GPU 4096, CPU 256"
    )
    parser.add_argument("--seq-len", type=int, default=2048, help="rows per sequence (segments)")
    parser.add_argument(
        "--dtype", choices=["bf16", "fp16", "fp32"], help="default GPU bf16, CPU fp32"
    )
    parser.add_argument(
        "--kernels",
        nargs="+",
        choices=["ce", "linear"],
        default=["ce", "linear"],
        help="which kernels to time: ce = per-sample cross-entropy from logits, linear = the "
        "chunked fused-linear scoring path (default: both)",
    )
    parser.add_argument(
        "--iters", type=int, help="timed repetitions (median); default GPU 10, CPU 5"
    )
    parser.add_argument("--warmup", type=int, help="untimed calls first; default GPU 3, CPU 2")
    parser.add_argument(
        "--device",
        choices=["auto", "cuda", "cpu"],
        default="auto",
        help="where to run: auto = the GPU when torch sees one, else the CPU (default: auto)",
    )
    parser.add_argument(
        "--compile-on-cpu",
        action="store_true",
        help="also time torch.compile on CPU (slow to build)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the random inputs (default: %(default)s)"
    )


_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(
    fn: Callable[[], Any], device: torch.device, iters: int, warmup: int
) -> tuple[float, int | None, Any]:
    """Median ms, peak extra bytes allocated during one call (CUDA only), last output."""
    out = None
    for _ in range(warmup):
        out = fn()
    _sync(device)
    peak = None
    if device.type == "cuda":
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = fn()
        _sync(device)
        peak = torch.cuda.max_memory_allocated(device) - base
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            out = fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), peak, out


def _eager_ce(logits: Tensor, labels: Tensor, seq: Tensor, s: int) -> tuple[Tensor, Tensor]:
    """What a user writes without the kernel: F.cross_entropy(reduction='none') + segment sum."""
    ce = F.cross_entropy(logits, labels, ignore_index=-100, reduction="none").float()
    loss = torch.zeros(s, device=logits.device).index_add_(0, seq, ce)
    cnt = torch.zeros(s, device=logits.device).index_add_(0, seq, (labels != -100).float())
    return loss, cnt


def _plain_reference(logits: Tensor, labels: Tensor, seq: Tensor, s: int) -> tuple[Tensor, Tensor]:
    """Unchunked reference formula, the input to torch.compile (it fuses the fp32 upcast)."""
    x = logits.float()
    valid = labels != -100
    safe = torch.where(valid, labels, 0)
    row = torch.logsumexp(x, -1) - x.gather(1, safe[:, None]).squeeze(1)
    row = torch.where(valid, row, 0.0)
    loss = torch.zeros(s, device=x.device).index_add_(0, seq, row)
    cnt = torch.zeros(s, device=x.device).index_add_(0, seq, valid.float())
    return loss, cnt


def _liger_ce() -> Callable | None:
    try:
        from liger_kernel.transformers.functional import liger_cross_entropy
    except Exception:
        return None
    return liger_cross_entropy


def _empty_row(base: dict, method: str, status: str) -> dict:
    """A result row with every measurement unset (filled in, or left null when not measured)."""
    return dict(
        base,
        method=method,
        ms=None,
        gbps=None,
        pct_peak_bw=None,
        tflops=None,
        peak_mem_bytes=None,
        max_abs_err=None,
        status=status,
    )


def _record(
    rows: list[dict],
    base: dict,
    method: str,
    fn: Callable[[], Any],
    *,
    device,
    args,
    bytes_moved,
    flops,
    peak_bw,
    ref_loss,
) -> None:
    row = _empty_row(base, method, "ok")
    try:
        ms, peak, out = _time(fn, device, args.iters, args.warmup)
    except Exception as exc:  # OOM or a missing compiler: record it, keep benchmarking
        row.update(status="error", error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
        if device.type == "cuda":
            torch.cuda.empty_cache()
        rows.append(row)
        return
    row.update(ms=round(ms, 4), peak_mem_bytes=peak)
    if bytes_moved:
        gbps = bytes_moved / (ms * 1e-3) / 1e9
        row["gbps"] = float(f"{gbps:.4g}")
        if peak_bw:
            row["pct_peak_bw"] = float(f"{100 * gbps / peak_bw:.4g}")
    if flops:
        row["tflops"] = float(f"{flops / (ms * 1e-3) / 1e12:.4g}")
    if ref_loss is not None and out is not None:
        loss = out[0] if isinstance(out, tuple) else out
        row["max_abs_err"] = float((loss.float() - ref_loss).abs().max())
    rows.append(row)


def _not_measured(rows: list[dict], base: dict, method: str, why: str) -> None:
    rows.append(dict(_empty_row(base, method, "not measured"), error=why))


@dataclass
class _Ctx:
    device: torch.device
    args: argparse.Namespace
    peak_bw: float | None
    use_triton: bool
    liger: Callable | None
    gen: torch.Generator
    rows: list[dict]

    def record(self, base: dict, method: str, fn: Callable[[], Any], **kw: Any) -> None:
        _record(
            self.rows,
            base,
            method,
            fn,
            device=self.device,
            args=self.args,
            peak_bw=self.peak_bw,
            **kw,
        )


def _labels(ctx: _Ctx, n: int, v: int) -> tuple[Tensor, Tensor, int]:
    """Labels with ~5% ignored, and the sequence of each row (``--seq-len`` rows each)."""
    labels = torch.randint(0, v, (n,), generator=ctx.gen)
    labels[torch.rand(n, generator=ctx.gen) < 0.05] = -100
    seq_len = min(ctx.args.seq_len, n)
    seq = torch.arange(n) // seq_len
    return labels.to(ctx.device), seq.to(ctx.device), -(-n // seq_len)


def _bench_ce(ctx: _Ctx, n: int, v: int, dtype: torch.dtype, compiled: Callable | None) -> None:
    from . import per_sample_loss

    labels, seq, s = _labels(ctx, n, v)
    base = {"kernel": "per_sample_loss", "n": n, "V": v, "H": None, "dtype": _dtype_name(dtype)}
    try:
        logits = torch.randn(n, v, generator=ctx.gen).to(dtype).to(ctx.device)
        ref_loss = reference.per_sample_loss_reference(logits, labels, seq, s)[0]
    except RuntimeError as exc:
        _not_measured(ctx.rows, base, "all", f"inputs: {str(exc)[:200]}")
        return
    kw = dict(
        bytes_moved=logits.numel() * logits.element_size() + n * 16, flops=None, ref_loss=ref_loss
    )
    ctx.record(base, "eager", lambda: _eager_ce(logits, labels, seq, s), **kw)
    ctx.record(
        base,
        "reference",
        lambda: per_sample_loss(logits, labels, seq, s, backend="reference"),
        **kw,
    )
    if compiled is not None:
        ctx.record(base, "torch.compile", lambda: compiled(logits, labels, seq, s), **kw)
    else:
        _not_measured(ctx.rows, base, "torch.compile", "skipped on CPU (pass --compile-on-cpu)")
    if ctx.liger is not None and ctx.device.type == "cuda":
        liger = ctx.liger
        ctx.record(
            base,
            "liger",
            lambda: liger(logits, labels, ignore_index=-100, reduction="none"),
            **dict(kw, ref_loss=None),
        )
    else:
        _not_measured(
            ctx.rows,
            base,
            "liger",
            "liger-kernel not installed" if ctx.liger is None else "needs a GPU",
        )
    if ctx.use_triton:
        ctx.record(
            base, "triton", lambda: per_sample_loss(logits, labels, seq, s, backend="triton"), **kw
        )
    else:
        _not_measured(ctx.rows, base, "triton", "needs a GPU")


def _bench_linear(ctx: _Ctx, n: int, v: int, h: int, dtype: torch.dtype) -> None:
    from . import fused_linear_per_sample_loss

    labels, seq, s = _labels(ctx, n, v)
    base = {"kernel": "fused_linear", "n": n, "V": v, "H": h, "dtype": _dtype_name(dtype)}
    hidden = torch.randn(n, h, generator=ctx.gen).to(dtype).to(ctx.device)
    weight = (torch.randn(v, h, generator=ctx.gen) / h**0.5).to(dtype).to(ctx.device)

    def fused(backend: str) -> tuple[Tensor, Tensor]:
        return fused_linear_per_sample_loss(hidden, weight, labels, seq, s, backend=backend)

    ref_loss = fused("reference")[0]
    kw = dict(bytes_moved=None, flops=2.0 * n * v * h, ref_loss=ref_loss)
    ctx.record(
        base,
        "eager (materialised logits)",
        lambda: _eager_ce(hidden @ weight.t(), labels, seq, s),
        **kw,
    )
    ctx.record(base, "reference (chunked)", lambda: fused("reference"), **kw)
    if ctx.use_triton:
        ctx.record(base, "triton (chunked)", lambda: fused("triton"), **kw)
    else:
        _not_measured(ctx.rows, base, "triton (chunked)", "needs a GPU")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def run(args: argparse.Namespace) -> dict:
    """Run the benchmark; print a table; write ``args.out/kernels_bench.json``; return it."""
    want = getattr(args, "device", "auto")
    device = torch.device(
        "cuda" if (want == "cuda" or (want == "auto" and torch.cuda.is_available())) else "cpu"
    )
    gpu = device.type == "cuda"
    ns = args.n or (GPU_N if gpu else CPU_N)
    vs = args.vocab or (GPU_V if gpu else CPU_V)
    h = args.hidden or (GPU_H if gpu else CPU_H)
    dtype = _DTYPES[args.dtype or ("bf16" if gpu else "fp32")]
    args.iters = args.iters or (10 if gpu else 5)
    args.warmup = args.warmup if args.warmup is not None else (3 if gpu else 2)
    name = torch.cuda.get_device_name(device) if gpu else "cpu"
    peak_bw = peak_bandwidth_gbps(name) if gpu else None
    use_triton = gpu and triton_available()
    liger = _liger_ce()
    notes: list[str] = []
    if not gpu:
        notes.append(
            "No GPU: Triton kernels not measured (they need a GPU); PyTorch paths at reduced shapes; peak memory is not tracked on CPU."
        )
    if liger is None:
        notes.append("Liger-Kernel not installed: its cross entropy was not measured.")
    if gpu and peak_bw is None:
        notes.append(f"Peak bandwidth of {name!r} unknown: % of peak left null.")
    gen = torch.Generator(device="cpu").manual_seed(args.seed)
    rows: list[dict] = []
    ctx = _Ctx(device, args, peak_bw, use_triton, liger, gen, rows)
    compiled = None
    if gpu or args.compile_on_cpu:
        compiled = torch.compile(_plain_reference, dynamic=False)
    for n in ns:
        for v in vs:
            if "ce" in args.kernels:
                _bench_ce(ctx, n, v, dtype, compiled)
            if "linear" in args.kernels:
                _bench_linear(ctx, n, v, h, dtype)

    result = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": name,
        "peak_bw_gbps": peak_bw,
        "torch": torch.__version__,
        "triton": _triton_version(),
        "liger_kernel": liger is not None,
        "iters": args.iters,
        "notes": notes,
        "results": rows,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "kernels_bench.json").write_text(json.dumps(result, indent=2))
    _print_table(result, out / "kernels_bench.json")
    return result


def _triton_version() -> str | None:
    try:
        import triton
    except Exception:
        return None
    return triton.__version__


def _fmt(x: Any, spec: str = "") -> str:
    return "-" if x is None else format(x, spec)


def _print_table(result: dict, path: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    bw = result["peak_bw_gbps"]
    table = Table(title=f"es-llm kernels on {result['device']} (peak BW {_fmt(bw)} GB/s)")
    cols = [
        "kernel",
        "method",
        "n",
        "V",
        "H",
        "dtype",
        "ms",
        "GB/s",
        "%BW",
        "TFLOP/s",
        "mem MiB",
        "max err",
    ]
    for col in cols:
        table.add_column(col, justify="left" if col in ("kernel", "method", "dtype") else "right")
    skipped = []
    for r in result["results"]:
        if r["status"] != "ok":
            skipped.append(
                f"{r['kernel']} / {r['method']} (n={r['n']}, V={r['V']}): {r['status']}, {r.get('error', '')}"
            )
            continue
        mem = None if r["peak_mem_bytes"] is None else r["peak_mem_bytes"] / 2**20
        table.add_row(
            r["kernel"],
            r["method"],
            _fmt(r["n"]),
            _fmt(r["V"]),
            _fmt(r["H"]),
            r["dtype"],
            _fmt(r["ms"], ".3f"),
            _fmt(r["gbps"], ".1f"),
            _fmt(r["pct_peak_bw"], ".1f"),
            _fmt(r["tflops"], ".3f"),
            _fmt(mem, ".1f"),
            _fmt(r["max_abs_err"], ".1e"),
        )
    console = Console(width=max(Console().width, 140))
    console.print(table)
    for line in skipped:
        console.print(f"  {line}", highlight=False)
    for note in result["notes"]:
        console.print(f"note: {note}", highlight=False)
    console.print(f"wrote {path}", highlight=False)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="es-llm bench kernels", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    main()

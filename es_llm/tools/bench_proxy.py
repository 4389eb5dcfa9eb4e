"""`es-llm bench proxy`: what the proxy scorer costs against the learner's scoring forward.

One process, no DeepSpeed, random token rows on the device. Per sample, in milliseconds:

- `learner_score_ms`: the learner's no-grad scoring forward (`ModelScorer`, what scorer
  `learner` runs on every meta-batch sample);
- `learner_train_ms`: the learner's training forward+backward (the unit the costs compare to);
- `proxy_score_ms`: the proxy's no-grad scoring forward (`ProxyScorer.__call__`);
- `proxy_learn_ms`: the proxy's online update per trained sample (`ProxyScorer.learn`:
  forward, backward, the gradient all-reduce of a single rank, the AdamW step).

From them: `proxy_vs_learner_score` (the proxy's forward over the learner's), and the scoring
cost of a selection step per scored sample with each scorer, over a training sample's:
`learner` = learner_score / learner_train; `proxy` = (proxy_score + r * proxy_learn) /
learner_train at selection ratio r (the proxy learns from the r share that is trained). On
an accelerator the spans are timed with device events after a synchronize (a benchmark, not
a training step). Writes OUT/proxy_bench.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["add_arguments", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="gpt2-124m", help="the learner preset (default: %(default)s)")
    p.add_argument(
        "--proxy",
        default=None,
        help="the proxy preset (default: the run's default, the largest of gpt2-tiny, "
        "gpt2-nano within 1/5 of the learner's FLOPs per token)",
    )
    p.add_argument("--seq-len", type=int, default=256, help="tokens per row (default: %(default)s)")
    p.add_argument("--vocab-size", type=int, default=8192, help="vocabulary (default: %(default)s)")
    p.add_argument(
        "--batch", type=int, default=64, help="rows scored per timed call (default: %(default)s)"
    )
    p.add_argument(
        "--micro-batch",
        type=int,
        default=16,
        help="rows per forward (scoring and training; default: %(default)s)",
    )
    p.add_argument(
        "--selection-ratio",
        type=float,
        default=0.5,
        help="r: the share of a meta-batch trained, which the proxy learns from "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--dtype",
        choices=("auto", "fp32", "bf16"),
        default="auto",
        help="the learner's precision and the proxy's autocast: auto = bf16 on a GPU, fp32 "
        "on the CPU (default: %(default)s)",
    )
    p.add_argument(
        "--max-seconds",
        type=float,
        default=30.0,
        help="time budget for all four measurements together (default: %(default)s)",
    )
    p.add_argument("--out", default="runs/bench", help="output directory (default: %(default)s)")


def _timer(device: Any) -> Callable[[Callable[[], Any]], float]:
    """Seconds one call of `fn` takes on `device` (device events on an accelerator)."""
    import torch

    if device.type == "cpu":

        def cpu(fn: Callable[[], Any]) -> float:
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0

        return cpu

    def gpu(fn: Callable[[], Any]) -> float:
        start, end = (torch.Event(device, enable_timing=True) for _ in range(2))
        torch.accelerator.synchronize()
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000.0

    return gpu


def _measure(
    time_one: Callable[[Callable[[], Any]], float], fn: Callable[[], Any], budget_s: float
) -> tuple[float, int]:
    """Median seconds of `fn` after one warm-up call, repeated within `budget_s` (3 to 20)."""
    time_one(fn)  # warm-up: allocations, kernel selection
    times: list[float] = []
    t0 = time.perf_counter()
    while len(times) < 3 or (len(times) < 20 and time.perf_counter() - t0 < budget_s):
        times.append(time_one(fn))
    return statistics.median(times), len(times)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from es_llm import dist
    from es_llm.drivers.losses import training_losses
    from es_llm.drivers.proxy import ProxyScorer, choose_proxy
    from es_llm.drivers.scoring import ModelScorer
    from es_llm.errors import InputError
    from es_llm.model import build_model, load_model_preset

    if not 0 < args.selection_ratio <= 1:
        raise InputError(f"--selection-ratio must be in (0, 1], got {args.selection_ratio}")
    device = dist.accelerator_device()
    bf16 = args.dtype == "bf16" or (args.dtype == "auto" and device.type != "cpu")
    dtype = torch.bfloat16 if bf16 else torch.float32
    V, T = args.vocab_size, args.seq_len
    torch.manual_seed(0)
    learner = build_model(load_model_preset(args.model), vocab_size=V, seq_len=T)
    learner = learner.to(device=device, dtype=dtype)
    choice = choose_proxy(args.proxy, learner.config, vocab_size=V, seq_len=T)
    proxy_model = build_model(load_model_preset(choice.name), vocab_size=V, seq_len=T)
    proxy = ProxyScorer(
        proxy_model.to(device),
        comm=dist.Communicator(),
        micro_batch=args.micro_batch,
        lr=1e-4,
        autocast=torch.bfloat16 if bf16 else None,
        choice=choice,
    )
    n = args.batch
    tokens = torch.randint(0, V, (n, T), device=device)
    ids = torch.arange(n, device=device)
    k = max(1, round(n * args.selection_ratio))
    trained = tokens[:k]
    score = ModelScorer(lambda: learner, micro_batch=args.micro_batch)
    opt = torch.optim.AdamW(learner.parameters(), lr=1e-5)

    def learner_train() -> None:
        learner.train()
        for i in range(0, k, args.micro_batch):
            mb = trained[i : i + args.micro_batch]
            per_sample, _ = training_losses(learner(input_ids=mb).logits, mb, -100)
            per_sample.mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    mask = torch.ones(k, dtype=torch.bool, device=device)
    time_one = _timer(device)
    share = args.max_seconds / 4
    parts = {
        "learner_score": (lambda: score(tokens, ids), n),
        "learner_train": (learner_train, k),
        "proxy_score": (lambda: proxy(tokens, ids), n),
        "proxy_learn": (lambda: proxy.learn(trained, None, mask), k),
    }
    per_sample_ms: dict[str, float] = {}
    repeats: dict[str, int] = {}
    for name, (fn, rows) in parts.items():
        seconds, reps = _measure(time_one, fn, share)
        per_sample_ms[f"{name}_ms"] = 1e3 * seconds / rows
        repeats[name] = reps
    m = per_sample_ms
    r = args.selection_ratio
    result = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "dtype": "bf16" if bf16 else "fp32",
        "learner": args.model,
        "proxy": choice.summary(),
        "seq_len": T,
        "vocab_size": V,
        "batch": n,
        "micro_batch": args.micro_batch,
        "selection_ratio": r,
        "per_sample_ms": m,
        "repeats": repeats,
        "proxy_vs_learner_score": m["proxy_score_ms"] / m["learner_score_ms"],
        "scoring_cost_per_training_sample": {
            "learner": m["learner_score_ms"] / m["learner_train_ms"],
            "proxy": (m["proxy_score_ms"] + r * m["proxy_learn_ms"]) / m["learner_train_ms"],
        },
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "proxy_bench.json").write_text(json.dumps(result, indent=2))
    c = result["scoring_cost_per_training_sample"]
    print(
        f"proxy {choice.name} ({choice.flops_ratio:.3f} of {args.model}'s FLOPs/token) on "
        f"{result['device_name']}, {result['dtype']}, {n} x {T} tokens:\n"
        f"  per sample: learner score {m['learner_score_ms']:.3f} ms, learner train "
        f"{m['learner_train_ms']:.3f} ms, proxy score {m['proxy_score_ms']:.3f} ms, proxy "
        f"learn {m['proxy_learn_ms']:.3f} ms\n"
        f"  proxy forward / learner forward: {result['proxy_vs_learner_score']:.3f}; scoring "
        f"cost per scored sample / training cost per sample: learner {c['learner']:.3f}, "
        f"proxy {c['proxy']:.3f} (learning at r = {r})\n"
        f"  -> {out / 'proxy_bench.json'}",
        flush=True,
    )
    return result
